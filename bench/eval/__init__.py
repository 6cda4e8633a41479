"""``kad-eval``: accuracy of a deployment on math and multiple-choice benchmarks."""

"""Benchmarks (``kad-bench``): speed is measured here as side-by-side ratios, never in tests."""

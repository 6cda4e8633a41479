"""lm-evaluation-harness (``local-completions``, remote tokenizer) runs a multiple-choice
task against the real server process and scores it under pi.

The task is a local JSON file (``tests/data/lm_eval_mc``), so nothing is downloaded. The
oracle: the reference decoder's log pi of each choice's continuation tokens, summed, on the
same two tiny models, tokenised as the harness tokenises (``_encode_pair``). The server's
default rule is ``kad_primal``, which needs the whole of p (not only its top).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from test_server_process import _launch, _stop, _wait_ready

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data" / "lm_eval_mc" / "items.json"
RULE, PARAM = "kad_primal", 0.7


def _task_yaml(directory: Path) -> None:
    (directory / "kad_tiny_mc.yaml").write_text(f"""task: kad_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
""")


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``TemplateLM._encode_pair``: trailing spaces of the context
    move to the continuation; the continuation is what the whole adds to the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    start = tokenizer.encode(context, add_special_tokens=False)
    return start, whole[len(start):]


def _reference_loglikelihood(reference, context_ids: list[int], continuation: list[int]):
    ids = context_ids + continuation
    total = 0.0
    for t in range(len(context_ids), len(ids)):
        _, _, pi = reference.next_distributions(ids[:t])
        total += math.log(float(pi[ids[t]]))
    return total


def test_lm_eval_multiple_choice_accuracy_is_that_of_pi(tiny_pair, tmp_path,
                                                        reference_factory, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _task_yaml(tmp_path)
    server = _launch(tiny_pair, tmp_path, alignment={"rule": RULE, "budget": PARAM},
                     gamma=5)
    try:
        _wait_ready(server)
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=(f"base_url={server['url']}/v1/completions,model=kad-tiny,"
                        "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=4,"
                        "max_retries=1"),
            tasks=["kad_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True, batch_size=4,
        )
    finally:
        _stop(server)
    accuracy = results["results"]["kad_tiny_mc"]["acc,none"]
    samples = sorted(results["samples"]["kad_tiny_mc"], key=lambda s: s["doc_id"])
    items = json.loads(DATA.read_text())
    assert len(samples) == len(items)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pair.draft))
    reference = reference_factory(RULE, PARAM, temperature=1.0)
    correct = 0
    for item, sample in zip(items, samples):
        expected = []
        for choice, (arguments, response) in zip(item["choices"],
                                                 zip(sample["arguments"], sample["resps"])):
            context, continuation = (
                (arguments["arg_0"], arguments["arg_1"]) if isinstance(arguments, dict)
                else arguments)
            assert continuation == " " + choice
            value = _reference_loglikelihood(
                reference, *_encode_pair(tokenizer, context, continuation))
            assert response[0][0] == pytest.approx(value, abs=1e-3), (item, choice)
            expected.append(value)
        correct += int(max(range(len(expected)), key=expected.__getitem__) == item["answer"])
    assert accuracy == pytest.approx(correct / len(items))
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"

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


def _evaluate(server: dict, task: str, task_dir: Path, more_args: str = "") -> dict:
    """The harness's ``local-completions`` model on the server, four requests at a time."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={server['url']}/v1/completions,model=kad-tiny,"
                    "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=4,"
                    f"max_retries=1{more_args}"),
        tasks=[task], task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True, batch_size=4,
    )


def _reference_loglikelihood(reference, context_ids: list[int], continuation: list[int]):
    ids = context_ids + continuation
    total = 0.0
    for t in range(len(context_ids), len(ids)):
        _, _, pi = reference.next_distributions(ids[:t])
        total += math.log(float(pi[ids[t]]))
    return total


def test_lm_eval_multiple_choice_accuracy_is_that_of_pi(tiny_pair, tmp_path,
                                                        reference_factory, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _task_yaml(tmp_path)
    server = _launch(tiny_pair, tmp_path, alignment={"rule": RULE, "budget": PARAM},
                     gamma=5)
    try:
        _wait_ready(server)
        results = _evaluate(server, "kad_tiny_mc", tmp_path)
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


ROLLING_TEXT = (
    "The river ran past the old mill, and the miller counted his sacks of grain twice "
    "before the market opened. Seven carts came down the hill road that morning, each "
    "carrying apples, pears or cheese, and the children ran beside them shouting the "
    "prices they had heard the day before. By noon the square was full: a fiddler played "
    "near the well, two dogs argued over a bone, and the baker sold his last loaf to a "
    "traveller who had walked from the coast with nothing but a map and a borrowed coat. "
)


def test_lm_eval_loglikelihood_rolling_with_concurrent_windows(tiny_pair, tmp_path,
                                                               reference_factory,
                                                               monkeypatch):
    """Perplexity of texts several windows long at ``num_concurrent=4``: the harness sends
    each document's windows as scoring requests at the same time (where one document's
    total was once off by 103.6 nats). Each total equals the reference's sum over the
    harness's own windows: log pi at every scored position, a window's second token
    (position 1) included."""
    from lm_eval import utils
    from lm_eval.api.registry import get_model
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    texts = [ROLLING_TEXT * 2, ROLLING_TEXT[60:] + ROLLING_TEXT]
    data = tmp_path / "rolling.json"
    data.write_text(json.dumps([{"text": text} for text in texts]))
    (tmp_path / "kad_tiny_rolling.yaml").write_text(f"""task: kad_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    max_length = 64
    server = _launch(tiny_pair, tmp_path, alignment={"rule": "kad_dual", "lam": 0.4},
                     gamma=5)
    try:
        _wait_ready(server)
        results = _evaluate(server, "kad_tiny_rolling", tmp_path,
                            f",max_length={max_length}")
        # The harness's own tokens and window prefix (its remote tokenizer's bos or eos).
        harness = get_model("local-completions").create_from_arg_string(
            f"base_url={server['url']}/v1/completions,model=kad-tiny,"
            f"tokenizer_backend=remote,tokenized_requests=True,max_length={max_length}")
        prefix, encode = harness.prefix_token_id, harness.tok_encode
        window = harness.max_length - 1  # the harness keeps one position for generation
        encoded = {text: encode(text) for text in texts}
    finally:
        _stop(server)
    samples = sorted(results["samples"]["kad_tiny_rolling"], key=lambda s: s["doc_id"])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pair.draft))
    reference = reference_factory("kad_dual", 0.4, temperature=1.0)
    windows_seen = 0
    for text, sample in zip(texts, samples):
        arguments = sample["arguments"][0]
        string = arguments["arg_0"] if isinstance(arguments, dict) else arguments[0]
        assert string == text
        assert encoded[text] == tokenizer.encode(text, add_special_tokens=False)
        total = 0.0
        windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=encoded[text], prefix_token=prefix, max_seq_len=window,
            context_len=1))
        for context, continuation in windows:
            windows_seen += 1
            ids = context + continuation
            for t in range(len(context), len(ids)):
                _, _, pi = reference.next_distributions(ids[:t])
                total += math.log(float(pi[ids[t]]))
        response = sample["resps"][0]
        value = response[0] if isinstance(response, (list, tuple)) else response
        assert value == pytest.approx(total, abs=2e-3), text[:30]
    assert windows_seen >= 8  # several windows per document, scored concurrently


def test_the_readme_recipe_sends_kad_through_the_harness_gen_kwargs():
    """``lm_eval run ... --gen_kwargs 'kad={"rule": "kad_dual", "lam": 0.4},max_gen_toks=64'``
    (README): the harness's CLI parses the nested object, its ``local-completions`` model
    puts it into the generation request, and the server's request model reads it."""
    from types import SimpleNamespace

    from lm_eval._cli.utils import key_val_to_dict
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from server.protocol import CompletionRequest

    gen_kwargs = key_val_to_dict('kad={"rule": "kad_dual", "lam": 0.4},max_gen_toks=64')
    payload = LocalCompletionsAPI._create_payload(
        SimpleNamespace(model="kad-tiny", _max_gen_toks=256), [[1, 2, 3]], generate=True,
        gen_kwargs=dict(gen_kwargs))
    request = CompletionRequest.model_validate(payload)
    assert request.kad is not None and request.kad.rule == "kad_dual"
    assert request.kad.param == 0.4 and request.max_tokens == 64

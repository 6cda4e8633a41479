"""Start-up checks (server/engine/preflight.py) on copies of the tiny pair with edited configs
and tokenizers, and on directories that carry the real configs of the shipped model pairs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from server.config import ServeConfig, load_config
from server.engine.preflight import (
    PreflightError,
    headroom,
    model_eos_token_ids,
    resolve_max_model_len,
    run_preflight,
    stop_token_ids,
)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _copy_model(src: Path, dst: Path) -> Path:
    # Weights are never read by the checks; leave them behind.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


@pytest.fixture
def pair(tiny_pair, tmp_path):
    """Editable copies of the tiny pair: (target dir, draft dir)."""
    return (_copy_model(tiny_pair.target, tmp_path / "target"),
            _copy_model(tiny_pair.draft, tmp_path / "draft"))


def _edit_json(path: Path, **updates) -> None:
    data = json.loads(path.read_text())
    for key, value in updates.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _config(target: Path, draft: Path, tokenizer: Path | None = None, **engine) -> ServeConfig:
    settings = {"max_model_len": 512, "num_speculative_tokens": 5}
    settings.update(engine)
    models = {"target": str(target), "draft": str(draft)}
    if tokenizer is not None:
        models["tokenizer"] = str(tokenizer)
    return ServeConfig.model_validate({"models": models, "engine": settings})


# ------------------------------------------------------------------------- position limits


def test_headroom_is_two_gamma_plus_two(pair):
    assert headroom(_config(*pair, num_speculative_tokens=5)) == 12
    assert headroom(_config(*pair, num_speculative_tokens=1)) == 4


def test_tiny_model_position_limit_is_the_one_vllm_derives(pair):
    result = run_preflight(_config(*pair))
    assert result.model_position_limit == 2048
    assert result.vllm_config.model_config.max_model_len == result.engine_max_model_len


# ------------------------------------------------------------------------- resolving lengths


def test_resolve_max_model_len_fits():
    assert resolve_max_model_len(1000, 7, 2048, 2048) == (1000, 1007)
    assert resolve_max_model_len(2041, 7, 2048, 2048) == (2041, 2048)
    assert resolve_max_model_len(512, 7, None, None) == (512, 519)
    assert resolve_max_model_len(None, 7, 4096, None) == (4089, 4096)


def test_resolve_max_model_len_at_the_limit_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.preflight"):
        assert resolve_max_model_len(2048, 7, 2048, 2048) == (2041, 2048)
    assert any("2041" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_resolve_max_model_len_uses_the_smaller_limit(caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.preflight"):
        assert resolve_max_model_len(1024, 7, 4096, 1024) == (1017, 1024)
    assert "draft model" in caplog.text
    with pytest.raises(PreflightError, match="1024 positions of the draft model"):
        resolve_max_model_len(2048, 7, 4096, 1024)


def test_resolve_max_model_len_too_long_names_the_numbers():
    with pytest.raises(PreflightError) as info:
        resolve_max_model_len(4000, 7, 2048, None)
    message = str(info.value)
    for number in ("4000", "2048", "7", "2041"):
        assert number in message


def test_resolve_max_model_len_headroom_larger_than_model():
    with pytest.raises(PreflightError, match="headroom"):
        resolve_max_model_len(16, 18, 16, 16)


# ------------------------------------------------------------------------- run_preflight


def test_tiny_pair_at_full_length_serves_limit_minus_headroom(pair, caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.preflight"):
        result = run_preflight(_config(*pair, max_model_len=2048, num_speculative_tokens=5))
    assert (result.public_max_model_len, result.engine_max_model_len) == (2036, 2048)
    assert result.headroom == 12 and result.model_position_limit == 2048
    assert [r for r in caplog.records
            if r.name == "server.engine.preflight" and r.levelno == logging.WARNING]
    assert any("2036" in note for note in result.notes)
    assert result.stop_token_ids == [0]


def test_tiny_pair_within_limit_unchanged(pair, caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.preflight"):
        result = run_preflight(_config(*pair, max_model_len=1024, num_speculative_tokens=5))
    assert (result.public_max_model_len, result.engine_max_model_len) == (1024, 1036)
    assert not [r for r in caplog.records
                if r.name == "server.engine.preflight" and r.levelno >= logging.WARNING]


def test_tiny_pair_too_long_is_an_error_naming_the_limit(pair):
    with pytest.raises(PreflightError, match="2048") as info:
        run_preflight(_config(*pair, max_model_len=4000))
    assert "4000" in str(info.value) and "2036" in str(info.value)


def test_draft_with_fewer_positions_sets_the_limit(pair):
    target, draft = pair
    _edit_json(draft / "config.json", max_position_embeddings=1024)
    result = run_preflight(_config(target, draft, max_model_len=1000))
    assert (result.public_max_model_len, result.engine_max_model_len) == (1000, 1012)
    result = run_preflight(_config(target, draft, max_model_len=1024))
    assert (result.public_max_model_len, result.engine_max_model_len) == (1012, 1024)
    assert result.model_position_limit == 1024
    with pytest.raises(PreflightError, match="1024 positions of the draft model"):
        run_preflight(_config(target, draft, max_model_len=2048))


def test_rope_scaled_target_gets_the_scaled_limit(pair):
    """vLLM's own derivation (RoPE factor) decides the limit, not a copy of its rules."""
    target, draft = pair
    for model in (target, draft):
        _edit_json(model / "config.json", max_position_embeddings=1024, rope_parameters={
            "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert run_preflight(_config(target, draft, max_model_len=1500)).model_position_limit \
        == 2048


# ------------------------------------------------------------------------- tokenizers


def test_tokenizer_with_swapped_ids_is_an_error(pair, tiny_pair):
    from transformers import AutoTokenizer

    target, draft = pair
    ids = AutoTokenizer.from_pretrained(tiny_pair.draft).encode("The quick brown fox")
    a, b = ids[0], ids[1]
    data = json.loads((draft / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    token_a = next(t for t, i in vocab.items() if i == a)
    token_b = next(t for t, i in vocab.items() if i == b)
    vocab[token_a], vocab[token_b] = b, a
    (draft / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PreflightError, match="encodes differently") as info:
        run_preflight(_config(target, draft))
    assert "draft" in str(info.value) and "target" in str(info.value)


def test_tokenizer_with_a_renamed_special_token_is_an_error(pair):
    target, draft = pair
    data = json.loads((draft / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token["content"] = "<|end|>"
    vocab = data["model"]["vocab"]
    vocab["<|end|>"] = vocab.pop("<|im_end|>")
    (draft / "tokenizer.json").write_text(json.dumps(data))
    _edit_json(draft / "tokenizer_config.json", extra_special_tokens=["<|im_start|>", "<|end|>"])
    with pytest.raises(PreflightError, match=r"id 2 is '<\|end\|>' in the draft tokenizer"):
        run_preflight(_config(target, draft))


def test_draft_eos_as_a_new_token_is_an_error(pair):
    target, draft = pair
    # An eos the vocabulary lacks becomes token 512, past both models' 512 embeddings.
    _edit_json(draft / "tokenizer_config.json", eos_token="<|eos|>")
    with pytest.raises(PreflightError, match="513 tokens.*vocab_size 512"):
        run_preflight(_config(target, draft))


def test_draft_eos_role_differs_like_a_chat_model(pair):
    """An instruct model's eos is often <|im_end|> where its base model's is <|endoftext|>
    (Qwen3-1.7B vs Qwen3-14B-Base): same ids, only the role differs, so it is a note."""
    target, draft = pair
    _edit_json(draft / "tokenizer_config.json", eos_token="<|im_end|>")
    result = run_preflight(_config(target, draft))
    assert any("eos token differs" in note for note in result.notes)
    # vLLM stops on the target's generation-config eos and the served tokenizer's eos.
    assert result.stop_token_ids == [0, 2]


def test_added_token_inside_padding_is_a_note(pair):
    target, draft = pair
    for model in (target, draft):
        _edit_json(model / "config.json", vocab_size=576)
    _edit_json(draft / "tokenizer_config.json",
               extra_special_tokens=["<|im_start|>", "<|im_end|>", "<|tool|>"])
    result = run_preflight(_config(target, draft))
    assert any("'<|tool|>' (id 512)" in note and "padding" in note for note in result.notes)


def test_different_vocab_sizes_fail_at_start_up_in_one_line(pair):
    """vLLM refuses a draft whose vocabulary size differs from the target's (the old
    preflight accepted it as padding); the refusal comes before any weight loads."""
    target, draft = pair
    _edit_json(target / "config.json", vocab_size=640)
    _edit_json(draft / "config.json", vocab_size=576)
    with pytest.raises(PreflightError) as info:
        run_preflight(_config(target, draft))
    _one_line_naming(info.value, "models.target / models.draft", "vocab")


def test_vocab_smaller_than_tokenizer_is_an_error(pair):
    target, draft = pair
    for model in (target, draft):
        _edit_json(model / "config.json", vocab_size=500)
    with pytest.raises(PreflightError, match="512 tokens.*target vocab_size 500"):
        run_preflight(_config(target, draft))


def _one_line_naming(error: Exception, key: str, *words: str) -> None:
    message = str(error)
    assert "\n" not in message and message.startswith(key), message
    for word in words:
        assert word in message.lower(), message


def test_tokenizer_dir_without_model_config_is_caught(pair, tmp_path):
    """transformers 5 picks the tokenizer class from config.json's model_type; without it
    the tiny pair's tokenizer.json loads as a plain backend whose pre-tokenizer differs from
    Qwen2Tokenizer's, so the same text gets other ids than the models were built with."""
    target, draft = pair
    served = tmp_path / "tokenizer"
    served.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(draft / name, served / name)
    with pytest.raises(PreflightError, match="encodes differently"):
        run_preflight(_config(target, draft, tokenizer=served))


def test_separate_tokenizer_is_compared_with_both_models(pair, tmp_path):
    target, draft = pair
    served = tmp_path / "tokenizer"
    served.mkdir()
    for name in (*TOKENIZER_FILES, "config.json"):
        shutil.copy(draft / name, served / name)
    assert run_preflight(_config(target, draft, tokenizer=served)).stop_token_ids == [0]
    _edit_json(served / "tokenizer_config.json", eos_token="<|eos|>")
    with pytest.raises(PreflightError, match="served tokenizer"):
        run_preflight(_config(target, draft, tokenizer=served))


def test_target_without_tokenizer_is_a_note(pair):
    target, draft = pair
    for name in TOKENIZER_FILES:
        (target / name).unlink()
    result = run_preflight(_config(target, draft))
    assert any("no tokenizer in the target model" in note for note in result.notes)


# ------------------------------------------------------------------------- stop ids


def test_stop_ids_from_target_generation_config_list(pair):
    target, draft = pair
    _edit_json(target / "generation_config.json", eos_token_id=[2, 1])
    assert model_eos_token_ids(str(target)) == ([2, 1], "generation_config.json")
    result = run_preflight(_config(target, draft))
    assert result.stop_token_ids == [2, 1, 0]  # then the served tokenizer's eos


def test_stop_ids_from_target_not_draft(pair):
    target, draft = pair
    _edit_json(target / "generation_config.json", eos_token_id=1)
    _edit_json(draft / "generation_config.json", eos_token_id=[2])
    assert run_preflight(_config(target, draft)).stop_token_ids == [1, 0]


def test_stop_ids_fall_back_to_config_then_tokenizer(pair):
    from transformers import AutoTokenizer

    target, draft = pair
    (target / "generation_config.json").unlink()
    _edit_json(target / "config.json", eos_token_id=2)
    assert model_eos_token_ids(str(target)) == ([2], "config.json")
    assert stop_token_ids(str(target)) == [2]
    assert stop_token_ids(str(target), AutoTokenizer.from_pretrained(draft)) == [2, 0]
    assert run_preflight(_config(target, draft)).stop_token_ids == [2, 0]
    _edit_json(target / "config.json", eos_token_id=None)
    assert model_eos_token_ids(str(target)) == ([], None)
    assert stop_token_ids(str(target)) == [0]


# ------------------------------------------------------------------------- tensor parallel


def test_over_long_max_model_len_fails_at_start_up_in_one_line(pair):
    with pytest.raises(PreflightError) as info:
        run_preflight(_config(*pair, max_model_len=100_000))
    _one_line_naming(info.value, "engine.max_model_len", "2048")


def test_tensor_parallel_not_dividing_the_heads_fails_in_one_line(pair):
    """vLLM's own rule (the draft's 3 heads and TP 4), raised before weights load."""
    with pytest.raises(PreflightError) as info:
        run_preflight(_config(*pair, tensor_parallel_size=4))
    _one_line_naming(info.value, "engine.tensor_parallel_size", "heads")


def test_draft_tensor_parallel_1_with_tp_2_fails_at_start_up_in_one_line(pair):
    """vLLM's config accepts it, but its draft-model proposer refuses it when the workers
    start (``DraftModelProposer._raise_if_draft_tp_mismatch``): kad-serve runs that check
    on the built config, so it fails before any weight loads."""
    target, draft = pair
    # Head counts TP 2 divides (the tiny draft has 3): the TP sizes alone are at fault.
    _edit_json(target / "config.json", num_attention_heads=6, num_key_value_heads=2)
    _edit_json(draft / "config.json", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(PreflightError) as info:
        run_preflight(_config(*pair, tensor_parallel_size=2, draft_tensor_parallel_size=1))
    _one_line_naming(info.value, "engine.draft_tensor_parallel_size", "1 and 2")
    result = run_preflight(_config(*pair, tensor_parallel_size=2))
    assert result.draft_tensor_parallel_size == 2


def test_an_unreadable_hub_id_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ServeConfig.model_validate({
        "models": {"target": "kad-test-no-such-org/base-13b",
                   "draft": "kad-test-no-such-org/chat-1b"},
        "engine": {"max_model_len": 4096, "num_speculative_tokens": 5},
    })
    with pytest.raises(PreflightError) as info:
        run_preflight(config)
    _one_line_naming(info.value, "models.target / models.draft")


# ------------------------------------------------------------------------- shipped configs

# The real config.json values of the shipped pairs' models (architecture fields only):
# * allenai/OLMo-2-1124-13B: huggingface.co/allenai/OLMo-2-1124-13B/blob/main/config.json
#   (max_position_embeddings 4096, 40 heads, 40 KV heads, vocab_size 100352, eos 100257).
# * allenai/OLMo-2-0425-1B-Instruct: its model card / config.json (OLMo 2 1B: hidden 2048,
#   16 layers, 16 heads, 16 KV heads, 4096 positions, the OLMo 2 vocab_size 100352).
# * Qwen/Qwen3-14B-Base: the Qwen3-14B model card (40 layers, GQA 40 Q / 8 KV heads,
#   head_dim 128, vocab_size 151936). Qwen3 *base* checkpoints ship
#   max_position_embeddings 32768 (the Qwen3-8B-Base config.json says so; the cards give a
#   native context of 32,768), the post-trained ones 40960; 32768 is the smaller, so the
#   stricter of the two, and both pass the shipped max_model_len values.
# * Qwen/Qwen3-1.7B: config.json / model card (28 layers, 16 Q / 8 KV heads, head_dim 128,
#   max_position_embeddings 40960, vocab_size 151936, tied embeddings, eos 151645).
REAL_MODELS = {
    "OLMo-2-1124-13B": {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40,
        "max_position_embeddings": 4096, "rope_scaling": None, "rope_theta": 500000,
        "vocab_size": 100352, "eos_token_id": 100257, "pad_token_id": 100277,
        "tie_word_embeddings": False,
    },
    "OLMo-2-0425-1B-Instruct": {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 4096, "rope_scaling": None, "rope_theta": 500000,
        "vocab_size": 100352, "eos_token_id": 100257, "pad_token_id": 100277,
        "tie_word_embeddings": False,
    },
    "Qwen3-14B-Base": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 32768, "rope_scaling": None, "rope_theta": 1000000,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643,
        "tie_word_embeddings": False,
    },
    "Qwen3-1.7B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rope_scaling": None, "rope_theta": 1000000,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": True,
    },
    # Qwen2.5-Coder: shapes as in the official config.json files (the 0.5B-Instruct's as
    # rebuilt by ../shared/tools/real-pair; the 1.5B base shares the 1.5B-Instruct's
    # shapes, with eos <|endoftext|> 151643 as Qwen base models have).
    "Qwen2.5-Coder-1.5B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643,
        "tie_word_embeddings": False,
    },
    "Qwen2.5-Coder-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": True,
    },
}


@pytest.fixture(scope="module")
def real_model_dirs(tiny_pair, tmp_path_factory):
    """Directories with the real models' config.json and the tiny tokenizer (the same for
    every model, so the tokenizer checks pass and the shapes and lengths are under test)."""
    root = tmp_path_factory.mktemp("real-configs")
    dirs = {}
    for name, config in REAL_MODELS.items():
        model = root / name
        model.mkdir()
        (model / "config.json").write_text(json.dumps(config, indent=2))
        for file in TOKENIZER_FILES:
            shutil.copy(tiny_pair.draft / file, model / file)
        dirs[name] = model
    return dirs


@pytest.mark.parametrize("config_path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_configs_pass_preflight(config_path, real_model_dirs, tiny_pair):
    config = load_config(config_path)
    paths = {**{name: str(path) for name, path in real_model_dirs.items()},
             "target": str(tiny_pair.target), "draft": str(tiny_pair.draft)}
    target, draft = Path(config.models.target).name, Path(config.models.draft).name
    assert target in paths and draft in paths, f"add {target} / {draft} to REAL_MODELS"
    config = config.model_copy(update={"models": config.models.model_copy(
        update={"target": paths[target], "draft": paths[draft], "tokenizer": None})})
    if config.engine.distributed_executor_backend == "ray":
        # vLLM's config refuses Ray's backend where Ray is not installed (the CPU build):
        # the shapes and lengths under test are the same with vLLM's own mp backend.
        config = config.model_copy(update={"engine": config.engine.model_copy(
            update={"distributed_executor_backend": "mp"})})

    result = run_preflight(config)

    limit = min(REAL_MODELS.get(name, {}).get("max_position_embeddings", 2048)
                for name in (target, draft))
    room = 2 * config.engine.num_speculative_tokens + 2
    assert result.model_position_limit == limit
    assert result.engine_max_model_len <= limit
    assert result.public_max_model_len == min(config.engine.max_model_len, limit - room)
    assert result.engine_max_model_len == result.public_max_model_len + room
    expected_tp = config.engine.draft_tensor_parallel_size or config.engine.tensor_parallel_size
    assert result.draft_tensor_parallel_size == expected_tp
    if target in REAL_MODELS:
        assert result.stop_token_ids[0] == REAL_MODELS[target]["eos_token_id"]


def test_olmo2_config_serves_4084(real_model_dirs):
    """configs/olmo2-1b-13b.yaml asks 4096 = OLMo 2's own length: served as 4096 - 12."""
    config = load_config(REPO / "configs" / "olmo2-1b-13b.yaml")
    config = config.model_copy(update={"models": config.models.model_copy(update={
        "target": str(real_model_dirs["OLMo-2-1124-13B"]),
        "draft": str(real_model_dirs["OLMo-2-0425-1B-Instruct"])})})
    result = run_preflight(config)
    assert (result.public_max_model_len, result.engine_max_model_len) == (4084, 4096)

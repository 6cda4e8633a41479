"""Model locations (directories or hub ids), command-line overrides, CPU engine choices."""

from __future__ import annotations

from pathlib import Path

from server.cli import apply_overrides, parse_args
from server.config import load_config, looks_like_hub_id
from server.engine.vllm_engine import cpu_has_native_bf16, engine_dtype

REPO = Path(__file__).resolve().parent.parent


def test_hub_ids_stay_hub_ids_and_directories_become_paths(tmp_path):
    config = load_config(REPO / "configs" / "qwen2.5-coder-1.5b-cpu.yaml")
    assert config.models.target == "Qwen/Qwen2.5-Coder-1.5B"
    assert config.models.draft == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    tiny = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert Path(tiny.models.target).is_absolute()  # a relative path, resolved
    assert looks_like_hub_id("org/name") and not looks_like_hub_id("./org/name")
    assert not looks_like_hub_id("models/tiny/target/x") and not looks_like_hub_id("name")


def test_target_and_draft_flags_override_the_config(tmp_path, monkeypatch):
    (tmp_path / "p").mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    args = parse_args(["--config", "x.yaml", "--target", "p", "--draft", "Org/Aligned-1B"])
    out = apply_overrides(config, args)
    assert out.models.target == str(tmp_path / "p")
    assert out.models.draft == "Org/Aligned-1B"
    assert out.build_tiny_models is False  # the demo pair is not built over real models


def test_auto_dtype_on_a_cpu_follows_native_bfloat16():
    assert cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16")
    assert cpu_has_native_bf16("flags : fpu avx2 amx_bf16")
    assert not cpu_has_native_bf16("flags : fpu avx2 avx512f")
    assert engine_dtype("auto", True, "flags : avx2") == "float32"
    assert engine_dtype("auto", True, "flags : avx2 avx512_bf16") == "bfloat16"
    assert engine_dtype("auto", False, "flags : avx2") == "auto"  # GPUs: the model's dtype
    assert engine_dtype("float16", True, "flags : avx2") == "float16"


def test_cpu_warm_up_is_sized_to_the_config(tiny_pair):
    from conftest import tiny_serve_config

    from server.engine.vllm_engine import engine_args

    args = engine_args(tiny_serve_config(tiny_pair, max_model_len=512, max_num_seqs=8,
                                         num_speculative_tokens=5))
    assert args.max_num_batched_tokens == 512 + 12  # the context, not a 4096-token floor
    args = engine_args(tiny_serve_config(tiny_pair, max_model_len=128, max_num_seqs=256,
                                         num_speculative_tokens=5))
    assert args.max_num_batched_tokens == 256 * 6  # every sequence's drafts in one step

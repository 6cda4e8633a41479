"""A tiny random model pair with a locally trained tokenizer: tests and the CPU demo.

No model hub is reachable, so tests, ``make serve`` and the benchmarks build their own
pair: a byte-level BPE tokenizer (ChatML template) trained on a built-in corpus, a ~1M
parameter "aligned" draft q* and a ~8M parameter "base" target p, both Qwen2 with
head_dim 64 (vLLM's CPU attention rejects smaller heads). Output weights are scaled so
next-token distributions are peaked and differ between the two models, which makes the
deferral rules defer some tokens and not others. Deterministic for a seed; built into a
temporary directory and renamed, so concurrent builders never see half-written models.

    python -m kad_kernels.tiny_models models/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILD_VERSION = 1
MARKER = "kad-tiny-pair.json"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = """
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many
clips in May. How many clips did Natalia sell altogether in April and May?
Answer: Natalia sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips.
The answer is 72.
Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of
babysitting. How much did she earn? Answer: 12 / 60 = 0.2 per minute, 0.2 x 50 = 10.
The answer is 10. What is two plus two? Two plus two is four. What is 3 times 7? It is 21.
The quick brown fox jumps over the lazy dog. A helpful assistant answers the question
step by step and gives the final number at the end. Let's think step by step.
user: Please explain why the sky is blue. assistant: Sunlight is scattered by the air,
and blue light is scattered more than red light, so the sky looks blue.
1,000 + 2,500 = 3,500. -4 + 10 = 6. 0.5 * 8 = 4. 100 - 37 = 63. 12 / 4 = 3.
"""


@dataclass(frozen=True)
class TinyPair:
    """Where a built pair lives: ``draft`` (aligned q*) and ``target`` (base p) model dirs."""

    root: Path
    draft: Path
    target: Path


# name -> (hidden, layers, intermediate, output scale, seed offset)
_SHAPES = {
    "draft": (192, 2, 512, 16.0, 1),
    "target": (384, 4, 1024, 12.0, 2),
}
# Shapes whose head counts split over two tensor-parallel ranks (target 4 heads / 2 KV
# heads, draft 2 heads / 1 KV head, replicated): the TP=2 engine test's pair.
_TP2_SHAPES = {
    "draft": (128, 2, 512, 16.0, 1),
    "target": (256, 4, 1024, 12.0, 2),
}


def _marker(seed: int, tp2: bool = False) -> dict:
    marker = {"version": BUILD_VERSION, "seed": seed, "vocab_size": VOCAB_SIZE}
    return marker | {"tp2": True} if tp2 else marker


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_model(name: str, vocab: int, eos_id: int, seed: int, tp2: bool = False):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    hidden, layers, intermediate, scale, offset = (_TP2_SHAPES if tp2 else _SHAPES)[name]
    torch.manual_seed(seed * 100 + offset)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1 if hidden % 128 else hidden // 128,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=True
    )
    return model


def _complete(root: Path, seed: int, tp2: bool = False) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == _marker(seed, tp2)
    except (OSError, ValueError):
        return False


def build_tiny_pair(root: str | Path = "models/tiny", seed: int = 0, force: bool = False,
                    tp2: bool = False) -> TinyPair:
    """Build (or reuse) the pair under ``root``; returns its paths. ``tp2``: head counts
    that split over two tensor-parallel ranks."""
    root = Path(root)
    pair = TinyPair(root=root, draft=root / "draft", target=root / "target")
    if not force and _complete(root, seed, tp2):
        return pair
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        tokenizer = _train_tokenizer()
        for name in ("draft", "target"):
            model = _build_model(name, len(tokenizer), tokenizer.eos_token_id, seed, tp2)
            model.save_pretrained(staging / name, safe_serialization=True)
            tokenizer.save_pretrained(staging / name)
        (staging / MARKER).write_text(json.dumps(_marker(seed, tp2)))
        if _complete(root, seed, tp2) and not force:  # another process finished first
            return pair
        old = None
        if root.exists():
            old = root.with_name(f".{root.name}-old-{os.getpid()}")
            root.rename(old)
        staging.rename(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny random model pair.")
    parser.add_argument("root", nargs="?", default="models/tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    pair = build_tiny_pair(args.root, seed=args.seed, force=args.force)
    print(f"draft (aligned q*): {pair.draft}\ntarget (base p):    {pair.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

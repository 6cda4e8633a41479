"""Reference two-model decoder on Hugging Face ``transformers``: the test oracle and the
"research code" baseline of the benchmarks.

Batch size 1, clarity over speed. Sampling parameters act as in the server: the
temperature applies to both models, top-k/top-p truncate the base model's ``p`` (the
aligned model's ``q*`` is the draft distribution and is used at the temperature only);
temperature 0 means the argmax of ``pi`` (computed at temperature 1).

* ``generate_ar``: every step computes ``p``, ``q*`` and ``pi`` and samples from ``pi``.
* ``generate_speculative``: q* drafts ``gamma`` tokens, one target forward scores them,
  ``speculative_verify`` accepts/rejects; the bonus position uses ``q*`` from one more
  draft forward, so every emitted token is distributed exactly as ``pi``. Both KV caches
  are cropped back to the accepted prefix after each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kad_kernels.mixture import mix, mixture_stats
from kad_kernels.rules import TWO_MODEL_RULES
from kad_kernels.sampling import probs_from_logits, sample_rows
from kad_kernels.speculative import speculative_verify


@dataclass
class DecodeResult:
    """Generated ids (prompt excluded) and what it took to get them."""

    token_ids: list[int]
    drafted: int = 0
    accepted: int = 0
    alphas: list[float] = field(default_factory=list)  # deferred mass per generated position
    acceptance: list[float] = field(default_factory=list)  # 1 - TV(pi, q*) per position
    wall_s: float = 0.0

    @property
    def emitted(self) -> int:
        return len(self.token_ids)


class _Cached:
    """One model with its KV cache over the tokens fed so far."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None
        self.length = 0

    def reset(self) -> None:
        self.cache, self.length = None, 0

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` after the cached prefix; return their logits ``[len(ids), V]``."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        device = next(self.model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        out = self.model(input_ids=inputs, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.length += len(ids)
        return out.logits[0].float()

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # negative: drop that many tokens
        self.length = length


class ReferenceDecoder:
    """Mixture decoding of ``target`` (base p) steered by ``draft`` (aligned q*)."""

    def __init__(
        self,
        target_model,
        draft_model,
        rule: str,
        param: float | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ) -> None:
        if rule not in TWO_MODEL_RULES:
            raise ValueError(f"the reference decoder serves the two-model rules, not {rule!r}")
        self.target = _Cached(target_model.eval())
        self.draft = _Cached(draft_model.eval())
        self.rule, self.param = rule, param
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.greedy = temperature == 0
        self.eos_token_id = eos_token_id
        # On p only, before the temperature, over every token of the prefix (vLLM's
        # repetition penalty: prompt and output tokens); ``next_distributions`` only.
        self.repetition_penalty = repetition_penalty
        # On p only, after the repetition penalty, over the generated tokens (OpenAI's and
        # vLLM's presence and frequency penalties); ``next_distributions`` only.
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        # Added to p's logits before the penalties (vLLM's order); -100 or below bans the
        # token from p and pi (OpenAI's "ban"); ``next_distributions`` only.
        self.logit_bias = dict(logit_bias or {})

    @classmethod
    def from_paths(cls, target: str | Path, draft: str | Path, rule: str, **kwargs) -> ReferenceDecoder:
        from transformers import AutoModelForCausalLM

        dtype = kwargs.pop("dtype", torch.float32)
        device = kwargs.pop("device", "cpu")
        load = {"dtype": dtype}
        target_model = AutoModelForCausalLM.from_pretrained(target, **load).to(device)
        draft_model = AutoModelForCausalLM.from_pretrained(draft, **load).to(device)
        kwargs.setdefault("eos_token_id", target_model.config.eos_token_id)
        return cls(target_model, draft_model, rule, **kwargs)

    # -- distributions ---------------------------------------------------------------------
    def _p(self, target_logits: torch.Tensor) -> torch.Tensor:
        temperature = 1.0 if self.greedy else self.temperature
        return probs_from_logits(target_logits, temperature, self.top_k, self.top_p)

    def _q(self, draft_logits: torch.Tensor) -> torch.Tensor:
        return probs_from_logits(draft_logits, 1.0 if self.greedy else self.temperature)

    def _distributions(self, target_logits: torch.Tensor, draft_logits: torch.Tensor):
        return self._p(target_logits), self._q(draft_logits)

    @torch.inference_mode()
    def next_distributions(self, prefix_ids: list[int], generated: int = 0,
                           allowed: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p, q*, pi)`` for the token after ``prefix_ids`` (no cache), float32 ``[V]``;
        the last ``generated`` tokens of the prefix are output (presence and frequency
        penalties count those only). ``allowed`` ``[V]`` (bool): a constraint's tokens (a
        grammar's mask): p is taken over them before mixing (as vLLM masks its logits),
        and pi is masked to them after mixing and renormalised (q* is not masked)."""
        device = next(self.target.model.parameters()).device
        ids = torch.tensor([prefix_ids], device=device)
        target_logits = self.target.model(input_ids=ids).logits[0, -1].float()
        draft_logits = self.draft.model(input_ids=ids).logits[0, -1].float()
        banned = [token for token, bias in self.logit_bias.items() if bias <= -100]
        if banned:
            kept = torch.ones_like(target_logits, dtype=torch.bool)
            kept[banned] = False
            allowed = kept if allowed is None else allowed.to(kept.device) & kept
        for token, bias in self.logit_bias.items():
            target_logits[token] += bias
        if self.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prefix_ids)), device=target_logits.device)
            values = target_logits[seen]
            target_logits[seen] = torch.where(values > 0, values / self.repetition_penalty,
                                              values * self.repetition_penalty)
        if generated and (self.presence_penalty or self.frequency_penalty):
            output = torch.tensor(prefix_ids[len(prefix_ids) - generated:],
                                  device=target_logits.device)
            counts = torch.bincount(output, minlength=target_logits.shape[-1]).float()
            target_logits -= self.frequency_penalty * counts
            target_logits -= self.presence_penalty * (counts > 0).float()
        if allowed is not None:
            target_logits = target_logits.masked_fill(~allowed.to(target_logits.device),
                                                      float("-inf"))
        p, q_star = self._distributions(target_logits, draft_logits)
        pi = mix(p, q_star, self.rule, self.param)
        if allowed is not None:
            pi = pi * allowed.to(pi.device)
            pi = pi / pi.sum()
        return p.cpu(), q_star.cpu(), pi.cpu()

    @torch.inference_mode()
    def score_prompts(self, prompts: list[list[int]], batch_size: int = 8,
                      positions_per_chunk: int = 256) -> list[list[float]]:
        """log pi of each prompt token from position 1, at temperature 1 (the unscaled
        distributions logprobs report): the two-model ``transformers`` loop a researcher
        writes, one full forward of each model per batch of right-padded prompts, the
        mixture taken ``positions_per_chunk`` positions at a time."""
        device = next(self.target.model.parameters()).device
        scores: list[list[float]] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            for row, prompt in enumerate(batch):
                ids[row, :len(prompt)] = torch.tensor(prompt, device=device)
                mask[row, :len(prompt)] = 1
            target = self.target.model(input_ids=ids, attention_mask=mask).logits
            draft = self.draft.model(input_ids=ids, attention_mask=mask).logits
            for row, prompt in enumerate(batch):
                values: list[float] = []
                for lo in range(0, len(prompt) - 1, positions_per_chunk):
                    hi = min(len(prompt) - 1, lo + positions_per_chunk)
                    pi = mix(target[row, lo:hi].float().softmax(-1),
                             draft[row, lo:hi].float().softmax(-1), self.rule, self.param)
                    following = torch.tensor(prompt[lo + 1:hi + 1], device=device)
                    values += pi.gather(-1, following.unsqueeze(-1)).log().squeeze(-1).tolist()
                scores.append(values)
        return scores

    def _no_penalty(self, what: str) -> None:
        if (self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                or self.logit_bias):
            raise ValueError(f"{what} does not apply penalties or biases; "
                             "use next_distributions")

    def _pick(self, pi: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.greedy:
            return int(pi.argmax())
        return int(sample_rows(pi.unsqueeze(0), generator)[0])

    # -- autoregressive ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ar(
        self, prompt_ids: list[int], max_new_tokens: int, generator: torch.Generator | None = None
    ) -> DecodeResult:
        self._no_penalty("generate_ar")
        start = time.perf_counter()
        self.target.reset()
        self.draft.reset()
        result = DecodeResult(token_ids=[])
        target_logits = self.target.feed(prompt_ids)[-1]
        draft_logits = self.draft.feed(prompt_ids)[-1]
        while len(result.token_ids) < max_new_tokens:
            p, q_star = self._distributions(target_logits, draft_logits)
            stats = mixture_stats(p, q_star, self.rule, self.param)
            token = self._pick(stats.pi, generator)
            result.token_ids.append(token)
            result.alphas.append(float(stats.alpha))
            result.acceptance.append(float(stats.acceptance))
            if token == self.eos_token_id:
                break
            target_logits = self.target.feed([token])[-1]
            draft_logits = self.draft.feed([token])[-1]
        result.wall_s = time.perf_counter() - start
        return result

    # -- speculative ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_speculative(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        gamma: int = 5,
        generator: torch.Generator | None = None,
    ) -> DecodeResult:
        self._no_penalty("generate_speculative")
        start = time.perf_counter()
        self.target.reset()
        self.draft.reset()
        result = DecodeResult(token_ids=[])
        # Invariant at the top of each step: both caches hold prompt + emitted tokens, and
        # ``last_*`` are the models' logits for the next position.
        last_target = self.target.feed(prompt_ids)[-1]
        last_draft = self.draft.feed(prompt_ids)[-1]
        base_len = len(prompt_ids)
        while len(result.token_ids) < max_new_tokens:
            # Draft gamma tokens from q*, and q* at the bonus position (one more forward).
            drafts: list[int] = []
            q_rows = [self._q(last_draft)]
            for _ in range(gamma):
                drafts.append(int(sample_rows(q_rows[-1].unsqueeze(0), generator)[0]))
                q_rows.append(self._q(self.draft.feed([drafts[-1]])[-1]))
            # One target forward over the drafts gives p at the gamma + 1 positions.
            target_rows = torch.cat([last_target.unsqueeze(0), self.target.feed(drafts)])
            p_all = torch.stack([self._p(row) for row in target_rows])
            q_all = torch.stack(q_rows)
            stats = mixture_stats(p_all, q_all, self.rule, self.param)
            tokens, emitted = speculative_verify(
                stats.pi.unsqueeze(0), q_all[:gamma].unsqueeze(0), torch.tensor([drafts]),
                generator=generator, greedy=self.greedy,
            )
            n = int(emitted[0])
            result.drafted += gamma
            result.accepted += n - 1 if n <= gamma else gamma
            for j, token in enumerate(int(t) for t in tokens[0, :n]):
                result.token_ids.append(token)
                result.alphas.append(float(stats.alpha[j]))
                result.acceptance.append(float(stats.acceptance[j]))
                if token == self.eos_token_id or len(result.token_ids) >= max_new_tokens:
                    result.wall_s = time.perf_counter() - start
                    return result
            # Both caches hold prefix + all drafts: keep prefix + accepted, feed the new token.
            keep = base_len + len(result.token_ids) - 1
            self.target.crop(keep)
            self.draft.crop(keep)
            last_target = self.target.feed([result.token_ids[-1]])[-1]
            last_draft = self.draft.feed([result.token_ids[-1]])[-1]
        result.wall_s = time.perf_counter() - start
        return result

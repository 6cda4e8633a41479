"""The hook's per-engine context and the drafter's sampling pass, on hand-made tensors."""

from __future__ import annotations

import ast
import copy
import importlib
import pickle
import pkgutil
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import server.engine
from server.engine.hook_context import DraftPass, HookContext, NextDrafts
from server.engine.hook_settings import HookSettings, context_of
from server.engine.verification_hook import RowAlignment, unscaled_log_pi


def _metadata(temperature: list[float], generators=None) -> SimpleNamespace:
    t = torch.tensor(temperature)
    return SimpleNamespace(temperature=t, generators=generators or {},
                           all_greedy=False, all_random=bool((t >= 1e-5).all()))


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_q_star_from_bf16_logits_gives_log_pi_to_1e_3(temperature):
    """A bf16 drafter at V = 151,936 with realistic logit peaks: q* is formed in float32,
    so the unscaled q* that logprobs under pi rebuild (``q_T ** T``) is within 1e-3 nat of
    the float64 truth (divided in bf16, as upstream does, it is off by ~0.1 nat)."""
    vocab = 151_936
    gen = torch.Generator().manual_seed(0)
    logits = (2.5 * torch.randn(2, vocab, generator=gen)).to(torch.bfloat16)
    logits[:, :8] += torch.tensor([24.0, 23.5, 23.0, 22.0, 21.0, 20.0, 19.0, 18.0])
    logits = logits.to(torch.bfloat16)
    exact = torch.log_softmax(logits.double(), dim=-1)  # unscaled q*, float64
    _, q_t = DraftPass(["a", "b"], {}).sample(logits.clone(), _metadata([temperature] * 2))
    # What logprobs report for rule "aligned" (pi = q*): the unscaled q* rebuilt from q_T.
    rows = [RowAlignment("a", "aligned"), RowAlignment("b", "aligned")]
    log_pi = unscaled_log_pi(torch.zeros(2, vocab), q_t, torch.tensor([temperature] * 2),
                             rows, torch.arange(2).numpy())
    top = exact.topk(1000, dim=-1).indices  # where the mass is (and logprobs look)
    error = (log_pi.double().gather(-1, top) - exact.gather(-1, top)).abs().max()
    assert float(error) <= 1e-3
    # The upstream way (divide the bf16 logits in bf16) is what this guards against.
    upstream = (logits / temperature).softmax(-1, dtype=torch.float32)
    log_pi_upstream = unscaled_log_pi(torch.zeros(2, vocab), upstream,
                                      torch.tensor([temperature] * 2), rows,
                                      torch.arange(2).numpy())
    assert float((log_pi_upstream.double().gather(-1, top)
                  - exact.gather(-1, top)).abs().max()) > 1e-2


def test_a_seeded_row_draws_from_its_own_generator_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))

    def draw(seed_global: int) -> list[int]:
        torch.manual_seed(seed_global)
        generators = {1: torch.Generator().manual_seed(7)}
        tokens, _ = DraftPass(["a", "b", "c"], {}).sample(logits.clone(),
                                                          _metadata([1.0] * 3, generators))
        return tokens.tolist()

    first, second = draw(0), draw(1)
    assert first[1] == second[1]  # the seeded row ignores the global RNG
    assert any(draw(s)[0] != first[0] for s in range(2, 12))  # the others do not


def test_greedy_drafts_follow_their_request_by_id():
    """Rows are found by request id in the pass's batch order; a greedy row drafts the
    argmax of q* at every draft step; q* itself is unchanged."""
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    draft_pass = DraftPass(["other", "greedy", "third"], {"greedy": NextDrafts(greedy=True)})
    metadata = _metadata([1.0] * 3)
    steps = [draft_pass.sample(logits.clone(), metadata) for _ in range(4)]
    assert all(int(tokens[1]) == int(logits[1].argmax()) for tokens, _ in steps)
    assert any(int(tokens[0]) != int(logits[0].argmax()) for tokens, _ in steps)
    torch.testing.assert_close(steps[0][1], torch.softmax(logits, -1))


def test_a_context_is_per_process_and_shared_within_one():
    settings = HookSettings("tcp://127.0.0.1:1")
    settings.context.next_drafts["r"] = NextDrafts(greedy=True)
    shipped = pickle.loads(pickle.dumps(settings))
    assert shipped == settings and shipped.context.next_drafts == {}
    assert copy.deepcopy(settings).context is settings.context
    assert context_of(SimpleNamespace(additional_config=settings)) is settings.context
    assert context_of(SimpleNamespace(additional_config={})) is None
    assert isinstance(settings.context, HookContext)


def test_a_requests_settings_are_parsed_once_while_it_is_in_the_batch(monkeypatch):
    """``rows_of`` parses a request's ``extra_args`` the first step it is in the batch and
    reuses them after; a request that left is forgotten (parsed again if it returns)."""
    parsed = []
    original = RowAlignment.from_extra_args.__func__

    def counting(cls, extra_args):
        parsed.append((extra_args or {}).get("kad", {}).get("id"))
        return original(cls, extra_args)

    monkeypatch.setattr(RowAlignment, "from_extra_args", classmethod(counting))

    def request(name, kad=True):
        extra = {"kad": {"id": name, "rule": "kad_dual", "param": 0.4}} if kad else None
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))

    requests = {"a": request("a"), "b": request("b"), "c": request("c", kad=False)}
    context = HookContext()
    first = context.rows_of(["a", "b", "c"], requests)
    assert [r.request_id if r else None for r in first] == ["a", "b", None]
    for _ in range(5):
        assert context.rows_of(["b", "a", "c"], requests) == [first[1], first[0], None]
    assert parsed == ["a", "b", None]
    context.rows_of(["b"], requests)  # a and c left the batch
    context.rows_of(["a", "b"], requests)
    assert parsed == ["a", "b", None, "a"] and set(context.rows) == {"a", "b"}


def test_scoring_requests_are_known_by_id_among_the_batchs_rows():
    def request(kad):
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=kad))

    requests = {"s": request({"kad": {"id": "s", "rule": "kad_dual", "param": 0.4,
                                      "scores": True}}),
                "g": request({"kad": {"id": "g", "rule": "kad_dual", "param": 0.4}}),
                "v": request(None)}
    context = HookContext()
    context.rows_of(["g", "s", "v"], requests)
    assert [context.scores(r) for r in ("s", "g", "v", "gone")] == [True, False, False, False]
    context.rows_of(["g"], requests)  # the scoring request left the batch
    assert not context.scores("s")


_IMMUTABLE = (int, float, str, bytes, bool, type(None), tuple, frozenset,
              types.MappingProxyType, types.ModuleType, types.FunctionType, type,
              types.BuiltinFunctionType)


# Process-wide by nature: fork hooks and the parent watch belong to the process, not to an
# engine (``os.register_at_fork`` has no per-engine scope).
_PROCESS_WIDE = {"process_guard"}


def test_server_engine_keeps_no_module_level_mutable_state():
    """Every global of every ``server.engine`` module is a constant, a function, a class, a
    module, a logger, a stateless encoder, or the scoped ContextVar; no module rebinds a
    global."""
    import __future__

    import logging
    from contextvars import ContextVar
    from typing import TypeVar

    import msgspec

    package = Path(server.engine.__file__).parent
    offenders = []
    allowed = _IMMUTABLE + (logging.Logger, ContextVar, TypeVar, __future__._Feature,
                            msgspec.msgpack.Encoder)
    for info in pkgutil.iter_modules([str(package)]):
        if info.name in _PROCESS_WIDE:
            continue
        name = f"server.engine.{info.name}"
        module = importlib.import_module(name)
        for key, value in vars(module).items():
            if key.startswith("__") or callable(value) and not isinstance(value, (dict, list)):
                continue
            if isinstance(value, allowed):
                if isinstance(value, tuple) and any(isinstance(v, (dict, list, set))
                                                    for v in value):
                    offenders.append(f"{name}.{key}")
                continue
            offenders.append(f"{name}.{key} ({type(value).__name__})")
        tree = ast.parse((package / f"{info.name}.py").read_text())
        offenders += [f"{name}: global {', '.join(node.names)}" for node in ast.walk(tree)
                      if isinstance(node, ast.Global)]
    assert offenders == [], "\n".join(offenders)

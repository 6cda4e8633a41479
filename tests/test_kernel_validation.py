"""Bad input to the kernels and to the alignment settings fails with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kad_kernels import (
    RULE_SPECS,
    RULES,
    TWO_MODEL_RULES,
    deferral,
    mix,
    mix_with_alpha,
    speculative_verify,
)
from kad_kernels.rules import PARAM_NAMES
from server.alignment import AlignmentSettings

P = torch.tensor([[0.5, 0.3, 0.2]])
Q = torch.tensor([[0.2, 0.3, 0.5]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mix(P, Q, "no_such_rule"), "unknown rule"),
        (lambda: mix(P, Q, "kad_dual"), "needs its parameter 'lam'"),
        (lambda: mix(P, Q, "kad_dual", 1.5), "lam"),
        (lambda: mix(P, Q, "kad_dual", -0.1), "lam"),
        (lambda: mix(P, Q, "kad_primal", float("nan")), "budget"),
        (lambda: mix(P, Q, "base", 0.3), "takes no parameter"),
        (lambda: mix(P, Q, "kad_dual", torch.tensor([0.1, 0.2, 0.3])), "lam"),
        (lambda: mix(P, torch.tensor([[0.5, 0.5]]), "aligned"), "shape"),
        (lambda: mix(torch.tensor([[float("nan"), 0.5, 0.5]]), Q, "base"), "NaN"),
        (lambda: mix(torch.tensor([[-0.1, 0.6, 0.5]]), Q, "base"), "negative"),
        (lambda: mix(torch.tensor([[float("inf"), 0.5, 0.5]]), Q, "base"), "inf"),
        (lambda: mix(torch.zeros(1, 3), Q, "base"), "zero"),
        (lambda: mix(P, Q, "implicit_reward"), "q_base"),
        (lambda: deferral(P, Q, "implicit_reward"), "no deferral vector"),
        (lambda: speculative_verify(P.unsqueeze(0), Q.unsqueeze(0), torch.tensor([0])), "[B, G]"),
        (lambda: speculative_verify(P.unsqueeze(0), Q.unsqueeze(0), torch.tensor([[3]])), "[0, 3)"),
        (lambda: speculative_verify(P.unsqueeze(0), Q.unsqueeze(0), torch.tensor([[0.5]])),
         "integer"),
        (lambda: speculative_verify(P.expand(1, 4, 3), Q.unsqueeze(0), torch.tensor([[0]])),
         "pi must have shape"),
        (lambda: speculative_verify(P.expand(1, 2, 3), Q.expand(1, 3, 3), torch.tensor([[0]])),
         "q_star must have shape"),
        (lambda: speculative_verify(P.unsqueeze(0), Q.unsqueeze(0), torch.tensor([[-1]])),
         "[0, 3)"),
        (lambda: speculative_verify(torch.full((1, 1, 3), float("nan")), Q.unsqueeze(0),
                                    torch.tensor([[0]])), "pi contains nan"),
        (lambda: speculative_verify(P.unsqueeze(0), torch.zeros(1, 1, 3), torch.tensor([[0]])),
         "q_star has a row with zero total"),
        (lambda: mix(P, Q, "kad_dual", True), "must be a number"),
        (lambda: mix(P, Q, "kad_dual", "0.4"), "must be a number"),
        (lambda: mix(P, Q, "kad_dual", torch.tensor([float("nan")])), "finite"),
        (lambda: mix(P, Q, "kad_dual", float("inf")), "finite"),
        (lambda: mix(P, Q, "kad_perceptron", torch.tensor([0.1, 2.0])), "must lie in"),
        (lambda: mix(P.expand(2, 3), Q.expand(2, 3), "kad_dual", torch.tensor([[0.1, 0.2]])),
         "does not broadcast"),
        (lambda: mix(P.expand(2, 3), Q.expand(2, 3), "kad_dual", torch.tensor([0.1, 0.2, 0.3])),
         "does not broadcast"),
        (lambda: mix(P.long(), Q, "base"), "floating-point"),
        (lambda: mix([0.5, 0.5], Q, "base"), "torch.tensor"),
        (lambda: mix(P, Q, "implicit_reward", q_base=torch.ones(1, 4)), "shape mismatch"),
        (lambda: mix(P, Q, "implicit_reward", 0.3, q_base=Q), "takes no parameter"),
        (lambda: mix(P, torch.tensor([[0.5, float("inf"), 0.5]]), "base"), "q_star contains inf"),
    ],
)
def test_kernel_errors_name_the_problem(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message.lower() in str(error.value).lower()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rule": "nope"}, "unknown rule 'nope'"),
        ({"rule": "kad_dual", "budget": 0.5}, "takes 'lam'"),
        ({"rule": "kad_dual", "lam": 2}, "must lie in [0.0, 1.0]"),
        ({"rule": "base", "lam": 0.4}, "takes no parameter"),
        ({"rule": "kad_dual", "lam": 0.4, "extra": 1}, "extra"),
        ({"rule": "kad_primal", "budget": -0.1}, "must lie in [0.0, 1.0]"),
        ({"rule": "kad_dual", "lam": float("nan")}, "must lie in"),
        ({"rule": "kad_zero_one", "mu": 0.1}, "takes no parameter, got 'mu'"),
        ({"rule": "confidence_bet", "lam": 0.2, "mu": 0.1}, "takes 'lam', got 'mu'"),
        ({"lam": 0.4}, "rule"),
    ],
)
def test_alignment_settings_errors(settings, message):
    with pytest.raises(ValidationError) as error:
        AlignmentSettings(**settings)
    assert message.lower() in str(error.value).lower()


def test_rule_specs_are_the_one_definition_of_rules_and_what_is_served():
    """The API's parameter fields, the engines' refusals and the reference decoder's rules
    all follow ``RULE_SPECS``."""
    from kad_kernels.reference import ReferenceDecoder
    from server.engine.vllm_engine import UNSUPPORTED_RULES

    assert set(AlignmentSettings.model_fields) == {"rule", *PARAM_NAMES}
    assert set(UNSUPPORTED_RULES) == {"implicit_reward"} == set(RULES) - set(TWO_MODEL_RULES)
    assert "third model" in UNSUPPORTED_RULES["implicit_reward"]
    for rule in UNSUPPORTED_RULES:
        with pytest.raises(ValueError, match="two-model rules"):
            ReferenceDecoder(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), rule)
    for name, spec in RULE_SPECS.items():  # every default passes the API's own check
        assert AlignmentSettings.paper_default(name).param == spec.default


def test_alignment_settings_round_trip():
    settings = AlignmentSettings(rule="kad_primal", budget=0.6)
    assert settings.param == 0.6
    assert settings.as_extra_args() == {"rule": "kad_primal", "param": 0.6}
    assert AlignmentSettings.paper_default("kad_dual") == AlignmentSettings(rule="kad_dual", lam=0.4)


def test_every_call_validates_its_inputs():
    """A tensor validated once is checked again after writes in place (also through a
    view), and new tensors at a reused address are checked too."""
    q = torch.softmax(torch.randn(2, 3, 50), dim=-1)
    p = torch.softmax(torch.randn(2, 3, 50), dim=-1)
    mix(p, q, "kad_dual", 0.4)
    q[0, 0, 7] = -1.0
    with pytest.raises(ValueError, match="negative"):
        mix(p, q, "kad_dual", 0.4)
    q[0, 0, 7] = 0.0
    q[:, :, 3:5].mul_(float("nan"))  # through a view
    with pytest.raises(ValueError, match="NaN"):
        mix(p, q, "kad_dual", 0.4)
    for _ in range(20):  # fresh tensors, likely at the addresses just freed
        fresh = torch.softmax(torch.randn(2, 3, 50), dim=-1)
        mix(p, fresh, "kad_dual", 0.4)
        del fresh
        bad = torch.softmax(torch.randn(2, 3, 50), dim=-1)
        bad[1, 2, 0] = -0.5
        with pytest.raises(ValueError, match="negative"):
            mix(p, bad, "kad_dual", 0.4)


def test_verification_ignores_q_star_at_the_bonus_position():
    """q_star [B, G+1, V] (what mix was given) verifies exactly like its first G rows."""
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, 3, 40, generator=gen), dim=-1)
    q = torch.softmax(torch.randn(4, 3, 40, generator=gen), dim=-1)
    drafts = torch.randint(0, 40, (4, 2), generator=gen)
    pi = mix(p, q, "kad_dual", 0.4)
    whole = speculative_verify(pi, q, drafts, torch.Generator().manual_seed(9))
    sliced = speculative_verify(pi, q[:, :2].clone(), drafts, torch.Generator().manual_seed(9))
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])


def test_kernels_run_on_inference_mode_tensors():
    """vLLM samples under torch.inference_mode: its tensors (no version counter) work and
    are validated every time."""
    with torch.inference_mode():
        p = torch.softmax(torch.randn(2, 4, 30), dim=-1)
        q = torch.softmax(torch.randn(2, 4, 30), dim=-1)
        for _ in range(2):
            pi, alpha = mix_with_alpha(p, q, "kad_dual", 0.4)
            assert torch.allclose(pi.sum(-1), torch.ones(2, 4)) and alpha.shape == (2, 4)
        tokens, emitted = speculative_verify(pi, q, torch.zeros(2, 3, dtype=torch.long))
        assert tokens.shape == (2, 4) and bool((emitted >= 1).all())
        bad = q.clone()
        bad[0, 0, 0] = -1.0
        with pytest.raises(ValueError, match="negative"):
            mix(p, bad, "kad_dual", 0.4)


@pytest.mark.parametrize("rule", [name for name, spec in RULE_SPECS.items() if spec.param])
def test_a_rule_without_its_parameter_takes_the_readmes_default(rule):
    spec = RULE_SPECS[rule]
    for given in ({"rule": rule}, {"rule": rule, spec.param: None}):
        settings = AlignmentSettings(**given)
        assert settings.param == spec.default
        assert settings.as_extra_args() == {"rule": rule, "param": spec.default}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"| `{rule}` | `{spec.param}` ({spec.default:g})" in readme

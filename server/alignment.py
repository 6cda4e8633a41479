"""Per-request alignment settings (the ``kad`` object) shared by the config file and the API.

Validated here, before anything reaches the engine, so a bad rule or parameter is a clear
400 for its own request and never an error inside a batched engine step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from kad_kernels.rules import PARAM_NAMES, RULE_SPECS, RULES, check_named_param
from server.errors import clip


class AlignmentSettings(BaseModel):
    """``{"rule": "kad_dual", "lam": 0.4}``: a rule and, if it has one, its parameter by name
    (left out or null: the rule's default, ``RULE_SPECS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Strict: a JSON number (an integer is one), never a string such as "0.4".
    rule: StrictStr
    lam: float | None = Field(None, strict=True)
    mu: float | None = Field(None, strict=True)
    budget: float | None = Field(None, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _default_param(cls, data: Any) -> Any:
        """A rule sent without its parameter takes the default of the README's table (the
        response's ``kad.param`` shows it); a foreign parameter is left for ``_check``."""
        if not isinstance(data, dict):
            return data
        spec = RULE_SPECS.get(data.get("rule")) if isinstance(data.get("rule"), str) else None
        if spec is None or spec.param is None or data.get(spec.param) is not None:
            return data
        if any(data.get(name) is not None for name in PARAM_NAMES):
            return data  # a foreign parameter: "takes 'lam', got 'mu'"
        return {**data, spec.param: spec.default}

    @model_validator(mode="after")
    def _check(self) -> AlignmentSettings:
        if self.rule not in RULES:  # the kernels' message would quote the whole name
            raise ValueError(f"unknown rule {clip(self.rule)!r}; expected one of "
                             f"{', '.join(RULES)}")
        given = {name: getattr(self, name) for name in PARAM_NAMES if getattr(self, name) is not None}
        check_named_param(self.rule, given)  # the kernels' own check: names, ranges, messages
        return self

    @property
    def param(self) -> float | None:
        """The rule's parameter value (None for parameterless rules)."""
        name = RULE_SPECS[self.rule].param
        return None if name is None else getattr(self, name)

    def as_extra_args(self) -> dict[str, Any]:
        """What travels to the engine with the request (``SamplingParams.extra_args['kad']``)."""
        return {"rule": self.rule, "param": self.param}

    @classmethod
    def paper_default(cls, rule: str) -> AlignmentSettings:
        """The rule with the paper's default parameter (for configs and benchmarks)."""
        spec = RULE_SPECS[rule]
        return cls(rule=rule, **({spec.param: spec.default} if spec.param else {}))

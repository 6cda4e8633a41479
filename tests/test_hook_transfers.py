"""Host/device transfers of one hook step: at most one blocking device-to-host read, and
every host-to-device copy through ``to_device`` (pinned, non-blocking off the CPU).

On the CPU every tensor is on the host, so the count is taken where a CUDA step would
transfer: reads of a tensor's values into Python or NumPy (``.cpu()``, ``.numpy()``,
``.tolist()``, ``.item()``, ``bool()``/``int()``/``float()``) of tensors that live on the
device on CUDA, and tensors built from host data (``torch.tensor``, ``torch.as_tensor``,
``torch.from_numpy``). vLLM's own host tensors (``*_cpu`` buffers) are not device data.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from test_hook_memory import GAMMA, real_step

MIXED_BATCH = [
    {"id": "dual", "rule": "kad_dual", "param": 0.4, "logprobs": 5},
    {"id": "bet-greedy", "rule": "confidence_bet", "param": 0.2, "greedy": True},
    {"id": "aligned", "rule": "aligned", "param": None},
    {"id": "primal", "rule": "kad_primal", "param": 0.9, "logprobs": 0},
    {"id": "greedy-logprobs", "rule": "kad_dual", "param": 0.4, "greedy": True,
     "logprobs": 1},
    {"id": "base", "rule": "base", "param": None},
]
# kad_primal's tiered threshold search reads how many rows its top-k tiers left unresolved
# (kad_kernels.rules.primal_threshold): the one read the step adds per kad_primal group.
PRIMAL_READS = ("rules.py",)
# Functions that read vLLM's host-side buffers (``optimistic_seq_lens_cpu``), not device data.
HOST_BUFFER_READERS = frozenset({"_output_lens"})


class TransferCounter:
    def __init__(self, monkeypatch) -> None:
        self.reads: set[str] = set()  # by source line: ``.cpu().numpy()`` is one read
        self.raw_uploads: list[str] = []
        self.uploads = 0
        for name in ("cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, self._reading(getattr(torch.Tensor, name)))
        for name in ("tensor", "as_tensor", "from_numpy"):
            monkeypatch.setattr(torch, name, self._building(getattr(torch, name)))

    @staticmethod
    def _caller() -> tuple[str, bool]:
        """``(file:line of the innermost project frame or "test", inside to_device)``."""
        stack = traceback.extract_stack()[:-2]
        inside = any(frame.name == "to_device" for frame in stack)
        for frame in reversed(stack):
            if "/server/" in frame.filename or "/kad_kernels/" in frame.filename:
                if frame.name in HOST_BUFFER_READERS or frame.name == "to_device":
                    return "test", inside
                return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}", inside
        return "test", inside

    def _reading(self, method):
        counter = self

        def read(tensor, *args, **kwargs):
            caller, _ = counter._caller()
            if caller != "test":
                counter.reads.add(caller)
            return method(tensor, *args, **kwargs)

        return read

    def _building(self, function):
        counter = self

        def build(*args, **kwargs):
            caller, inside = counter._caller()
            if inside:
                counter.uploads += 1
            elif caller != "test":
                counter.raw_uploads.append(f"{function.__name__} at {caller}")
            return function(*args, **kwargs)

        return build


@pytest.fixture
def counter(monkeypatch):
    import vllm.v1.spec_decode.llm_base_proposer  # noqa: F401 - imported before counting

    return TransferCounter(monkeypatch)


def test_one_step_of_a_mixed_batch_reads_the_device_once(counter):
    """Several rules, greedy rows and logprobs in one verification step."""
    real_step(MIXED_BATCH)
    reads = sorted(read for read in counter.reads if not read.startswith(PRIMAL_READS))
    assert len(reads) <= 1, reads
    assert counter.raw_uploads == []  # every upload pinned and non-blocking
    assert counter.uploads > 0  # the count sees the step's uploads at all


def test_a_draft_step_reads_nothing_and_uploads_once_per_proposal(counter):
    from types import SimpleNamespace

    from server.engine.hook_context import DraftPass, NextDrafts

    plans = {"greedy": NextDrafts(greedy=True), "third": NextDrafts(greedy=True)}
    draft_pass = DraftPass(["other", "greedy", "third"], plans)
    metadata = SimpleNamespace(temperature=torch.ones(3), generators={}, all_greedy=False,
                               all_random=True)
    for _ in range(GAMMA):
        draft_pass.sample(torch.randn(3, 50), metadata)
    assert counter.reads == set()
    assert counter.raw_uploads == []
    assert counter.uploads == 1  # the greedy mask, once per proposal

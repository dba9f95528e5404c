"""plan(): the public API behind ``memplan plan`` — sums, the fit verdict and ZeRO's figures."""

from __future__ import annotations

import pytest

from memplan.allocator import replay
from memplan.analytic.predict import predict
from memplan.distributed import zero_model_state_bytes
from memplan.errors import MemplanError
from memplan.hardware import load_profile
from memplan.overheads import CUDA_CONTEXT_BYTES
from memplan.plan import GpuTarget, PlanResult, plan, resolve_gpu
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup
from memplan.trace import ALLOCATED_CATEGORIES

MODEL_STATE = (
    "frozen_weights",
    "quant_state",
    "trainable_weights",
    "master_weights",
    "gradients",
    "optimizer_state",
)


@pytest.fixture(scope="module")
def qlora_65b() -> PlanResult:
    return plan("llama-65b", TrainingSetup(method="qlora"), gpu="rtx-a6000")


# -- the verdict ---------------------------------------------------------------------------


def test_llama_65b_qlora_fits_a_48gb_card(qlora_65b: PlanResult) -> None:
    """The QLoRA paper's headline: a 65B model fine-tuned on one 48 GB GPU."""
    assert qlora_65b.fits is True
    assert qlora_65b.gpu == "rtx-a6000"
    assert qlora_65b.margin_bytes is not None
    assert qlora_65b.margin_bytes > 0
    assert qlora_65b.device_bytes < qlora_65b.gpu_capacity_bytes  # type: ignore[operator]


def test_device_bytes_add_up(qlora_65b: PlanResult) -> None:
    r = qlora_65b
    assert sum(r.breakdown_bytes.values()) == r.peak_bytes
    assert set(r.breakdown_bytes) == {c.value for c in ALLOCATED_CATEGORIES}
    assert r.reserved_bytes >= r.peak_bytes
    assert r.allocator_overhead_bytes == r.reserved_bytes - r.peak_bytes
    assert r.cuda_context_bytes == CUDA_CONTEXT_BYTES
    # What nvidia-smi would show: the allocator's reservation, the CUDA context, and bnb's
    # paged optimizer state (unified memory, outside torch's counters).
    assert r.device_bytes == r.reserved_bytes + r.cuda_context_bytes + r.paged_bytes
    assert r.paged_bytes > 0  # the QLoRA recipe uses paged AdamW
    assert r.margin_bytes == r.gpu_capacity_bytes - r.device_bytes  # type: ignore[operator]
    assert r.bytes_per_param == r.peak_bytes / r.params
    state = sum(r.breakdown_bytes[c] for c in MODEL_STATE) + r.paged_bytes
    assert r.model_state_bytes_per_param == state / r.params
    assert max(r.phase_peaks_bytes.values()) == r.peak_bytes
    assert r.phase_peaks_bytes[f"{r.peak_step}:{r.peak_phase}"] == r.peak_bytes


def test_reserved_bytes_come_from_the_allocator_replay(llama_2_7b: ModelSpec) -> None:
    setup = TrainingSetup(method="lora", micro_batch_size=2, seq_len=1024)
    result = plan(llama_2_7b, setup)
    trace = predict(llama_2_7b, setup).trace
    replayed = replay(trace.events())
    assert result.reserved_bytes == max(
        replayed.reserved_at_peak_allocated_bytes, result.peak_bytes
    )


def test_paged_state_may_spill_so_a_tight_card_fits_only_by_paging(qlora_65b: PlanResult) -> None:
    # A card short by less than the paged optimizer state: bnb pages it to host memory.
    short = GpuTarget(
        name="tight",
        capacity_bytes=qlora_65b.device_bytes - qlora_65b.paged_bytes // 2,
        context_bytes=CUDA_CONTEXT_BYTES,
    )
    result = plan("llama-65b", TrainingSetup(method="qlora"), gpu=short)
    assert result.margin_bytes == -(qlora_65b.paged_bytes // 2)
    assert result.fits is False
    assert result.verdict == "fits only by paging"
    assert result.paged_out_bytes == qlora_65b.paged_bytes // 2
    # Short by more than the paged state: no.
    too_small = short.model_copy(
        update={"capacity_bytes": qlora_65b.device_bytes - qlora_65b.paged_bytes - 1}
    )
    beyond = plan("llama-65b", TrainingSetup(method="qlora"), gpu=too_small)
    assert beyond.verdict == "does not fit"
    assert beyond.paged_out_bytes == 0


def test_a_fit_within_the_safety_margin_is_borderline(qlora_65b: PlanResult) -> None:
    spare = GpuTarget(
        name="roomy",
        capacity_bytes=qlora_65b.device_bytes * 11 // 10,
        context_bytes=CUDA_CONTEXT_BYTES,
    )
    setup = TrainingSetup(method="qlora")
    assert plan("llama-65b", setup, gpu=spare, safety=0.05).verdict == "fits"
    close = plan("llama-65b", setup, gpu=spare, safety=0.2)
    assert close.verdict == "borderline"
    assert close.fits is True
    assert close.safety_fraction == 0.2
    assert close.accuracy is not None
    assert close.accuracy.startswith("published qlora runs")


def test_full_fine_tuning_of_65b_does_not_fit(qlora_65b: PlanResult) -> None:
    result = plan("llama-65b", TrainingSetup(method="full"), gpu="rtx-a6000")
    assert result.fits is False
    assert result.margin_bytes is not None
    assert result.margin_bytes < -(10**12) + qlora_65b.gpu_capacity_bytes  # type: ignore[operator]


def test_without_a_gpu_there_is_no_verdict(tiny_llama: ModelSpec) -> None:
    result = plan(tiny_llama)
    assert (result.fits, result.margin_bytes, result.gpu, result.gpu_capacity_bytes) == (
        None,
        None,
        None,
        None,
    )
    assert result.device_bytes == result.reserved_bytes + CUDA_CONTEXT_BYTES + result.paged_bytes


def test_name_and_spec_give_the_same_plan(tiny_llama: ModelSpec) -> None:
    setup = TrainingSetup(method="lora", seq_len=64)
    assert plan("tiny-llama", setup) == plan(tiny_llama, setup)


def test_plan_records_its_inputs(tiny_llama: ModelSpec) -> None:
    setup = TrainingSetup(method="qlora", micro_batch_size=3)
    parallel = ParallelSetup(num_gpus=2, zero_stage=2)
    result = plan(tiny_llama, setup, parallel)
    assert TrainingSetup.model_validate(result.setup) == setup
    assert ParallelSetup.model_validate(result.parallel) == parallel
    assert any("typical qlora defaults applied" in line for line in result.assumptions)
    assert result.params == tiny_llama.num_params


# -- GPU targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "capacity"), [("48GB", 48 * 10**9), ("24GiB", 24 * 2**30)])
def test_capacities_as_typed(text: str, capacity: int) -> None:
    target = resolve_gpu(text)
    assert (target.name, target.capacity_bytes, target.profile) == (text, capacity, None)
    assert target.context_bytes == CUDA_CONTEXT_BYTES
    assert plan("tiny-llama", gpu=text).gpu_capacity_bytes == capacity


def test_profile_capacity_is_what_one_process_can_use() -> None:
    profile = load_profile("rtx-a6000")
    target = resolve_gpu("rtx-a6000")
    assert target.capacity_bytes == int(profile.usable_memory_bytes * profile.gpu_share_fraction)
    assert target.profile == "rtx-a6000"


def test_unknown_gpu_is_a_memplan_error() -> None:
    with pytest.raises(MemplanError, match="unknown hardware 'no-such-card'"):
        resolve_gpu("no-such-card")


# -- ZeRO through the whole pipeline -------------------------------------------------------

# Per-tensor rounding bound: llama-2-7b has 291 parameter tensors; each may round up by less
# than one 512-byte block as a 16-bit weight, its gradient, its fp32 master, two Adam moments
# and the fused step counter (6 allocations), and ZeRO-3 rounds each shard up by < 1 element.
LLAMA_2_7B_TENSORS = 291
ROUNDING_BYTES = 6 * 512 * LLAMA_2_7B_TENSORS


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_through_plan_match_the_paper_formula(
    llama_2_7b: ModelSpec, stage: int
) -> None:
    """ZeRO (arXiv:1910.02054) Figure 1 accounting for Llama-2-7B at N=64, K=12.

    DeepSpeed with bf16 weights keeps fp32 master weights from stage 1 on (master_weights
    left to its default). memplan's stage 0 is plain data parallelism, so the paper's
    mixed-precision baseline asks for the masters explicitly.

    Stages 0 and 1 peak at the end of backward, when every gradient exists: the model state
    at the peak is the formula. At stages 2 and 3 the gradient shard (2 psi / N) is so small
    that the peak comes earlier (the start of backward, the forward), before any sharded
    gradient is written, so the model state at the peak is the formula without it.
    """
    setup = TrainingSetup(
        method="full", precision="bf16", master_weights=True if stage == 0 else None
    )
    result = plan(llama_2_7b, setup, ParallelSetup(num_gpus=64, zero_stage=stage))
    psi = result.params
    assert psi == 6_738_415_616
    assert any("fp32 master weights" in line for line in result.assumptions)
    at_peak = sum(result.breakdown_bytes[c] for c in MODEL_STATE)
    expected = zero_model_state_bytes(psi, stage, 64)
    if stage >= 2:
        assert result.breakdown_bytes["gradients"] == 0
        expected -= 2 * psi // 64
    assert abs(at_peak - expected) <= ROUNDING_BYTES
    # The per-GPU numbers of Figure 1's rows, scaled to 6.74B parameters: 107.8, 28.2,
    # 15.0 (14.7 before the gradient shard), 1.7 GB.
    assert (
        round(zero_model_state_bytes(psi, stage, 64) / 10**9, 1) == (107.8, 28.2, 15.0, 1.7)[stage]
    )


def test_zero_3_model_state_over_the_whole_step_matches_the_formula(llama_2_7b: ModelSpec) -> None:
    # When the optimizer steps, weights, masters, the gradient shard and both moments are all
    # alive: the full (2 + 2 + 12) psi / N.
    prediction = predict(
        llama_2_7b,
        TrainingSetup(method="full", precision="bf16"),
        ParallelSetup(num_gpus=64, zero_stage=3),
    )
    state: dict[str, int] = {}
    most = 0
    for event in prediction.trace.events():
        state[event.category.value] = state.get(event.category.value, 0) + event.delta_bytes
        most = max(most, sum(state.get(c, 0) for c in MODEL_STATE))
    assert abs(most - zero_model_state_bytes(6_738_415_616, 3, 64)) <= ROUNDING_BYTES

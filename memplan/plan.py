"""``plan``: will a training run fit, and where does its memory go? The API behind the CLI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from memplan._compat import StrEnum
from memplan.accuracy import error_band
from memplan.allocator import replay
from memplan.analytic.predict import Prediction, predict
from memplan.assumptions import assumptions
from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.hardware import HardwareProfile, has_profile, load_profile
from memplan.overheads import CUDA_CONTEXT_BYTES, communicator_bytes
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup
from memplan.trace import ALLOCATED_CATEGORIES, MODEL_STATE_CATEGORIES, Trace
from memplan.units import parse_capacity


class GpuTarget(BaseModel):
    """The device a plan is judged against: a hardware profile or a bare capacity."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Profile name, or the capacity as typed (e.g. '48GB').")
    capacity_bytes: int = Field(description="Memory the device offers to one process, in bytes.")
    context_bytes: int = Field(description="CUDA context / runtime overhead outside the allocator.")
    profile: str | None = Field(default=None, description="Hardware profile name, if any.")


def resolve_gpu(text: str) -> GpuTarget:
    """A GPU name (hardware profile or alias, such as ``4090``) or a capacity such as ``48GB``
    / ``24GiB`` (a number needs its unit)."""
    if text and text.strip()[:1].isdigit() and not has_profile(text):
        return GpuTarget(
            name=text, capacity_bytes=parse_capacity(text), context_bytes=CUDA_CONTEXT_BYTES
        )
    profile: HardwareProfile = load_profile(text)
    # usable_memory_bytes is what the device lets one process use (Metal's limit on Macs).
    capacity = profile.usable_memory_bytes
    return GpuTarget(
        name=profile.name,
        capacity_bytes=capacity,
        context_bytes=CUDA_CONTEXT_BYTES,
        profile=profile.name,
    )


class Verdict(StrEnum):
    """What a plan says about a device."""

    FITS = "fits"
    BORDERLINE = "borderline"  # fits, by less than memplan's error on runs of this kind
    PAGING = "fits only by paging"  # paged optimizer state must move to host memory
    NO = "does not fit"


def device_verdict(
    reserved_bytes: int,
    paged_bytes: int,
    target: GpuTarget,
    *,
    paging: bool = False,
    communicator_bytes: int = 0,
) -> tuple[int, bool]:
    """(device bytes, fits): plan()'s rule for a reservation judged on ``target``.

    device = reserved + CUDA context + NCCL communicators + paged optimizer state; it fits when
    the device bytes are within capacity. ``paging``: it also fits when it would once the paged
    state moves to host memory (bnb paged optimizers evict their state under pressure, at a
    cost in speed).
    """
    context = target.context_bytes or CUDA_CONTEXT_BYTES
    device = reserved_bytes + context + communicator_bytes + paged_bytes
    margin = target.capacity_bytes - device
    return device, margin >= 0 or (paging and margin + paged_bytes >= 0)


class PlanResult(BaseModel):
    """Per-GPU memory of one training step, as ``memplan plan --json`` prints it."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(description="analytical, simulated, measured-cpu or measured-cuda.")
    model: str
    params: int = Field(description="Parameters of the whole model.")
    trainable_params: int = Field(description="Parameters the optimizer updates (whole model).")
    peak_bytes: int = Field(description="Allocated peak per GPU (torch.cuda.max_memory_allocated).")
    peak_phase: str = Field(description="Phase in which the peak happens.")
    peak_step: int = Field(description="0: first step (optimizer state created); 1: steady state.")
    peak_event: str = Field(description="The allocation that reaches the peak.")
    breakdown_bytes: dict[str, int] = Field(
        description="Category -> bytes at the peak; sums to peak_bytes."
    )
    reserved_bytes: int = Field(
        description="Highest caching-allocator reservation (max_memory_reserved), from a replay."
    )
    allocator_overhead_bytes: int = Field(
        description="reserved_bytes - peak_bytes (cached and fragmented blocks)."
    )
    cuda_context_bytes: int = Field(description="CUDA context outside the allocator (NVML only).")
    communicator_bytes: int = Field(
        default=0,
        description="NCCL communicators' buffers outside the allocator (NVML only; multi-GPU).",
    )
    paged_bytes: int = Field(
        description="Paged optimizer state in unified memory (may move to host)."
    )
    device_bytes: int = Field(description="What nvidia-smi would show: reserved + context + paged.")
    cpu_bytes: int = Field(description="Host memory for offloaded state.")
    bytes_per_param: float = Field(description="peak_bytes / params.")
    model_state_bytes_per_param: float = Field(
        description="Weights, master weights, gradients and optimizer state at the peak / params."
    )
    phase_peaks_bytes: dict[str, int] = Field(description="Highest allocated bytes per step:phase.")
    final_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="Category -> bytes still allocated after the last step (what persists).",
    )
    gpu: str | None = Field(default=None, description="The device judged against.")
    gpu_capacity_bytes: int | None = Field(default=None, description="Its usable memory.")
    fits: bool | None = Field(
        default=None, description="device_bytes <= capacity: fits without paging anything out."
    )
    verdict: str | None = Field(
        default=None,
        description="fits, borderline (fits by less than the safety margin), fits only by "
        "paging (paged optimizer state must move to host memory), or does not fit.",
    )
    paged_out_bytes: int = Field(
        default=0, description="Paged optimizer state that must leave the device to fit."
    )
    safety_fraction: float | None = Field(
        default=None,
        description="Margin below which a fit is borderline, as a fraction of device_bytes.",
    )
    accuracy: str | None = Field(
        default=None, description="memplan's error on published runs of this kind."
    )
    margin_bytes: int | None = Field(
        default=None, description="Capacity minus device_bytes (negative: short)."
    )
    setup: dict[str, Any]
    parallel: dict[str, Any]
    assumptions: list[str]


def plan(
    model: str | ModelSpec,
    setup: TrainingSetup | None = None,
    parallel: ParallelSetup | None = None,
    *,
    gpu: str | GpuTarget | None = None,
    safety: float | None = None,
) -> PlanResult:
    """Predict the per-GPU memory of ``setup`` on ``model`` and judge it against ``gpu``
    (``safety``: see :func:`judged`).

    >>> result = plan("llama-2-7b", TrainingSetup(method="qlora"), gpu="rtx-4090")
    >>> result.fits, result.peak_phase
    (True, 'backward')
    """
    spec = load_model(model) if isinstance(model, str) else model
    setup = setup or TrainingSetup()
    parallel = parallel or ParallelSetup()
    target = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
    prediction = predict(spec, setup, parallel)
    result = _result(spec, setup, parallel, prediction, None)
    return judged(result, target, safety=safety) if target is not None else result


def _result(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    prediction: Prediction,
    target: GpuTarget | None,
) -> PlanResult:
    return result_from_trace(
        spec,
        setup,
        parallel,
        prediction.trace,
        num_params=prediction.state.num_params,
        num_trainable_params=prediction.state.num_trainable_params,
        paged_bytes=prediction.paged_bytes,
        cpu_bytes=prediction.cpu_bytes,
        target=target,
        assumptions=assumptions(spec, setup, parallel, prediction),
    )


def result_from_trace(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    trace: Trace,
    *,
    num_params: int,
    num_trainable_params: int,
    paged_bytes: int,
    cpu_bytes: int,
    target: GpuTarget | None,
    assumptions: list[str],
) -> PlanResult:
    """A PlanResult from any source's trace (analytical, simulated, measured)."""
    peak = trace.peak()
    if peak.peak_bytes <= 0:
        raise MemplanError("the step allocates nothing: check the model and setup")
    reserved = max(
        # Segments are never released (no empty_cache), so the highest reservation is what
        # max_memory_reserved and nvidia-smi show.
        replay(trace.events(collapse_balanced=True, relabel=False)).peak_reserved_bytes,
        peak.peak_bytes,
    )
    context = (target.context_bytes if target else 0) or CUDA_CONTEXT_BYTES
    communicators = communicator_bytes(parallel.process_group_sizes)
    device = reserved + context + communicators + paged_bytes
    state_bytes = sum(peak.breakdown_bytes[c] for c in MODEL_STATE_CATEGORIES) + paged_bytes
    phase_peaks = {f"{step}:{phase.value}": v for (step, phase), v in trace.phase_peaks().items()}
    result = PlanResult(
        source=trace.source,
        model=spec.name,
        params=num_params,
        trainable_params=num_trainable_params,
        peak_bytes=peak.peak_bytes,
        peak_phase=peak.phase.value,
        peak_step=peak.step,
        peak_event=peak.label,
        breakdown_bytes={c.value: peak.breakdown_bytes[c] for c in ALLOCATED_CATEGORIES},
        reserved_bytes=reserved,
        allocator_overhead_bytes=reserved - peak.peak_bytes,
        cuda_context_bytes=context,
        communicator_bytes=communicators,
        paged_bytes=paged_bytes,
        device_bytes=device,
        cpu_bytes=cpu_bytes,
        bytes_per_param=peak.peak_bytes / num_params,
        model_state_bytes_per_param=state_bytes / num_params,
        phase_peaks_bytes=phase_peaks,
        final_bytes={c.value: v for c, v in trace.final_bytes().items() if v},
        setup=setup.model_dump(mode="json"),
        parallel=parallel.model_dump(mode="json"),
        assumptions=assumptions,
    )
    return judged(result, target) if target is not None else result


def judged(result: PlanResult, target: GpuTarget, *, safety: float | None = None) -> PlanResult:
    """``result`` judged on ``target``: its device bytes, verdict and margin there.

    ``safety``: the margin, as a fraction of the device bytes, below which a fit is borderline
    (default: the largest underestimate memplan made on published runs of the method).
    """
    device, fits = device_verdict(
        result.reserved_bytes,
        result.paged_bytes,
        target,
        communicator_bytes=result.communicator_bytes,
    )
    margin = target.capacity_bytes - device
    band = error_band(str(result.setup["method"]))
    if safety is None:
        safety = band[1].underestimate if band else 0.0
    if fits:
        verdict = Verdict.BORDERLINE if margin < safety * device else Verdict.FITS
    elif margin + result.paged_bytes >= 0:
        verdict = Verdict.PAGING
    else:
        verdict = Verdict.NO
    return result.model_copy(
        update={
            "cuda_context_bytes": target.context_bytes or CUDA_CONTEXT_BYTES,
            "device_bytes": device,
            "gpu": target.name,
            "gpu_capacity_bytes": target.capacity_bytes,
            "fits": fits,
            "verdict": verdict.value,
            "paged_out_bytes": -margin if verdict is Verdict.PAGING else 0,
            "margin_bytes": margin,
            "safety_fraction": safety,
            "accuracy": band[1].describe(band[0]) if band else None,
        }
    )

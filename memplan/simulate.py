"""``simulate`` and CPU ``measure``: trace a real PyTorch step and set it beside the prediction.

Both run the same training step as :func:`memplan.plan.plan` predicts, through
:mod:`memplan.torchsim` (extras ``torch`` and ``hf``): on fake tensors (``simulate``: any size,
nothing allocated) or on real CPU tensors (``measure --device cpu``: small models, every
allocation tracked). ``simulate`` of a CUDA setup (the default device) runs CUDA's kernels
where their memory differs from the CPU's (:mod:`memplan.torchsim.cuda_kernels`) and is set
beside the analytical plan for CUDA; a CPU setup, and ``measure --device cpu``, run PyTorch's
CPU kernels beside the analytical plan with ``device="cpu"``. The result is the plan's output
format with ``source`` set to ``simulated`` or ``measured-cpu``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.families import family
from memplan.plan import GpuTarget, PlanResult, plan, resolve_gpu, result_from_trace
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup
from memplan.trace import ALLOCATED_CATEGORIES, Trace


@dataclass(frozen=True)
class TracedComparison:
    """A traced step (simulated or CPU-measured) and the analytical plan of the same setup."""

    traced: PlanResult
    analytical: PlanResult | None  # None: a traced-only model (no family describes it)
    trace: Trace
    wall_time_s: float
    notes: tuple[str, ...]

    def differences_bytes(self) -> dict[str, int]:
        """Analytical minus traced, per category at each one's peak, and for the peak."""
        if self.analytical is None:
            return {}
        diffs = {
            c.value: self.analytical.breakdown_bytes[c.value] - self.traced.breakdown_bytes[c.value]
            for c in ALLOCATED_CATEGORIES
        }
        diffs["peak"] = self.analytical.peak_bytes - self.traced.peak_bytes
        return diffs


TRACED_ONLY_NOTE = (
    "traced only: no memplan family describes model_type {model_type!r}, so this is the "
    "transformers model's step as traced, with no analytical prediction beside it"
)


def _torch_modules() -> tuple[object, object]:
    try:
        from memplan.torchsim.records import Placement
        from memplan.torchsim.step import trace_step
    except ImportError as exc:
        raise MemplanError(
            f"tracing needs PyTorch and transformers ({exc.name} is missing): "
            "pip install 'memplan[torch,hf]'"
        ) from exc
    return trace_step, Placement


def check_simulated_layout(parallel: ParallelSetup, mode: str = "fake") -> None:
    """Raise MemplanError for a layout the tracer cannot run: one GPU, or FSDP's FULL_SHARD
    and SHARD_GRAD_OP on fake tensors, without tensor parallelism or offload."""
    from memplan.specs.parallel import FSDPStrategy, Offload

    strategy = parallel.fsdp_strategy
    if parallel.num_gpus == 1 and strategy is None:
        return
    if strategy is None:
        raise MemplanError(
            "simulate traces FSDP (--fsdp) on a fake process group; DeepSpeed ZeRO layouts "
            "are planned only (memplan plan)"
        )
    if strategy not in (FSDPStrategy.FULL_SHARD, FSDPStrategy.SHARD_GRAD_OP):
        raise MemplanError(
            f"simulate traces FSDP full-shard and shard-grad-op, not {strategy.value} "
            "(memplan plan covers it)"
        )
    if parallel.tensor_parallel_degree != 1 or parallel.offload is not Offload.NONE:
        raise MemplanError(
            "simulate traces FSDP without tensor parallelism or offload (memplan plan covers them)"
        )
    if parallel.fsdp_version != 2:
        raise MemplanError("simulate traces FSDP2 (fully_shard): use --fsdp-version 2")
    if parallel.fsdp_mixed_units:
        raise MemplanError(
            "simulate traces FSDP2 (per-parameter sharding): --fsdp-wrap blocks describes FSDP1 "
            "flat parameters"
        )
    if mode != "fake":
        raise MemplanError("a sharded step is traced on fake tensors only (memplan simulate)")


def trace_and_compare(
    model: str | ModelSpec,
    setup: TrainingSetup,
    *,
    mode: str = "fake",
    gpu: str | GpuTarget | None = None,
    parallel: ParallelSetup | None = None,
) -> TracedComparison:
    """Trace ``setup`` on ``model`` (``mode`` "fake" or "cpu") and plan it analytically.

    ``parallel``: an FSDP layout (FULL_SHARD or SHARD_GRAD_OP), traced as one rank of a fake
    process group on fake tensors and compared with the plan's per-rank prediction.
    """
    parallel = parallel or ParallelSetup()
    check_simulated_layout(parallel, mode)
    spec = load_model(model) if isinstance(model, str) else model
    # Real CPU tensors run the CPU kernels: that step is compared with the analytical model of
    # a CPU step. Fake tensors run CUDA's kernels for a CUDA setup.
    if mode == "cpu" and setup.device != "cpu":
        setup = setup.model_copy(update={"device": "cpu"})
    kernels = "cuda" if mode == "fake" and setup.device == "cuda" else "cpu"
    trace_step, placement = _torch_modules()
    target = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
    sharded = parallel if parallel.fsdp_strategy is not None else None
    result = trace_step(  # type: ignore[operator]
        spec, setup, mode=mode, parallel=sharded, kernels=kernels
    )
    outside = result.outside_allocator_bytes
    paged = int(outside.get(placement.PAGED, 0))  # type: ignore[attr-defined]
    host = int(outside.get(placement.HOST, 0))  # type: ignore[attr-defined]
    analytical: PlanResult | None = None
    assumptions = list(result.notes)
    if family(spec.family).traced_only:
        model_type = spec.layout.config.get("model_type")  # type: ignore[attr-defined]
        assumptions.insert(0, TRACED_ONLY_NOTE.format(model_type=model_type))
    else:
        analytical = plan(spec, setup, parallel, gpu=target)
        assumptions = [*analytical.assumptions, *assumptions]
    traced = result_from_trace(
        spec,
        setup,
        parallel,
        result.trace,
        num_params=result.num_params,
        num_trainable_params=result.num_trainable_params,
        paged_bytes=paged,
        cpu_bytes=host,
        target=target,
        assumptions=assumptions,
    )
    return TracedComparison(
        traced, analytical, result.trace, result.wall_time_s, tuple(result.notes)
    )

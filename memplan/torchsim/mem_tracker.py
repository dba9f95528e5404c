"""Run the same CPU step under PyTorch's own ``MemTracker`` for a side-by-side comparison.

``torch.distributed._tools.mem_tracker.MemTracker`` is a private API: it is imported lazily
and its absence is reported as an ImportError. On the CPU it counts exact storage bytes (it
rounds to 512 only for CUDA), so the comparison uses the tracker's unrounded peak over every
placement (host-side ``step`` counters and paged states included), as MemTracker sees them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from memplan.specs import ModelSpec, TrainingSetup
from memplan.torchsim.models import Backend
from memplan.torchsim.runner import RunRequest, prepare_model, run_steps, traced_run
from memplan.torchsim.tracker import ALL_PLACEMENTS


@dataclass(frozen=True)
class MemTrackerComparison:
    """Peaks of one CPU run measured by MemTracker and by memplan's tracker."""

    memtracker_peak_bytes: int
    tracker_peak_bytes: int
    memtracker_breakdown_bytes: dict[str, int]
    memtracker_wall_s: float
    tracker_wall_s: float

    @property
    def relative_difference(self) -> float:
        """(tracker - MemTracker) / MemTracker."""
        return (self.tracker_peak_bytes - self.memtracker_peak_bytes) / self.memtracker_peak_bytes

    @property
    def speed_ratio(self) -> float:
        """Tracker wall time over MemTracker wall time (below 1: the tracker is faster)."""
        return self.tracker_wall_s / self.memtracker_wall_s


def _mem_tracker_class() -> Any:
    """MemTracker, taught that frozen parameters get no gradient.

    MemTracker registers a gradient hook on every parameter of every module it sees, which
    raises for ``requires_grad=False`` parameters (LoRA, QLoRA, BitFit bases). The subclass
    lets it track parameters and buffers without hooks, then hooks the trainable ones only.
    """
    try:
        from torch.distributed._tools import mem_tracker as module
    except ImportError as exc:  # private API: moved, renamed, or torch.distributed missing
        raise ImportError(f"torch.distributed._tools.mem_tracker is unavailable: {exc}") from exc

    class FrozenAwareMemTracker(module.MemTracker):  # type: ignore[no-untyped-call]
        def _track_module_params_and_buffers(
            self, mod: torch.nn.Module, install_grad_hooks: bool = True
        ) -> tuple[int, int]:
            memory: tuple[int, int] = super()._track_module_params_and_buffers(mod, False)
            if install_grad_hooks:
                for param in mod.parameters():
                    hooked = self._param_to_grad_hook_handles.get(param)  # type: ignore[no-untyped-call]
                    if param.requires_grad and hooked is None:
                        self._param_to_grad_hook_handles[param] = _grad_hooks(self, param, module)
            return memory

    return FrozenAwareMemTracker


def _grad_hooks(tracker: Any, param: torch.nn.Parameter, module: Any) -> tuple[Any, Any]:
    def track(grad: torch.Tensor) -> None:
        tracker._update_and_maybe_create_winfos(grad, module._MemRefType.GRAD)

    return (
        param.register_hook(track),  # type: ignore[no-untyped-call]
        param.register_post_accumulate_grad_hook(lambda p: track(p.grad)),  # type: ignore[no-untyped-call]
    )


def measure_with_torch_mem_tracker(
    spec: ModelSpec,
    setup: TrainingSetup,
    *,
    steps: int = 2,
    backend: Backend = "auto",
    hf_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> MemTrackerComparison:
    """Peak of the CPU step by MemTracker, next to the tracker's peak of the same step."""
    mem_tracker_class = _mem_tracker_class()
    request = RunRequest(spec, setup, "cpu", steps, backend, hf_config, seed)
    torch.manual_seed(seed)
    model, built = prepare_model(request)
    mem_tracker = mem_tracker_class()
    start = time.perf_counter()
    with mem_tracker:
        # MemTracker refuses a second call of the root module unless its per-module stats are
        # reset between iterations (its own tests do the same).
        run_steps(model, built, request, before_step=lambda _: mem_tracker.reset_mod_stats())
    memtracker_wall_s = time.perf_counter() - start
    snapshot = mem_tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    start = time.perf_counter()
    traced = traced_run(request)
    tracker_wall_s = time.perf_counter() - start
    trace = traced.tracker.trace(
        "torchsim-cpu-exact", placements=ALL_PLACEMENTS, granularity_bytes=1
    )
    return MemTrackerComparison(
        memtracker_peak_bytes=int(snapshot.get("Total", 0)),
        tracker_peak_bytes=trace.peak().peak_bytes,
        memtracker_breakdown_bytes={str(k): int(v) for k, v in snapshot.items() if k != "Total"},
        memtracker_wall_s=memtracker_wall_s,
        tracker_wall_s=tracker_wall_s,
    )

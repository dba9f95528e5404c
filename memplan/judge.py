"""Cheap predictions and plan() verdicts of one model, cached: what fit and recommend share.

plan() replays the caching allocator (milliseconds to a few hundred for the largest models), so
searches over micro-batches, sequence lengths or parallel layouts judge most candidates from
``predict()`` alone:

- plan() reserves at least the allocated peak, so ``peak + CUDA context > capacity`` proves a
  candidate cannot fit without any replay (``cannot_fit``);
- otherwise reserved memory is estimated as ``peak * reserved / peak`` of the latest plan()
  (its allocator overhead ratio; 1 before the first) (``likely_fits``);
- the verdict that is reported is plan()'s (``fits``), unless the judge was made with
  ``confirm=False`` (the estimate alone, for timing the search by itself).

Each verdict takes ``paging``: whether paged optimizer state may move to host memory to fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.analytic.predict import predict
from memplan.overheads import communicator_bytes
from memplan.plan import GpuTarget, PlanResult, device_verdict, judged, plan
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup
from memplan.step_time import ModelBytes, model_bytes

Key = tuple[TrainingSetup, ParallelSetup]


@dataclass(frozen=True, slots=True)
class Cheap:
    """What predict() tells about one configuration in milliseconds."""

    peak_bytes: int  # allocated peak
    paged_bytes: int  # paged optimizer state
    cpu_bytes: int  # offloaded state in host memory
    moved: ModelBytes  # weights and gradients a layout moves (memplan.step_time)


class Judge:
    """Predictions and plan() results of ``spec`` per (setup, layout), and verdicts on devices.

    ``target`` is the device judged when a call names none. ``plan_calls`` counts the replays.
    """

    def __init__(
        self,
        spec: ModelSpec,
        target: GpuTarget | None = None,
        *,
        confirm: bool = True,
        safety: float | None = None,
    ) -> None:
        self.spec, self.target, self.confirm, self.safety = spec, target, confirm, safety
        self._cheap: dict[Key, Cheap] = {}
        self._plans: dict[Key, PlanResult] = {}
        self._ratio: tuple[int, int] = (1, 1)  # reserved, peak of the latest plan()
        self.plan_calls = 0

    def _device(self, target: GpuTarget | None) -> GpuTarget:
        device = target or self.target
        if device is None:
            raise ValueError("no device to judge against")
        return device

    def cheap(self, setup: TrainingSetup, parallel: ParallelSetup) -> Cheap:
        key = (setup, parallel)
        if key not in self._cheap:
            p = predict(self.spec, setup, parallel)
            peak = p.trace.peak().peak_bytes
            self._cheap[key] = Cheap(peak, p.paged_bytes, p.cpu_bytes, model_bytes(p))
        return self._cheap[key]

    def plan(
        self, setup: TrainingSetup, parallel: ParallelSetup, target: GpuTarget | None = None
    ) -> PlanResult:
        """plan()'s result, judged on ``target`` (or the judge's device, if any)."""
        key = (setup, parallel)
        if key not in self._plans:
            result = plan(self.spec, setup, parallel)
            self._plans[key] = result
            self._ratio = (result.reserved_bytes, result.peak_bytes)
            self.plan_calls += 1
        device = target or self.target
        if device is None:
            return self._plans[key]
        return judged(self._plans[key], device, safety=self.safety)

    def planned(self, setup: TrainingSetup, parallel: ParallelSetup) -> bool:
        """Whether plan() has judged this configuration already."""
        return (setup, parallel) in self._plans

    def estimated_reserved(self, setup: TrainingSetup, parallel: ParallelSetup) -> int:
        peak = self.cheap(setup, parallel).peak_bytes
        return max(peak, peak * self._ratio[0] // self._ratio[1])

    def cannot_fit(
        self,
        setup: TrainingSetup,
        parallel: ParallelSetup,
        target: GpuTarget | None = None,
        *,
        paging: bool = False,
    ) -> bool:
        """Proof without a replay: plan() reserves at least the allocated peak."""
        c = self.cheap(setup, parallel)
        device = self._device(target)
        nccl = communicator_bytes(parallel.process_group_sizes)
        return not device_verdict(
            c.peak_bytes, c.paged_bytes, device, paging=paging, communicator_bytes=nccl
        )[1]

    def likely_fits(
        self,
        setup: TrainingSetup,
        parallel: ParallelSetup,
        target: GpuTarget | None = None,
        *,
        paging: bool = False,
    ) -> bool:
        """Estimate: reserved = peak x (reserved / peak of the latest plan())."""
        reserved = self.estimated_reserved(setup, parallel)
        paged = self.cheap(setup, parallel).paged_bytes
        nccl = communicator_bytes(parallel.process_group_sizes)
        return device_verdict(
            reserved, paged, self._device(target), paging=paging, communicator_bytes=nccl
        )[1]

    def fits(
        self,
        setup: TrainingSetup,
        parallel: ParallelSetup,
        target: GpuTarget | None = None,
        *,
        paging: bool = False,
    ) -> bool:
        """plan()'s verdict (the estimate alone when the judge does not confirm)."""
        if not self.confirm:
            return self.likely_fits(setup, parallel, target, paging=paging)
        result = self.plan(setup, parallel)
        device = self._device(target)
        return device_verdict(
            result.reserved_bytes,
            result.paged_bytes,
            device,
            paging=paging,
            communicator_bytes=result.communicator_bytes,
        )[1]

    def device_and_host_bytes(
        self, setup: TrainingSetup, parallel: ParallelSetup, target: GpuTarget | None = None
    ) -> tuple[int, int]:
        """plan()'s device and host bytes (estimated device bytes when not confirming)."""
        device = self._device(target)
        if not self.confirm:
            c = self.cheap(setup, parallel)
            reserved = self.estimated_reserved(setup, parallel)
            nccl = communicator_bytes(parallel.process_group_sizes)
            return device_verdict(reserved, c.paged_bytes, device, communicator_bytes=nccl)[
                0
            ], c.cpu_bytes
        result = self.plan(setup, parallel)
        return device_verdict(
            result.reserved_bytes,
            result.paged_bytes,
            device,
            communicator_bytes=result.communicator_bytes,
        )[0], result.cpu_bytes

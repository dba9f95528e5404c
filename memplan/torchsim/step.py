"""Trace real PyTorch training steps, allocation by allocation: ``trace_step``.

``mode="fake"`` runs the step on fake tensors (``FakeTensorMode``): nothing is allocated, so a
70B-shaped model traces on a laptop. ``mode="cpu"`` runs it on real CPU tensors, the tracker
being the measurement. Both produce a :class:`memplan.trace.Trace` of two optimizer steps
(step 0 creates the optimizer state lazily; step 1 is the steady state).

Deep fake traces are folded (:mod:`memplan.torchsim.fold`): the model is traced with n and
n + 1 layers (n = 4, or 5 when the second layer differs too), the n-layer trace folded to n + 1
layers must equal the traced one event for event, and is then folded to the full depth; a
model whose layers do not fold is traced layer by layer (and the result says so), as is a
sharded (FSDP2) step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Final

from torch import nn

from memplan.families import family
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup
from memplan.torchsim.fold import FoldError, fold_events, keyed_events
from memplan.torchsim.models import Backend
from memplan.torchsim.quant import Linear4bit
from memplan.torchsim.records import Placement, StorageRecord
from memplan.torchsim.runner import Kernels, Mode, RunRequest, TracedRun, traced_run
from memplan.torchsim.tracker import MemoryTracker
from memplan.trace import ALLOCATION_GRANULARITY_BYTES, Phase, Trace

MAX_FOLD_LAYERS: Final = 5  # deepest short model traced for folding


@dataclass
class TraceResult:
    """A traced training step and what the tracer knows about the model."""

    trace: Trace
    num_params: int
    num_trainable_params: int
    phase_peak_bytes: dict[tuple[int, Phase], int]
    wall_time_s: float
    outside_allocator_bytes: dict[Placement, int]  # held at the end, outside torch's allocator
    records: list[StorageRecord]  # one per storage (of the traced, possibly shorter, model)
    layers_traced: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.trace.peak().peak_bytes


# The trace sources of memplan's output format.
SOURCES: Final[dict[str, str]] = {"fake": "simulated", "cpu": "measured-cpu"}


def trace_step(
    spec: ModelSpec,
    setup: TrainingSetup,
    *,
    mode: Mode = "fake",
    steps: int = 2,
    backend: Backend = "auto",
    hf_config: dict[str, Any] | None = None,
    seed: int = 0,
    fold: bool = True,
    parallel: ParallelSetup | None = None,
    kernels: Kernels = "cpu",
) -> TraceResult:
    """Trace ``steps`` optimizer steps of ``setup`` on ``spec``, every storage accounted for.

    ``backend``: "hf" (transformers from the config), "reference" (the plain-torch Llama), or
    "auto" (transformers when installed). ``hf_config`` overrides the catalog's config.json.
    ``fold``: trace deep fake models through :mod:`memplan.torchsim.fold`.
    ``parallel``: an FSDP layout, traced as rank 0 of a fake process group
    (:mod:`memplan.torchsim.fsdp`). ``kernels``: "cuda" replaces the CPU kernels by CUDA's
    where their memory differs (:mod:`memplan.torchsim.cuda_kernels`; fake tensors only).
    """
    start = time.perf_counter()
    request = RunRequest(
        spec, setup, mode, steps, backend, hf_config, seed, parallel=parallel, kernels=kernels
    )
    fold_failure = ""
    # A sharded step is traced layer by layer: the folding check finds the layers of an FSDP2
    # step unequal (their hooks hand all-gather outputs and reduce-scatter inputs from unit
    # to unit), and every layer is cheap on fake tensors (llama-2-7b at 8 ranks in ~15 s).
    if fold and mode == "fake" and spec.num_layers > MAX_FOLD_LAYERS + 1 and not request.sharded:
        try:
            return _folded(request, start)
        except FoldError as exc:
            fold_failure = f"not folded ({exc}): traced every layer"
    traced = traced_run(request)
    if fold_failure:
        traced.notes.append(fold_failure)
    trace = traced.tracker.trace(SOURCES[mode])
    return _result(traced, trace, start, _param_counts(traced.session.model), spec.num_layers)


def _folded(request: RunRequest, start: float) -> TraceResult:
    """Trace n and n + p layers; fold n to n + p and compare; if equal, fold n to full depth.

    p is the period of the layers (2 when every second layer is checkpointed; the family's
    pattern of layer kinds, Gemma3's five sliding-window layers and a full one). The first layer
    can differ from the others (its input is the embedding, which needs no gradient under
    PEFT), and so can its neighbour's backward: repeating from layer 1 is tried, then layer 2.
    """
    if request.spec.is_encoder_decoder:
        raise FoldError("encoder-decoder models have two layer stacks")
    setup, target = request.setup, request.spec.num_decoder_layers
    period = math.lcm(
        setup.grad_ckpt_every if setup.grad_ckpt else 1,
        family(request.spec.family).layer_period(request.spec),
    )
    runs: dict[int, TracedRun] = {}

    def run(num_layers: int) -> TracedRun:
        if num_layers not in runs:
            runs[num_layers] = traced_run(request.with_layers(num_layers))
        return runs[num_layers]

    for first in (1, 2):
        # first layers, two groups of `period` repeated layers, the last layer
        short_layers = first + 2 * period + 1
        if short_layers + period >= target or (target - short_layers) % period:
            continue
        short, longer = run(short_layers), run(short_layers + period)
        keyed = _keyed(short)
        try:
            check = fold_events(
                keyed, short_layers, short_layers + period, first_repeated=first, period=period
            )
        except FoldError:
            continue
        if _signature(Trace("check", check)) != _signature(longer.tracker.trace("check")):
            continue
        items = fold_events(keyed, short_layers, target, first_repeated=first, period=period)
        extra = target - short_layers
        counts = _full_depth_counts(short, longer, period, extra)
        short.notes.append(
            f"traced {short_layers} and {short_layers + period} layers, folded to {target}"
        )
        result = _result(short, Trace(SOURCES["fake"], items), start, counts, short_layers)
        result.outside_allocator_bytes = _full_depth_outside(short, longer, period, extra)
        return result
    raise FoldError("its layers do not emit identical events")


def _full_depth_counts(
    short: TracedRun, longer: TracedRun, period: int, extra_layers: int
) -> tuple[int, int]:
    """Parameter counts of the full model from two shorter ones (``period`` layers apart)."""
    counts = _param_counts(short.session.model)
    more = _param_counts(longer.session.model)
    per_layer = [(b - a) // period for a, b in zip(counts, more, strict=True)]
    return counts[0] + per_layer[0] * extra_layers, counts[1] + per_layer[1] * extra_layers


def _full_depth_outside(
    short: TracedRun, longer: TracedRun, period: int, extra_layers: int
) -> dict[Placement, int]:
    """Bytes held outside the allocator (paged optimizer states, host step counters) by the
    full model, from two shorter ones (``period`` layers apart)."""
    held, more = _outside_bytes(short.tracker), _outside_bytes(longer.tracker)
    return {p: held[p] + (more[p] - held[p]) // period * extra_layers for p in held}


def _keyed(traced: TracedRun) -> list[tuple[Any, int | None]]:
    pairs = traced.tracker.raw_events((Placement.DEVICE,))
    return keyed_events(pairs, traced.layer_prefix, ALLOCATION_GRANULARITY_BYTES)


def _signature(trace: Trace) -> list[tuple[int, str, str, int]]:
    return [(e.delta_bytes, e.category.value, e.phase.value, e.step) for e in trace.events()]


def _result(
    traced: TracedRun, trace: Trace, start: float, counts: tuple[int, int], layers: int
) -> TraceResult:
    return TraceResult(
        trace=trace,
        num_params=counts[0],
        num_trainable_params=counts[1],
        phase_peak_bytes=trace.phase_peaks(),
        wall_time_s=time.perf_counter() - start,
        outside_allocator_bytes=_outside_bytes(traced.tracker),
        records=traced.tracker.records,
        layers_traced=layers,
        notes=traced.notes,
    )


def _outside_bytes(tracker: MemoryTracker) -> dict[Placement, int]:
    held = {Placement.HOST: 0, Placement.PAGED: 0}
    for record in tracker.live_records():
        if record.placement in held:
            held[record.placement] += record.nbytes
    return held


def _param_counts(model: nn.Module) -> tuple[int, int]:
    """sum(p.numel()) and its trainable part; an NF4 weight counts its logical elements."""
    logical = {
        id(m.weight): m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, Linear4bit)
    }
    total = trainable = 0
    for param in model.parameters():
        numel = logical.get(id(param), param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    return total, trainable

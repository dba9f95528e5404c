"""Trace real PyTorch training steps, allocation by allocation: ``trace_step``.

``mode="fake"`` runs the step on fake tensors (``FakeTensorMode``): nothing is allocated, so a
70B-shaped model traces on a laptop. ``mode="cpu"`` runs it on real CPU tensors, the tracker
being the measurement. Both produce a :class:`memplan.trace.Trace` of two optimizer steps
(step 0 creates the optimizer state lazily; step 1 is the steady state).

Deep fake traces are folded (:mod:`memplan.torchsim.fold`): the model is traced with 4 and
with 5 layers, the 4-layer trace folded to 5 layers must equal the 5-layer one event for event,
and is then folded to the full depth.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import torch
from torch import nn

from memplan.specs import ModelSpec, TrainingSetup
from memplan.torchsim.fake import fake_tensors
from memplan.torchsim.fold import FoldError, fold_events, keyed_events
from memplan.torchsim.hooks import ModuleHooks
from memplan.torchsim.methods import apply_method
from memplan.torchsim.models import (
    Backend,
    BuiltModel,
    build_meta_model,
    decoder_layer_stacks,
    lm_head_of,
)
from memplan.torchsim.quant import Linear4bit
from memplan.torchsim.records import Placement, StorageRecord
from memplan.torchsim.session import Session, load_session, train_step
from memplan.torchsim.tracker import MemoryTracker
from memplan.trace import ALLOCATION_GRANULARITY_BYTES, Phase, Trace

Mode = Literal["fake", "cpu"]
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


@dataclass
class TracedRun:
    """The tracker and the session of one traced run (before folding)."""

    tracker: MemoryTracker
    session: Session
    layer_prefix: str
    notes: list[str]


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
) -> TraceResult:
    """Trace ``steps`` optimizer steps of ``setup`` on ``spec``, every storage accounted for.

    ``backend``: "hf" (transformers from the config), "reference" (the plain-torch Llama), or
    "auto" (transformers when installed). ``hf_config`` overrides the catalog's config.json.
    ``fold``: trace deep fake models through :mod:`memplan.torchsim.fold`.
    """
    start = time.perf_counter()
    depth = spec.num_layers
    if fold and mode == "fake" and depth > MAX_FOLD_LAYERS + 1 and not spec.is_encoder_decoder:
        with contextlib.suppress(FoldError):
            return _folded(spec, setup, steps, backend, hf_config, seed, start)
    traced = traced_run(
        spec, setup, "fake" if mode == "fake" else "cpu", steps, backend, hf_config, seed, None
    )
    trace = traced.tracker.trace(f"torchsim-{mode}")
    return _result(traced, trace, start, _param_counts(traced.session.model), depth)


def _folded(
    spec: ModelSpec,
    setup: TrainingSetup,
    steps: int,
    backend: Backend,
    hf_config: dict[str, Any] | None,
    seed: int,
    start: float,
) -> TraceResult:
    """Trace n and n+1 layers; fold n to n+1 and compare; if equal, fold n to the full depth.

    The first layer can differ from the others (its input is the embedding, which needs no
    gradient under PEFT), and so can its neighbour's backward: repeating from layer 1 is tried
    first, then from layer 2.
    """
    runs: dict[int, TracedRun] = {}

    def run(num_layers: int) -> TracedRun:
        if num_layers not in runs:
            runs[num_layers] = traced_run(
                spec, setup, "fake", steps, backend, hf_config, seed, num_layers
            )
        return runs[num_layers]

    for first_repeated in (1, 2):
        short_layers = first_repeated + 3  # first layers, two repeated ones, the last
        short, longer = run(short_layers), run(short_layers + 1)
        keyed = _keyed(short)
        try:
            check = fold_events(
                keyed, short_layers, short_layers + 1, first_repeated=first_repeated
            )
        except FoldError:
            continue
        if _signature(Trace("check", check)) != _signature(longer.tracker.trace("check")):
            continue
        target = spec.num_decoder_layers
        items = fold_events(keyed, short_layers, target, first_repeated=first_repeated)
        counts = _param_counts(short.session.model)
        per_layer = [
            b - a for a, b in zip(counts, _param_counts(longer.session.model), strict=True)
        ]
        extra = target - short_layers
        full = (counts[0] + per_layer[0] * extra, counts[1] + per_layer[1] * extra)
        short.notes.append(
            f"traced {short_layers} and {short_layers + 1} layers, folded to {target}"
        )
        return _result(short, Trace("torchsim-fake", items), start, full, short_layers)
    raise FoldError(f"{spec.name}: layers do not repeat identically; traced in full")


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


# -- one traced run -----------------------------------------------------------------------------


def traced_run(
    spec: ModelSpec,
    setup: TrainingSetup,
    mode: Mode,
    steps: int,
    backend: Backend,
    hf_config: dict[str, Any] | None,
    seed: int,
    num_layers: int | None,
) -> TracedRun:
    torch.manual_seed(seed)
    model, built = prepare_model(
        spec, setup, backend=backend, hf_config=hf_config, num_layers=num_layers
    )
    tracker = MemoryTracker()
    fake = mode == "fake"
    fake_scope = _fake_mode(fake, built.notes)
    with _third_party_warnings_muted(), fake_scope, tracker, _unpacked_sequences():
        session = load_session(model, built, setup, fake=fake, tracker=tracker)
        hooks = ModuleHooks(tracker, model, lm_head=lm_head_of(model), layers=_layers(model))
        with hooks, tracker.saving_hooks():
            for step in range(steps):
                train_step(session, step)
    tracker.close()
    return TracedRun(tracker, session, _layer_prefix(model), built.notes)


def prepare_model(
    spec: ModelSpec,
    setup: TrainingSetup,
    *,
    backend: Backend = "auto",
    hf_config: dict[str, Any] | None = None,
    num_layers: int | None = None,
) -> tuple[nn.Module, BuiltModel]:
    """The model of ``setup`` on the meta device, the method applied (allocates nothing)."""
    with _third_party_warnings_muted():
        built = build_meta_model(
            spec, setup, backend=backend, hf_config=hf_config, num_layers=num_layers
        )
        return apply_method(built, spec, setup), built


def run_steps(
    model: nn.Module,
    built: BuiltModel,
    setup: TrainingSetup,
    *,
    steps: int,
    before_step: Callable[[int], None] | None = None,
) -> Session:
    """Materialize on the CPU and train, with no tracker (for other instruments: MemTracker)."""
    with _third_party_warnings_muted(), _unpacked_sequences():
        session = load_session(model, built, setup, fake=False, tracker=None)
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            train_step(session, step)
    return session


def _layers(model: nn.Module) -> list[nn.Module]:
    return [layer for stack in decoder_layer_stacks(model) for layer in stack]


def _layer_prefix(model: nn.Module) -> str:
    """Dotted name of the decoder layer list (``model.layers``; under peft with its prefix)."""
    stacks = decoder_layer_stacks(model)
    if len(stacks) != 1:
        return "<no single layer stack>"
    first = stacks[0][0]
    name = next(n for n, m in model.named_modules() if m is first)
    return str(name.rsplit(".", 1)[0])


@contextlib.contextmanager
def _fake_mode(fake: bool, notes: list[str]) -> Iterator[None]:
    if not fake:
        yield
        return
    with fake_tensors() as placeholders:
        yield
    if placeholders.reads:
        notes.append(f"{placeholders.reads} value reads of fake tensors answered with 1")


@contextlib.contextmanager
def _unpacked_sequences() -> Iterator[None]:
    """Tell transformers the batch holds one sequence per row.

    Without an attention mask, transformers reads position_ids to detect packed sequences
    (masking_utils.find_packed_sequence_indices); on fake tensors it cannot read them and
    assumes packing, building a mask a real run would not. Our batches are never packed.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def _third_party_warnings_muted() -> Iterator[None]:
    """transformers and peft deprecate their own internals between releases; not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield

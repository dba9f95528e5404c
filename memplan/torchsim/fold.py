"""Fold the trace of a short model into the trace of a deep one, exactly.

A decoder of L identical layers emits, in every sweep over its layers (forward, backward,
materialization, each optimizer pass), the same events for every middle layer 1..L-2. A model
built with ``n`` layers therefore gives the L-layer trace by replacing each sweep's middle runs
with ``Repeat(run, L - 2)`` -- provided the middle runs really are identical, which
:func:`fold_events` checks (and :func:`memplan.torchsim.step.trace_step` verifies against a
second, one-layer-deeper trace).

Events are assigned to a layer by the module that ran when they happened (forward, loss,
backward, load) or by the name of the storage they concern (optimizer, zero_grad, where no
module runs: each state or temporary is named after its parameter).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from memplan.torchsim.records import RawEvent, StorageRecord
from memplan.torchsim.tracker import rounded_bytes
from memplan.trace import Event, Phase, Repeat, TraceItem

_CONTEXT_PHASES = (Phase.LOAD, Phase.FORWARD, Phase.LOSS, Phase.BACKWARD)


class FoldError(ValueError):
    """The layers of the traced model did not produce identical events."""


@dataclass(frozen=True, slots=True)
class _Run:
    layer: int | None
    events: tuple[Event, ...]

    def signature(self) -> tuple[tuple[int, str, str, int], ...]:
        return tuple((e.delta_bytes, e.category.value, e.phase.value, e.step) for e in self.events)


def _layer_of(text: str, pattern: re.Pattern[str]) -> int | None:
    match = pattern.search(text)
    return int(match.group(1)) if match else None


def keyed_events(
    pairs: Iterable[tuple[RawEvent, StorageRecord]], layer_prefix: str, granularity_bytes: int
) -> list[tuple[Event, int | None]]:
    """Each trace event with the decoder layer it belongs to (None: outside the layers)."""
    pattern = re.compile(rf"(?:^|\.){re.escape(layer_prefix)}\.(\d+)(?:\.|/|$)")
    out: list[tuple[Event, int | None]] = []
    for raw, record in pairs:
        delta = rounded_bytes(raw.new_nbytes, granularity_bytes) - rounded_bytes(
            raw.old_nbytes, granularity_bytes
        )
        if not delta:
            continue
        where = raw.context if raw.phase in _CONTEXT_PHASES else record.label
        event = Event(delta, record.category, raw.phase, raw.step, record.label)
        out.append((event, _layer_of(where, pattern)))
    return out


def _runs(keyed: Sequence[tuple[Event, int | None]]) -> list[_Run]:
    runs: list[_Run] = []
    current: list[Event] = []
    layer: int | None = None
    for event, key in keyed:
        if current and key != layer:
            runs.append(_Run(layer, tuple(current)))
            current = []
        current.append(event)
        layer = key
    if current:
        runs.append(_Run(layer, tuple(current)))
    return runs


def fold_events(
    keyed: Sequence[tuple[Event, int | None]], num_layers: int, target_layers: int
) -> list[TraceItem]:
    """The trace of ``target_layers`` layers from the events of ``num_layers`` (>= 4) layers."""
    if num_layers < 4:
        raise FoldError("folding needs at least 4 traced layers (2 middle ones to compare)")
    middle = set(range(1, num_layers - 1))
    items: list[TraceItem] = []
    pending: list[_Run] = []  # the middle runs of the current sweep
    for run in _runs(keyed):
        if run.layer in middle:
            pending.append(run)
            continue
        if pending:
            items.append(_fold_sweep(pending, middle, target_layers))
            pending = []
        items.extend(run.events)
    if pending:
        items.append(_fold_sweep(pending, middle, target_layers))
    return items


def _fold_sweep(runs: list[_Run], middle: set[int], target_layers: int) -> Repeat:
    layers = [r.layer for r in runs]
    if sorted(layers, key=lambda x: x or 0) != sorted(middle) or len(set(layers)) != len(layers):
        raise FoldError(f"a sweep over layers {layers} does not cover the middle layers once")
    first = runs[0].signature()
    if any(r.signature() != first for r in runs[1:]):
        raise FoldError(f"middle layers {layers} emit different events: they cannot be folded")
    label = f"layers {min(middle)}..{target_layers - 2} ({target_layers - 2}x)"
    return Repeat(runs[0].events, target_layers - 2, label)

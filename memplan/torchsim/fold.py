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
    """Each trace event with the decoder layer it belongs to (None: outside the layers).

    Where no layer runs (context phases) events between two neighbouring layers' runs belong to
    the first (the loop dropping the previous layer's output); elsewhere a free belongs to the
    layer that allocated the storage (autocast's cache emptied at the end of forward).
    """
    pattern = re.compile(rf"(?:^|\.){re.escape(layer_prefix)}\.(\d+)(?:\.|/|$)")
    events: list[Event] = []
    keys: list[int | None] = []
    by_label: list[int | None] = []
    for raw, record in pairs:
        delta = rounded_bytes(raw.new_nbytes, granularity_bytes) - rounded_bytes(
            raw.old_nbytes, granularity_bytes
        )
        if not delta:
            continue
        where = raw.context if raw.phase in _CONTEXT_PHASES else record.label
        events.append(Event(delta, record.category, raw.phase, raw.step, record.label))
        keys.append(_layer_of(where, pattern))
        by_label.append(_layer_of(record.label, pattern) if delta < 0 else None)
    return list(zip(events, _fill_gaps(keys, by_label), strict=True))


def _fill_gaps(keys: list[int | None], by_label: list[int | None]) -> list[int | None]:
    out = list(keys)
    start = 0
    while start < len(keys):
        if keys[start] is not None:
            start += 1
            continue
        end = start
        while end < len(keys) and keys[end] is None:
            end += 1
        before = keys[start - 1] if start > 0 else None
        after = keys[end] if end < len(keys) else None
        between = before is not None and after is not None and abs(before - after) == 1
        for i in range(start, end):
            out[i] = before if between else by_label[i]
        start = end
    return out


def _runs(keyed: Sequence[tuple[Event, int | None]]) -> list[_Run]:
    runs: list[_Run] = []
    current: list[Event] = []
    layer: int | None = None
    for event, key in keyed:
        if current and (
            key != layer or (event.phase, event.step) != (current[0].phase, current[0].step)
        ):
            runs.append(_Run(layer, tuple(current)))
            current = []
        current.append(event)
        layer = key
    if current:
        runs.append(_Run(layer, tuple(current)))
    return runs


def fold_events(
    keyed: Sequence[tuple[Event, int | None]],
    num_layers: int,
    target_layers: int,
    *,
    first_repeated: int = 1,
    period: int = 1,
) -> list[TraceItem]:
    """The trace of ``target_layers`` layers from the events of ``num_layers`` layers.

    Layers ``first_repeated .. num_layers - 2`` repeat in groups of ``period`` consecutive
    layers (2 when every second layer is checkpointed): every sweep over them must emit
    identical runs for each group (at least two groups, to compare), and becomes one
    ``Repeat`` of the group for the target's ``target_layers - 1 - first_repeated`` layers.
    Runs of a sweep that covers only part of them stay as they are (the caller verifies).
    """
    middle = list(range(first_repeated, num_layers - 1))
    copies, rest = divmod(target_layers - 1 - first_repeated, period)
    if len(middle) < 2 * period or len(middle) % period or rest:
        raise FoldError(
            f"layers {middle} do not hold two whole groups of {period} "
            f"(or {target_layers} layers do not continue them)"
        )
    items: list[TraceItem] = []
    pending: list[_Run] = []  # the repeated layers' runs of the current sweep
    for run in _runs(keyed):
        if run.layer in middle:
            pending.append(run)
            continue
        items.extend(_fold_sweep(pending, middle, period, copies))
        pending = []
        items.extend(run.events)
    items.extend(_fold_sweep(pending, middle, period, copies))
    return items


def _fold_sweep(runs: list[_Run], middle: list[int], period: int, copies: int) -> list[TraceItem]:
    layers = [r.layer for r in runs]
    if sorted(layers, key=lambda x: x or 0) != middle:
        return [event for run in runs for event in run.events]  # a partial sweep: as traced
    groups = [runs[i : i + period] for i in range(0, len(runs), period)]
    signatures = [[run.signature() for run in group] for group in groups]
    if any(signature != signatures[0] for signature in signatures[1:]):
        raise FoldError(f"layers {layers} emit different events: they cannot be folded")
    events = tuple(event for run in groups[0] for event in run.events)
    return [Repeat(events, copies, f"{copies * period} layers, {period} at a time")]

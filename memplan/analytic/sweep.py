"""Allocated peaks of many setups at once: one symbolic trace per setup shape.

Setups that differ only in micro-batch and sequence length run the same ops on tensors of
different sizes (within one :func:`shape_regime`: a single sequence, or an SDPA mask, changes
which ops run). :func:`sweep_peaks` traces each such group once with symbolic sizes
(:mod:`memplan.analytic.symbolic`) and evaluates the trace for every member with numpy: each
repeated body is summarized once for all members (prefix sums, first maximum), exactly as
:meth:`memplan.trace.Trace.peak` does for one. Groups the symbolic trace cannot express
(encoder-decoder models, sizes past int64, attention whose matmul copies depend on the
micro-batch) are predicted one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.analytic.context import StepContext
from memplan.analytic.predict import predict
from memplan.analytic.symbolic import NotSymbolicError, Size, Term, term_values
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup
from memplan.trace import ALLOCATED_CATEGORIES, Category, Event, Peak, Repeat, Trace, TraceItem

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Ints = npt.NDArray[np.int64]

_CATEGORIES = tuple(Category)
_CATEGORY_INDEX = {c: i for i, c in enumerate(_CATEGORIES)}
# Each term of an event's size stays under 2**52 bytes (4 PiB), so sums of up to 1,024 terms
# cannot overflow int64; larger sizes are predicted one by one with Python integers.
_INT64_SAFE = float(2**52)


def shape_regime(spec: ModelSpec, setup: TrainingSetup) -> tuple[bool, ...]:
    """The decisions a step takes on its micro-batch and length (StepContext: ``batched``,
    ``sdpa_mask``): one symbolic trace holds for the shapes of one regime."""
    ctx = StepContext.build(spec, setup)
    return ctx.batched, ctx.sdpa_mask


def sweep_peaks(
    spec: ModelSpec, setups: Sequence[TrainingSetup], parallel: ParallelSetup | None = None
) -> list[Peak]:
    """``predict(spec, s, parallel).trace.peak()`` for every ``s`` in ``setups``, in order."""
    parallel = parallel or ParallelSetup()
    groups: dict[tuple[TrainingSetup, tuple[bool, ...]], list[int]] = {}
    for index, setup in enumerate(setups):
        shape = setup.model_copy(update={"micro_batch_size": 1, "seq_len": 1})
        groups.setdefault((shape, shape_regime(spec, setup)), []).append(index)
    peaks: list[Peak | None] = [None] * len(setups)
    for members in groups.values():
        try:
            trace = predict(spec, setups[members[0]], parallel, symbolic=True).trace
            found = trace_peaks(
                trace,
                [setups[i].micro_batch_size for i in members],
                [setups[i].seq_len for i in members],
            )
        except NotSymbolicError:
            found = [predict(spec, setups[i], parallel).trace.peak() for i in members]
        for i, peak in zip(members, found, strict=True):
            peaks[i] = peak
    return [p for p in peaks if p is not None]


def trace_peaks(trace: Trace, batch: Sequence[int], seq_len: Sequence[int]) -> list[Peak]:
    """The peak of a symbolic ``trace`` at every (batch, seq_len) pair."""
    import numpy as np

    events = _Events(trace.items)
    deltas = events.evaluate(np.asarray(batch, dtype=np.int64), np.asarray(seq_len, dtype=np.int64))
    body = _Summarizer(events, deltas).summarize(trace.items)
    if not body.has_peak:
        raise ValueError("an empty trace has no peak")
    out = []
    for k in range(len(batch)):
        event = events.items[int(body.peak_event[k])]
        breakdown = {c: int(body.peak_cat[_CATEGORY_INDEX[c], k]) for c in ALLOCATED_CATEGORIES}
        out.append(
            Peak(int(body.peak[k]), breakdown, event.phase, int(body.peak_step[k]), event.label)
        )
    return out


class _Events:
    """Every distinct Event object of a trace, and its size as a sum of terms."""

    def __init__(self, items: Sequence[TraceItem]) -> None:
        self.items: list[Event] = []
        self.index: dict[int, int] = {}
        seen: set[int] = set()
        self._collect(items, seen)

    def _collect(self, items: Sequence[TraceItem], seen: set[int]) -> None:
        for item in items:
            if type(item) is Event:
                if id(item) not in self.index:
                    self.index[id(item)] = len(self.items)
                    self.items.append(item)
            elif id(item) not in seen:
                assert isinstance(item, Repeat)
                seen.add(id(item))
                self._collect(item.items, seen)

    def evaluate(self, batch: Ints, seq_len: Ints) -> Ints:
        """delta_bytes of every event (rows) at every (batch, seq_len) pair (columns)."""
        import numpy as np

        terms: dict[Term, int] = {}
        rows: list[int] = []  # which term each (event, term) pair reads, event by event
        coefs: list[int] = []
        starts: list[int] = []
        for event in self.items:
            delta: Size | int = event.delta_bytes
            starts.append(len(rows))
            pairs = delta.terms.items() if isinstance(delta, Size) else (((0, 0), delta),)
            for term, coef in pairs:
                rows.append(terms.setdefault(term, len(terms)))
                coefs.append(coef)
        as_float = batch.astype(float), seq_len.astype(float)
        estimate = np.stack([term_values(t, *as_float) for t in terms])
        if np.abs(np.asarray(coefs, dtype=float)[:, None] * estimate[rows]).max() >= _INT64_SAFE:
            raise NotSymbolicError("sizes past exact int64 range")
        values = np.stack([term_values(t, batch, seq_len) for t in terms])
        parts = np.asarray(coefs, dtype=np.int64)[:, None] * values[rows]
        return np.add.reduceat(parts, np.asarray(starts), axis=0)


@dataclass
class _Body:
    """Summary of a run of items for K configurations (shapes: (K,) and (categories, K))."""

    has_peak: bool  # the run holds an event (the same for every configuration)
    net: Ints
    net_cat: Ints
    peak: Ints
    peak_cat: Ints
    peak_event: Ints  # index into _Events.items
    peak_step: Ints


class _Summarizer:
    def __init__(self, events: _Events, deltas: Ints) -> None:
        self.events = events
        self.deltas = deltas
        self.cache: dict[int, _Body] = {}

    def summarize(self, items: Sequence[TraceItem]) -> _Body:
        """memplan.trace._summarize, vectorized over configurations."""
        import numpy as np

        k = self.deltas.shape[1]
        c = len(_CATEGORIES)
        rows: list[tuple[Event | Repeat, _Body | None]] = []
        for item in items:
            if type(item) is Event:
                rows.append((item, None))
                continue
            assert isinstance(item, Repeat)
            body = self.cache.get(id(item))
            if body is None:
                body = self.cache[id(item)] = self.summarize(item.items)
            if item.times > 0 and body.has_peak:
                rows.append((item, body))
        n = len(rows)
        if n == 0:
            zeros, zeros_cat = np.zeros(k, np.int64), np.zeros((c, k), np.int64)
            return _Body(False, zeros, zeros_cat, zeros, zeros_cat, zeros, zeros)
        net = np.empty((n, k), np.int64)  # each row's net change
        net_cat = np.zeros((n, c, k), np.int64)
        rise = np.empty((n, k), np.int64)  # its highest point above the total before it
        rise_cat = np.zeros((n, c, k), np.int64)
        peak_event = np.empty((n, k), np.int64)
        peak_step = np.empty((n, k), np.int64)
        for i, (item, body) in enumerate(rows):
            if body is None:
                assert isinstance(item, Event)
                index = self.events.index[id(item)]
                row = self.deltas[index]
                net[i] = rise[i] = row
                net_cat[i, _CATEGORY_INDEX[item.category]] = row
                rise_cat[i, _CATEGORY_INDEX[item.category]] = row
                peak_event[i] = index
                peak_step[i] = item.step
                continue
            assert isinstance(item, Repeat)
            # The highest iteration is the last one when each leaves memory behind, else the first.
            before = np.where(body.net > 0, item.times - 1, 0)
            net[i] = item.times * body.net
            net_cat[i] = item.times * body.net_cat
            rise[i] = before * body.net + body.peak
            rise_cat[i] = before * body.net_cat + body.peak_cat
            peak_event[i] = body.peak_event
            peak_step[i] = body.peak_step if item.step is None else item.step
        before_total = np.cumsum(net, axis=0) - net
        at = np.argmax(before_total + rise, axis=0)  # the first highest point, as in _summarize
        cols = np.arange(k)
        before_cat = np.cumsum(net_cat, axis=0) - net_cat
        return _Body(
            True,
            net.sum(axis=0),
            net_cat.sum(axis=0),
            (before_total + rise)[at, cols],
            (before_cat[at, :, cols] + rise_cat[at, :, cols]).T,
            peak_event[at, cols],
            peak_step[at, cols],
        )

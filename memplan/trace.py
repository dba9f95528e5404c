"""The memory trace: allocation and free events over training steps, shared by every source.

The analytical model, the fake-tensor simulator and the measured runs all produce a
:class:`Trace`. Each event adds or frees bytes of one :class:`Category` during one
:class:`Phase` of one step. Identical layers are written once inside a :class:`Repeat`, so a
126-layer model costs the analytical model a handful of events and the peak is still exact.

Byte counts are what the CUDA caching allocator counts as allocated: every block is rounded
up to 512 bytes (``memory_allocated``), see :func:`allocation_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from memplan._compat import StrEnum


class Phase(StrEnum):
    LOAD = "load"  # model, adapters and quantization state put on the device
    FORWARD = "forward"
    LOSS = "loss"  # LM head, logits upcast, cross-entropy
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"  # optimizer.step(); states created lazily on the first step
    ZERO_GRAD = "zero_grad"  # gradients set to None


class Category(StrEnum):
    """What a block of device memory holds."""

    FROZEN_WEIGHTS = "frozen_weights"  # parameters without gradients (base model under PEFT)
    QUANT_STATE = "quant_state"  # absmax scales and code books of quantized weights
    TRAINABLE_WEIGHTS = "trainable_weights"  # parameters the optimizer updates
    MASTER_WEIGHTS = "master_weights"  # fp32 copies of 16-bit trainable weights
    GRADIENTS = "gradients"  # .grad of trainable parameters (and reduce buckets)
    OPTIMIZER_STATE = "optimizer_state"  # Adam moments, momentum, factored statistics
    ACTIVATIONS = "activations"  # tensors saved for backward
    LOGITS = "logits"  # LM-head logits, their fp32 upcast, loss buffers and their gradients
    TEMPORARIES = "temporaries"  # transient workspaces: dequantized weights, gathers, op outputs
    # Outside the allocator's allocated bytes, reported beside the trace:
    CUDA_CONTEXT = "cuda_context"  # driver context, kernels, cuBLAS workspace (NVML only)
    ALLOCATOR_OVERHEAD = "allocator_overhead"  # reserved minus allocated (fragmentation)


ALLOCATED_CATEGORIES: Final[tuple[Category, ...]] = tuple(
    c for c in Category if c not in (Category.CUDA_CONTEXT, Category.ALLOCATOR_OVERHEAD)
)

# Parameters as loaded: resident from load to the end of training.
WEIGHT_CATEGORIES: Final[tuple[Category, ...]] = (
    Category.FROZEN_WEIGHTS,
    Category.QUANT_STATE,
    Category.TRAINABLE_WEIGHTS,
    Category.MASTER_WEIGHTS,
)
# Model state in the ZeRO paper's sense: weights, gradients and optimizer state.
MODEL_STATE_CATEGORIES: Final[tuple[Category, ...]] = (
    *WEIGHT_CATEGORIES,
    Category.GRADIENTS,
    Category.OPTIMIZER_STATE,
)

# The CUDA caching allocator hands out blocks in multiples of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize), and memory_allocated sums block sizes.
ALLOCATION_GRANULARITY_BYTES: Final = 512


def allocation_bytes(num_bytes: int) -> int:
    """Bytes one tensor of ``num_bytes`` occupies in the caching allocator (512-byte blocks).

    >>> allocation_bytes(1), allocation_bytes(512), allocation_bytes(513)
    (512, 512, 1024)
    """
    if num_bytes <= 0:
        return 0
    if type(num_bytes) is not int:  # a symbolic size (memplan.analytic.symbolic), kept exact
        return num_bytes.round_up(ALLOCATION_GRANULARITY_BYTES)  # type: ignore[attr-defined,no-any-return]
    return -(-num_bytes // ALLOCATION_GRANULARITY_BYTES) * ALLOCATION_GRANULARITY_BYTES


class Event(NamedTuple):
    """``delta_bytes`` allocated (positive) or freed (negative) in ``category``.

    A named tuple: immutable like a frozen dataclass, and built several times faster (a
    prediction makes thousands). In a symbolic trace (``predict(..., symbolic=True)``)
    ``delta_bytes`` is a :class:`memplan.analytic.symbolic.Size`; only
    :mod:`memplan.analytic.sweep` evaluates those.
    """

    delta_bytes: int
    category: Category
    phase: Phase
    step: int = 0
    label: str = ""


@dataclass(frozen=True, slots=True)
class Repeat:
    """``items`` happening ``times`` times in a row (identical layers).

    ``step`` marks the items as belonging to that training step, whatever their own ``step``
    says, so one micro-batch's events can be reused for every step.
    """

    items: tuple[Event | Repeat, ...]
    times: int
    label: str = ""
    step: int | None = None


TraceItem = Event | Repeat


@dataclass(frozen=True, slots=True)
class Peak:
    """The largest allocated total of a trace, when it happens and what it holds."""

    peak_bytes: int
    breakdown_bytes: dict[Category, int]
    phase: Phase
    step: int
    label: str


@dataclass(slots=True)
class _Summary:
    """Net change and highest point (relative to the start) of a run of items."""

    net: dict[Category, int]
    net_total: int
    peak_total: int
    peak_state: dict[Category, int]
    peak_event: Event | None
    peak_step: int = 0


def _add(a: dict[Category, int], b: dict[Category, int], times: int = 1) -> dict[Category, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + times * value
    return out


def _summarize(items: Sequence[TraceItem], cache: dict[int, _Summary] | None = None) -> _Summary:
    """Net change and peak of ``items``; each Repeat's body is summarized once (``cache``)."""
    cache = {} if cache is None else cache
    # Pass 1, totals only: where the highest point is.
    total = peak_total = 0
    peak_at = -1
    bodies: list[_Summary | None] = []
    for index, item in enumerate(items):
        if type(item) is Event:
            bodies.append(None)
            total += item.delta_bytes
            if peak_at < 0 or total > peak_total:
                peak_total, peak_at = total, index
            continue
        assert isinstance(item, Repeat)
        body = cache.get(id(item))
        if body is None:
            body = cache[id(item)] = _summarize(item.items, cache)
        bodies.append(body)
        if item.times <= 0 or body.peak_event is None:
            continue
        # The highest iteration is the last one when each iteration leaves memory behind
        # (saved activations), otherwise the first.
        before_peak = item.times - 1 if body.net_total > 0 else 0
        candidate = total + before_peak * body.net_total + body.peak_total
        if peak_at < 0 or candidate > peak_total:
            peak_total, peak_at = candidate, index
        total += item.times * body.net_total
    # Pass 2, by category: the net change, and what is held at the peak.
    state: dict[Category, int] = {}
    summary = _Summary(
        net=state, net_total=total, peak_total=peak_total, peak_state={}, peak_event=None
    )
    for index, item in enumerate(items):
        body = bodies[index]
        if body is None:
            assert isinstance(item, Event)
            state[item.category] = state.get(item.category, 0) + item.delta_bytes
            if index == peak_at:
                summary.peak_state, summary.peak_event = dict(state), item
                summary.peak_step = item.step
            continue
        assert isinstance(item, Repeat)
        if item.times <= 0 or body.peak_event is None:
            continue
        if index == peak_at:
            before_peak = item.times - 1 if body.net_total > 0 else 0
            summary.peak_state = _add(_add(state, body.net, before_peak), body.peak_state)
            summary.peak_event = body.peak_event
            summary.peak_step = body.peak_step if item.step is None else item.step
        for key, value in body.net.items():
            state[key] = state.get(key, 0) + item.times * value
    return summary


def _expand(
    items: Iterable[TraceItem],
    step: int | None = None,
    *,
    collapse: bool = False,
    relabel: bool = True,
) -> Iterator[Event]:
    for item in items:
        if isinstance(item, Event):
            if relabel and step is not None and item.step != step:
                item = Event(item.delta_bytes, item.category, item.phase, step, item.label)
            yield item
        else:
            inner = item.step if step is None else step  # the outermost step wins
            times = item.times
            if collapse and times > 2 and not any(_summarize(item.items).net.values()):
                # A body that frees all it allocates leaves the same state after every pass:
                # later passes repeat the same totals (and the same allocator decisions).
                times = 2
            for _ in range(times):
                yield from _expand(item.items, inner, collapse=collapse, relabel=relabel)


def _phase_peaks(
    items: Iterable[TraceItem],
    start: int,
    step: int | None,
    out: dict[tuple[int, Phase], int],
    cache: dict[tuple[int, int | None], tuple[int, dict[tuple[int, Phase], int]]],
) -> int:
    """Fold the (step, phase) maxima of ``items`` begun at ``start`` into ``out``; return the end.

    A Repeat's body is folded once, relative to zero: when each pass leaves memory behind its
    highest points are in the last pass, otherwise in the first.
    """
    total = start
    for item in items:
        if isinstance(item, Event):
            total += item.delta_bytes
            key = (item.step if step is None else step, item.phase)
            if total > out.get(key, total - 1):
                out[key] = total
            continue
        inner = item.step if step is None else step
        cache_key = (id(item), inner)
        if cache_key not in cache:
            body: dict[tuple[int, Phase], int] = {}
            net = _phase_peaks(item.items, 0, inner, body, cache)
            cache[cache_key] = (net, body)
        net, body = cache[cache_key]
        if item.times <= 0:
            continue
        offset = total + (item.times - 1) * net if net > 0 else total
        for key, value in body.items():
            if value + offset > out.get(key, value + offset - 1):
                out[key] = value + offset
        total += item.times * net
    return total


@dataclass
class Trace:
    """Memory events of one or more training steps from one source."""

    source: str
    items: list[TraceItem] = field(default_factory=list)

    def add(self, item: TraceItem) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[TraceItem]) -> None:
        self.items.extend(items)

    def events(self, *, collapse_balanced: bool = False, relabel: bool = True) -> Iterator[Event]:
        """Every event in order, repeats unrolled (for timelines and tests).

        With ``collapse_balanced`` a Repeat whose body frees everything it allocates (identical
        micro-batches of gradient accumulation) is unrolled at most twice: peaks, phase peaks
        and an allocator replay come out the same.
        """
        return _expand(self.items, collapse=collapse_balanced, relabel=relabel)

    def peak(self) -> Peak:
        """The highest allocated total, its phase and its breakdown by category."""
        summary = _summarize(self.items)
        if summary.peak_event is None:
            raise ValueError("an empty trace has no peak")
        breakdown = {c: summary.peak_state.get(c, 0) for c in ALLOCATED_CATEGORIES}
        event = summary.peak_event
        return Peak(summary.peak_total, breakdown, event.phase, summary.peak_step, event.label)

    def final_bytes(self) -> dict[Category, int]:
        """What is still allocated after the last event, by category."""
        return _summarize(self.items).net

    def timeline(self) -> list[tuple[Event, int]]:
        """(event, allocated total after it) for every event."""
        out: list[tuple[Event, int]] = []
        total = 0
        for event in self.events():
            total += event.delta_bytes
            out.append((event, total))
        return out

    def category_peaks(self) -> dict[Category, int]:
        """The most each category holds at any point of the trace (its high-water mark)."""
        live: dict[Category, int] = {}
        most: dict[Category, int] = {}
        for event in self.events(collapse_balanced=True, relabel=False):
            value = live.get(event.category, 0) + event.delta_bytes
            live[event.category] = value
            if value > most.get(event.category, 0):
                most[event.category] = value
        return {c: most.get(c, 0) for c in ALLOCATED_CATEGORIES}

    def phase_peaks(self) -> dict[tuple[int, Phase], int]:
        """Highest allocated total reached in each (step, phase), without unrolling repeats."""
        peaks: dict[tuple[int, Phase], int] = {}
        _phase_peaks(self.items, 0, None, peaks, {})
        return peaks

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "items": [_item_to_json(i) for i in self.items]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Trace:
        items = data.get("items", [])
        assert isinstance(items, list)
        return cls(source=str(data["source"]), items=[_item_from_json(i) for i in items])


def _item_to_json(item: TraceItem) -> dict[str, object]:
    if isinstance(item, Event):
        return {
            "delta_bytes": item.delta_bytes,
            "category": item.category.value,
            "phase": item.phase.value,
            "step": item.step,
            "label": item.label,
        }
    return {
        "repeat": item.times,
        "label": item.label,
        "step": item.step,
        "items": [_item_to_json(i) for i in item.items],
    }


def _item_from_json(data: dict[str, object]) -> TraceItem:
    if "repeat" in data:
        items = data["items"]
        assert isinstance(items, Sequence)
        step = data.get("step")
        return Repeat(
            tuple(_item_from_json(i) for i in items),
            int(str(data["repeat"])),
            str(data["label"]),
            None if step is None else int(str(step)),
        )
    return Event(
        int(str(data["delta_bytes"])),
        Category(str(data["category"])),
        Phase(str(data["phase"])),
        int(str(data.get("step", 0))),
        str(data.get("label", "")),
    )

"""The trace: closed-form peaks of repeated items equal the unrolled timeline's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan.trace import (
    ALLOCATED_CATEGORIES,
    Category,
    Event,
    Peak,
    Phase,
    Repeat,
    Trace,
    TraceItem,
    allocation_bytes,
)

ACT, TMP, W = Category.ACTIVATIONS, Category.TEMPORARIES, Category.TRAINABLE_WEIGHTS
FWD, BWD = Phase.FORWARD, Phase.BACKWARD


def _unrolled_peak(trace: Trace) -> Peak:
    """The peak by brute force: walk every event, keep the first highest total."""
    state: dict[Category, int] = {}
    best: Peak | None = None
    total = 0
    for event in trace.events():
        state[event.category] = state.get(event.category, 0) + event.delta_bytes
        total += event.delta_bytes
        if best is None or total > best.peak_bytes:
            breakdown = {c: state.get(c, 0) for c in ALLOCATED_CATEGORIES}
            best = Peak(total, breakdown, event.phase, event.step, event.label)
    assert best is not None
    return best


# -- strategies ----------------------------------------------------------------------------

_events = st.builds(
    Event,
    delta_bytes=st.integers(-(2**20), 2**20),
    category=st.sampled_from(ALLOCATED_CATEGORIES),
    phase=st.sampled_from(list(Phase)),
    step=st.integers(0, 2),
    label=st.sampled_from(["a", "b", "c", "d"]),
)


def _repeat(children: st.SearchStrategy[list[TraceItem]]) -> st.SearchStrategy[Repeat]:
    return st.builds(
        Repeat,
        items=children.map(tuple),
        times=st.integers(0, 6),
        label=st.just("r"),
        step=st.none() | st.integers(0, 3),
    )


_items: st.SearchStrategy[list[TraceItem]] = st.recursive(
    st.lists(_events, min_size=1, max_size=6),
    lambda children: st.lists(_events | _repeat(children), min_size=1, max_size=5),
    max_leaves=30,
)


def _nonempty(items: list[TraceItem]) -> bool:
    return next(Trace("t", items).events(), None) is not None


# -- peak ----------------------------------------------------------------------------------


@given(_items.filter(_nonempty))
def test_peak_of_nested_repeats_equals_peak_of_the_unrolled_trace(items: list[TraceItem]) -> None:
    trace = Trace("hypothesis", items)
    closed_form = trace.peak()
    brute = _unrolled_peak(trace)
    assert closed_form.peak_bytes == brute.peak_bytes
    assert closed_form.breakdown_bytes == brute.breakdown_bytes
    assert (closed_form.phase, closed_form.step, closed_form.label) == (
        brute.phase,
        brute.step,
        brute.label,
    )


@given(_items.filter(_nonempty))
def test_breakdown_sums_to_the_peak(items: list[TraceItem]) -> None:
    peak = Trace("hypothesis", items).peak()
    assert sum(peak.breakdown_bytes.values()) == peak.peak_bytes
    assert set(peak.breakdown_bytes) == set(ALLOCATED_CATEGORIES)


@given(_items)
def test_final_bytes_equal_the_sum_of_every_unrolled_event(items: list[TraceItem]) -> None:
    trace = Trace("hypothesis", items)
    expected: dict[Category, int] = {}
    for event in trace.events():
        expected[event.category] = expected.get(event.category, 0) + event.delta_bytes
    final = trace.final_bytes()
    assert {c: v for c, v in final.items() if v} == {c: v for c, v in expected.items() if v}


def test_growing_repeat_peaks_in_its_last_iteration() -> None:
    # Each layer keeps 100 B of activations and a 50 B transient: after 4 layers 400 B are
    # held; the peak is the 4th layer's transient on top of the 3 layers before it and its
    # own 100 B: 3 * 100 + 100 + 50 = 450.
    layer = (Event(100, ACT, FWD, 0, "saved"), Event(50, TMP, FWD, 0, "t"), Event(-50, TMP, FWD))
    trace = Trace("t", [Repeat(layer, 4)])
    peak = trace.peak()
    assert peak.peak_bytes == 450
    assert peak.breakdown_bytes[ACT] == 400
    assert peak.breakdown_bytes[TMP] == 50
    assert peak.label == "t"


def test_shrinking_repeat_peaks_in_its_first_iteration() -> None:
    # 1000 B of activations, then 4 backward layers each taking a 300 B gradient and freeing
    # 250 B: the first layer peaks at 1000 + 300 = 1300, each later one 250 B lower... net -250
    # per iteration, so the first iteration is the highest.
    layer = (Event(300, TMP, BWD, 0, "grad"), Event(-300, TMP, BWD), Event(-250, ACT, BWD))
    trace = Trace("t", [Event(1000, ACT, FWD), Repeat(layer, 4)])
    peak = trace.peak()
    assert (peak.peak_bytes, peak.phase, peak.label) == (1300, BWD, "grad")
    assert trace.final_bytes()[ACT] == 0


def test_repeat_step_overrides_the_steps_of_its_events() -> None:
    step_items = (Event(10, W, Phase.LOAD, 0, "w"), Event(-10, W, Phase.ZERO_GRAD, 0, "w"))
    trace = Trace(
        "t", [Repeat(step_items, 1, "step 0", step=0), Repeat(step_items, 1, "s", step=1)]
    )
    assert [e.step for e in trace.events()] == [0, 0, 1, 1]
    assert trace.peak().step == 0  # the first of two equal peaks


def test_repeat_zero_times_contributes_nothing() -> None:
    trace = Trace("t", [Event(5, ACT, FWD), Repeat((Event(1000, ACT, FWD),), 0)])
    assert trace.peak().peak_bytes == 5
    assert trace.final_bytes() == {ACT: 5}


def test_empty_trace_has_no_peak() -> None:
    with pytest.raises(ValueError, match="empty trace"):
        Trace("t", [Repeat((Event(1, ACT, FWD),), 0)]).peak()


# -- phases, timeline ----------------------------------------------------------------------


def test_phase_peaks_are_the_highest_total_inside_each_step_and_phase() -> None:
    trace = Trace(
        "t",
        [
            Event(100, W, Phase.LOAD, 0),
            Event(40, ACT, FWD, 0),  # 140
            Event(30, TMP, FWD, 0),  # 170: forward peak of step 0
            Event(-30, TMP, FWD, 0),  # 140
            Event(60, Category.LOGITS, Phase.LOSS, 0),  # 200: loss peak
            Event(-60, Category.LOGITS, Phase.LOSS, 0),  # 140
            Event(20, Category.GRADIENTS, BWD, 0),  # 160
            Event(-40, ACT, BWD, 0),  # 120
            Event(40, ACT, FWD, 1),  # 160: forward peak of step 1
        ],
    )
    assert trace.phase_peaks() == {
        (0, Phase.LOAD): 100,
        (0, FWD): 170,
        (0, Phase.LOSS): 200,
        (0, BWD): 160,
        (1, FWD): 160,
    }
    assert [total for _, total in trace.timeline()] == [100, 140, 170, 140, 200, 140, 160, 120, 160]


# -- JSON ----------------------------------------------------------------------------------


@given(_items)
def test_json_round_trip_preserves_every_item(items: list[TraceItem]) -> None:
    trace = Trace("hypothesis", items)
    text = json.dumps(trace.to_json())
    again = Trace.from_json(json.loads(text))
    assert again == trace
    assert list(again.events()) == list(trace.events())


def test_json_round_trip_keeps_the_step_of_a_repeat() -> None:
    trace = Trace("t", [Repeat((Event(8, ACT, FWD, 0, "x"),), 2, "step 1", step=1)])
    again = Trace.from_json(json.loads(json.dumps(trace.to_json())))
    assert [e.step for e in again.events()] == [1, 1]


# -- allocation granularity ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "allocated"), [(0, 0), (-3, 0), (1, 512), (512, 512), (513, 1024), (4096, 4096)]
)
def test_allocation_bytes_round_up_to_512(nbytes: int, allocated: int) -> None:
    assert allocation_bytes(nbytes) == allocated

"""MemoryTracker on hand-written torch programs: what counts as an allocation, and its category."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from memplan.torchsim.records import Placement  # noqa: E402
from memplan.torchsim.tracker import MemoryTracker, rounded_bytes  # noqa: E402
from memplan.trace import Category, Phase  # noqa: E402

pytestmark = pytest.mark.torch


def _deltas(tracker: MemoryTracker) -> list[int]:
    return [e.delta_bytes for e in tracker.trace("test").events()]


def test_rounded_bytes_follow_the_caching_allocator_blocks() -> None:
    assert [rounded_bytes(n, 512) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]
    assert rounded_bytes(4000, 1) == 4000


def test_new_storage_allocates_views_and_in_place_ops_do_not() -> None:
    tracker = MemoryTracker()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes -> 4096
        view = a.view(10, 100)
        a.add_(1.0)
        doubled = a * 2
        del doubled, view
    tracker.close()
    assert _deltas(tracker) == [4096, 4096, -4096]


def test_storage_made_before_tracking_is_external() -> None:
    before = torch.ones(256)  # 1 KiB, not the tracker's to count
    tracker = MemoryTracker()
    with tracker:
        view = before.view(16, 16)
        plus_one = before + 1
        del view, plus_one
    tracker.close()
    assert _deltas(tracker) == [1024, -1024]
    assert [r.external for r in tracker.records] == [True, False]


def test_resize_in_place_changes_the_storage_size() -> None:
    tracker = MemoryTracker()
    with tracker:
        grown = torch.empty(0)
        grown.resize_(1000)
    tracker.close()
    assert _deltas(tracker) == [4096]


def test_saved_tensors_are_activations_the_rest_temporaries() -> None:
    weight = torch.randn(64, 64, requires_grad=True)
    tracker = MemoryTracker()
    tracker.set_phase(Phase.FORWARD)
    with tracker, tracker.saving_hooks():
        x = torch.randn(8, 64)  # saved by mm for the weight's gradient
        h = x @ weight  # consumed by relu, which saves its output instead
        y = h.relu()
        loss = y.sum()
    tracker.close()
    categories = {r.op: r.category for r in tracker.records if not r.external}
    assert categories == {
        "randn": Category.ACTIVATIONS,
        "mm": Category.TEMPORARIES,
        "relu": Category.ACTIVATIONS,
        "sum": Category.TEMPORARIES,
    }
    del loss


def test_a_storage_keeps_the_highest_priority_category() -> None:
    tracker = MemoryTracker()
    with tracker:
        grad = torch.zeros(128)
    tracker.mark_saved(grad)
    tracker.mark_gradient(grad, "w.grad")
    tracker.close()
    record = tracker.records[0]
    assert record.category is Category.GRADIENTS
    assert record.label == "w.grad"


def test_frees_that_happen_together_are_listed_in_allocation_order() -> None:
    tracker = MemoryTracker()
    with tracker:
        a = torch.empty(128)
        b = torch.empty(256)
        c = torch.empty(512)
        del c, b, a
    tracker.close()
    assert _deltas(tracker) == [512, 1024, 2048, -512, -1024, -2048]


def test_placements_outside_the_device_leave_the_trace() -> None:
    tracker = MemoryTracker()
    with tracker:
        state = torch.zeros(1024)
        kept = torch.zeros(1024)
    tracker.mark_optimizer_state(state, "p.state1", Placement.PAGED)
    tracker.close()
    assert _deltas(tracker) == [4096]
    everything = tracker.trace("all", placements=tuple(Placement))
    assert [e.delta_bytes for e in everything.events()] == [4096, 4096]
    del kept

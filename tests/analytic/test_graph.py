"""The symbolic autograd on a hand-sized segment: x -> mm(W) -> silu -> y.

x: 100 fp32 elements (400 B, one 512-byte block); mm's output h and silu's output y: 200 fp32
elements (800 B, two blocks); W's gradient: 4000 B (eight blocks). mm saves x (W needs a
gradient), silu saves its input h.
"""

from __future__ import annotations

import pytest

from memplan.analytic.graph import ParamGrad, Segment, Tensor, backward_events, forward_events
from memplan.dtypes import DType
from memplan.trace import Category, Event, Phase

ACT, TMP, GRAD = Category.ACTIVATIONS, Category.TEMPORARIES, Category.GRADIENTS
FWD, BWD = Phase.FORWARD, Phase.BACKWARD


def _segment() -> tuple[Segment, Tensor, Tensor]:
    seg = Segment("s")
    x = seg.input(100, DType.FP32, "x", requires_grad=True)
    h = seg.op("mm", [x], 200, DType.FP32, saves=[x], param_grads=[ParamGrad("w", 4000)])
    y = seg.op("silu", [h], 200, DType.FP32, saves=[h])
    return seg, x, y


def _deltas(events: list[Event]) -> list[tuple[int, Category]]:
    return [(e.delta_bytes, e.category) for e in events]


def test_forward_keeps_what_backward_needs() -> None:
    seg, _, y = _segment()
    result = forward_events(seg, phase=FWD, step=0, keep_saved=True, keep=[y])
    # h is saved by silu: an activation. y is the segment's output: kept, a temporary.
    assert _deltas(result.events) == [(1024, ACT), (1024, TMP)]
    assert [t.label for t in result.saved] == ["x", "s.mm"]
    assert sum(e.delta_bytes for e in result.events) == 2048


def test_forward_without_autograd_frees_after_last_use() -> None:
    seg, _, y = _segment()
    result = forward_events(seg, phase=FWD, step=0, keep_saved=False, keep=[y])
    # h allocated, x freed after mm (its last use), y allocated, h freed after silu.
    assert _deltas(result.events) == [(1024, TMP), (-512, TMP), (1024, TMP), (-1024, TMP)]
    assert result.saved == []


def test_backward_releases_saved_tensors_and_consumes_gradients() -> None:
    seg, x, y = _segment()
    forward_events(seg, phase=FWD, step=0, keep_saved=True, keep=[y])
    events, grads = backward_events(seg, phase=BWD, step=0, output_grads={id(y): (800, TMP)})
    assert _deltas(events) == [
        (1024, TMP),  # silu backward: dh
        (-1024, ACT),  # silu's saved h released (release_variables)
        (-1024, TMP),  # dy consumed
        (512, TMP),  # mm backward: dx
        (4096, GRAD),  # W.grad (the first gradient is stolen into .grad)
        (-512, ACT),  # mm's saved x released
        (-1024, TMP),  # dh consumed
    ]
    assert all(e.phase is BWD for e in events)
    # dx is left for the segment below.
    assert grads == {id(x): (400, TMP)}


def test_accumulated_micro_batches_add_into_the_existing_grad() -> None:
    seg, _, y = _segment()
    events, _ = backward_events(
        seg, phase=BWD, step=0, output_grads={id(y): (800, TMP)}, accumulate=True
    )
    # AccumulateGrad computes the new gradient into a temporary and adds it to .grad.
    assert (4096, TMP) in _deltas(events)
    assert (-4096, TMP) in _deltas(events)
    assert all(e.category is not GRAD for e in events)


def test_frozen_weight_saves_no_input() -> None:
    seg = Segment("s")
    x = seg.input(100, DType.FP32, "x", requires_grad=True)
    # mm with a frozen weight: autograd saves the weight (persistent), not x.
    h = seg.op("mm", [x], 200, DType.FP32, saves=[None])
    result = forward_events(seg, phase=FWD, step=0, keep_saved=True, keep=[h])
    assert _deltas(result.events) == [(1024, TMP), (-512, TMP)]


def test_passthrough_ops_share_the_incoming_gradient() -> None:
    seg = Segment("s")
    a = seg.input(256, DType.FP32, "a", requires_grad=True)
    b = seg.input(256, DType.FP32, "b", requires_grad=True)
    out = seg.op("add", [a, b], 256, DType.FP32, passthrough_grad=True)
    events, grads = backward_events(seg, phase=BWD, step=0, output_grads={id(out): (1024, TMP)})
    # add's backward hands the same gradient tensor to both inputs: nothing allocated.
    assert events == []
    assert grads == {id(a): (1024, TMP), id(b): (1024, TMP)}


@pytest.mark.parametrize(("numel", "blocks"), [(1, 1), (128, 1), (129, 2)])
def test_tensor_bytes_round_to_allocator_blocks(numel: int, blocks: int) -> None:
    seg = Segment("s")
    out = seg.op("make", [], numel, DType.FP32, requires_grad=False)
    result = forward_events(seg, phase=FWD, step=0, keep_saved=False, keep=[out])
    assert _deltas(result.events) == [(512 * blocks, TMP)]


def test_categories_are_replay_arguments_not_tensor_state() -> None:
    seg, _, y = _segment()
    result = forward_events(seg, phase=FWD, step=0, keep_saved=True, keep=[y], categories={y: ACT})
    assert _deltas(result.events) == [(1024, ACT), (1024, ACT)]
    assert y.category is TMP  # the segment is only read
    again = forward_events(seg, phase=FWD, step=0, keep_saved=True, keep=[y])
    assert _deltas(again.events) == [(1024, ACT), (1024, TMP)]


def test_backward_keeps_what_the_caller_holds() -> None:
    seg, x, y = _segment()
    forward_events(seg, phase=FWD, step=0, keep_saved=True, keep=[y])
    freed = [
        e.delta_bytes
        for e in backward_events(seg, phase=BWD, step=0, output_grads={id(y): (1024, TMP)})[0]
        if e.delta_bytes < 0
    ]
    held = [
        e.delta_bytes
        for e in backward_events(
            seg, phase=BWD, step=0, output_grads={id(y): (1024, TMP)}, keep=[x]
        )[0]
        if e.delta_bytes < 0
    ]
    # x (512 B, saved by mm) is released by mm's backward unless the caller holds it.
    assert sum(held) - sum(freed) == 512


@pytest.mark.parametrize(
    ("model", "ckpt"), [("tiny-llama", True), ("tiny-llama", False), ("tiny-t5", True)]
)
def test_a_step_leaves_the_model_graph_as_built(
    monkeypatch: pytest.MonkeyPatch, model: str, ckpt: bool
) -> None:
    """The composer passes categories and lifetimes to each replay: no replay can depend on
    the one before through state left on the graph's tensors."""
    import memplan.analytic.predict as predict_module
    from memplan.catalog import load_model
    from memplan.specs import TrainingSetup

    built = []
    original = predict_module.build_model_graph

    def build(*args: object, **kwargs: object) -> object:
        graph = original(*args, **kwargs)  # type: ignore[arg-type]
        built.append((graph, _tensor_state(graph)))
        return graph

    monkeypatch.setattr(predict_module, "build_model_graph", build)
    setup = TrainingSetup(method="lora", grad_ckpt=ckpt, micro_batch_size=2, seq_len=64)
    predict_module.predict(load_model(model), setup)
    graph, before = built[0]
    assert _tensor_state(graph) == before


def _tensor_state(graph: object) -> list[tuple[str, Category, bool]]:
    segments: list[Segment] = [graph.loss]  # type: ignore[attr-defined]
    for stack in graph.stacks:  # type: ignore[attr-defined]
        segments += [stack.embed, stack.norm, *(p.graph.segment for p in stack.layers)]
    return [
        (t.label, t.category, t.persistent)
        for seg in segments
        for op in seg.ops
        for t in (*op.inputs, op.output, *op.saved)
    ]

"""Symbolic traces evaluated for many (batch, seq_len) pairs against one prediction each."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from memplan.analytic import sweep as sweep_module
from memplan.analytic.predict import check_applicable, predict
from memplan.analytic.sweep import shape_regime, sweep_peaks, trace_peaks
from memplan.analytic.symbolic import NotSymbolicError
from memplan.catalog import catalog_names, load_model
from memplan.errors import MemplanError
from memplan.specs import ParallelSetup, TrainingSetup

from .test_invariants import MEDIUM, TINY, configs

_SHAPES = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 300)), min_size=1, max_size=4)


def _with_shape(setup: TrainingSetup, batch: int, seq_len: int) -> TrainingSetup:
    fields = setup.model_dump() | {"micro_batch_size": batch, "seq_len": seq_len}
    return TrainingSetup(**fields)


def _expected(name: str, setup: TrainingSetup, parallel: ParallelSetup, shapes: list) -> list:
    try:
        return [
            predict(load_model(name), _with_shape(setup, b, s), parallel).trace.peak()
            for b, s in shapes
        ]
    except MemplanError:
        assume(False)
        raise


@pytest.mark.parametrize("models", [TINY, MEDIUM], ids=["tiny", "real"])
@given(data=st.data())
def test_symbolic_trace_gives_every_peak_of_the_numeric_one(
    models: tuple[str, ...], data: st.DataObject
) -> None:
    # Peak bytes, breakdown by category, phase, step and the event that reaches it.
    name, setup, parallel = data.draw(configs(models))
    shapes = data.draw(_SHAPES)
    expected = _expected(name, setup, parallel, shapes)
    # One symbolic trace per regime of the shapes (a single sequence, an SDPA mask).
    spec = load_model(name)
    regimes: dict[tuple[bool, ...], list[int]] = {}
    for i, (b, s) in enumerate(shapes):
        regimes.setdefault(shape_regime(spec, _with_shape(setup, b, s)), []).append(i)
    for members in regimes.values():
        first = _with_shape(setup, *shapes[members[0]])
        try:
            trace = predict(spec, first, parallel, symbolic=True).trace
        except NotSymbolicError:
            # a kernel's padding the polynomials cannot hold exactly (memory-efficient SDPA's
            # log-sum-exp with a head count not a multiple of 4): the sweep plans such a
            # regime shape by shape (sweep.sweep_peaks falls back to predict)
            continue
        batch, seq_len = zip(*(shapes[i] for i in members), strict=True)
        assert trace_peaks(trace, batch, seq_len) == [expected[i] for i in members]


def test_sweep_keeps_the_order_of_mixed_setups(llama_2_7b) -> None:
    setups = [
        TrainingSetup(method=m, micro_batch_size=b, seq_len=s, grad_ckpt=ckpt)
        for b, s, m, ckpt in [
            (4, 2048, "lora", True),
            (1, 512, "qlora", True),
            (2, 1024, "lora", True),
            (1, 4096, "full", False),
            (8, 128, "qlora", True),
        ]
    ]
    expected = [predict(llama_2_7b, s).trace.peak() for s in setups]
    assert sweep_peaks(llama_2_7b, setups) == expected
    # The shapes differ: the 7B LoRA runs peak far apart.
    assert expected[0].peak_bytes > expected[2].peak_bytes


def test_sizes_past_int64_are_predicted_with_python_integers() -> None:
    # Eager attention scores of 1024 x 12 heads x (2**24 tokens)**2 x 4 bytes: past 2**63.
    spec = load_model("gpt2")
    setups = [
        TrainingSetup(method="frozen", attention="eager", seq_len=2**24, micro_batch_size=b)
        for b in (1024, 1)
    ]
    expected = [predict(spec, s).trace.peak() for s in setups]
    assert expected[0].peak_bytes > 2**63
    assert sweep_peaks(spec, setups) == expected


def test_an_empty_list_sweeps_to_nothing(llama_2_7b) -> None:
    assert sweep_peaks(llama_2_7b, []) == []


@pytest.mark.parametrize("name", ["t5-3b", "bert-base", "mixtral-8x7b", "gemma-2-9b"])
def test_every_family_traces_symbolically(name: str) -> None:
    setup = TrainingSetup(method="lora")
    trace = predict(load_model(name), setup, symbolic=True).trace
    assert trace_peaks(trace, [1, 3], [512, 77]) == [
        predict(load_model(name), _with_shape(setup, b, s)).trace.peak()
        for b, s in [(1, 512), (3, 77)]
    ]


def _applicable(spec: Any, setup: TrainingSetup) -> bool:
    """The setups a real run accepts (qlora's all-linear targets on Qwen3-MoE experts: not)."""
    try:
        check_applicable(spec, setup)
    except MemplanError:
        return False
    return True


@pytest.mark.parametrize("name", catalog_names())
def test_no_catalog_model_falls_back_to_one_by_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every catalog model traces symbolically for the setups people sweep."""
    numeric: list[TrainingSetup] = []
    real_predict = sweep_module.predict

    def spy(spec: Any, setup: TrainingSetup, parallel: Any = None, **kwargs: Any) -> Any:
        if not kwargs.get("symbolic"):
            numeric.append(setup)
        return real_predict(spec, setup, parallel, **kwargs)

    monkeypatch.setattr(sweep_module, "predict", spy)
    spec = load_model(name)
    setups = [
        setup
        for method in ("full", "lora", "qlora")
        for ckpt in (False, True)
        for b, s in ((1, 512), (4, 2048))
        if _applicable(
            spec,
            setup := TrainingSetup(method=method, grad_ckpt=ckpt, micro_batch_size=b, seq_len=s),
        )
    ]
    assert len(sweep_peaks(spec, setups)) == len(setups)
    assert numeric == []

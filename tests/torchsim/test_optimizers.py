"""Optimizer state as each optimizer stores it: torch's, and bitsandbytes' layout."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import Placement, TraceResult, trace_step  # noqa: E402
from memplan.trace import Category, Phase  # noqa: E402

pytestmark = pytest.mark.torch

EMBED_NUMEL = 1024 * 128  # embed_tokens and lm_head: the only tensors with >= 1e5 elements
FP32_WEIGHT_BYTES = 2525696  # tiny-llama's parameters in fp32, in 512-byte blocks


@functools.cache
def _full(optimizer: str, impl: str = "fused") -> TraceResult:
    setup = TrainingSetup(
        method="full", precision="fp32", optimizer=optimizer, optimizer_impl=impl, seq_len=32
    )
    return trace_step(load_model("tiny-llama"), setup, mode="fake", steps=1)


def _states(result: TraceResult) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        r.name.rsplit(".", 1)[1]: (r.shape, r.dtype)
        for r in result.records
        if r.is_optimizer_state and "layers.0.mlp.up_proj.weight" in r.name and "qmap" not in r.name
    }


def test_adamw_8bit_keeps_uint8_states_and_fp32_absmax_per_256() -> None:
    records = _full("adamw-8bit").records
    assert _states(_full("adamw-8bit")) == {
        "state1": ((352, 128), "uint8"),
        "state2": ((352, 128), "uint8"),
        "absmax1": ((176,), "float32"),  # 45056 / 256 blocks
        "absmax2": ((176,), "float32"),
    }
    small = [r for r in records if r.name.endswith("input_layernorm.weight.state1")]
    assert {(r.shape, r.dtype) for r in small} == {((128,), "float32")}  # < 4096 elements: 32-bit
    qmaps = [r for r in records if r.name.endswith((".qmap1", ".qmap2"))]
    assert [(r.shape, r.dtype) for r in qmaps] == [((256,), "float32")] * 2  # one each, shared


def test_paged_states_leave_the_device_trace() -> None:
    result = _full("paged-adamw")
    paged = 2 * 2 * 4 * EMBED_NUMEL  # embed and lm_head, two fp32 states each
    assert result.outside_allocator_bytes[Placement.PAGED] == paged
    on_device = result.trace.final_bytes()[Category.OPTIMIZER_STATE]
    assert on_device == 2 * FP32_WEIGHT_BYTES - paged


def test_lion_and_sgd_keep_one_fp32_buffer_per_parameter() -> None:
    for optimizer in ("lion", "sgd"):
        assert _full(optimizer).trace.final_bytes()[Category.OPTIMIZER_STATE] == FP32_WEIGHT_BYTES


def test_adafactor_factors_the_second_moment() -> None:
    states = _states(_full("adafactor"))
    assert states["row_var"] == ((352, 1), "float32")
    assert states["col_var"] == ((1, 128), "float32")
    assert states["step"] == ((), "float32")


def _live_optimizer_temporaries(result: TraceResult) -> int:
    live = most = 0
    for event in result.trace.events():
        if event.phase is Phase.OPTIMIZER and event.category is Category.TEMPORARIES:
            live += event.delta_bytes
            most = max(most, live)
    assert live == 0  # every temporary dies within the step
    return most


def test_optimizer_temporaries_depend_on_the_loop_strategy() -> None:
    # foreach: one temporary per parameter of the group at once (sqrt of exp_avg_sq): the
    # decay group is every matrix, all fp32 weights but the five 128-wide norm vectors.
    assert _live_optimizer_temporaries(_full("adamw", "foreach")) == FP32_WEIGHT_BYTES - 5 * 512
    assert _live_optimizer_temporaries(_full("adamw", "fused")) == 0  # one kernel, no scratch
    largest_param_bytes = 4 * EMBED_NUMEL
    assert _live_optimizer_temporaries(_full("adamw", "for-loop")) <= 3 * largest_param_bytes

"""Invariants of traced training steps on tiny-llama (2 layers, hidden 128, vocab 1024)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import Placement, TraceResult, trace_step  # noqa: E402
from memplan.trace import Category, Phase, allocation_bytes  # noqa: E402

pytestmark = pytest.mark.torch

SPEC = load_model("tiny-llama")
NUM_PARAM_TENSORS = 21  # embed, 2 x (7 linears + 2 norms), final norm, lm_head
# fp32 parameters in 512-byte blocks: embed and lm_head 1024x128, per layer q/o 128x128,
# k/v 64x128, gate/up/down 352x128, two norms of 128; final norm 128.
FP32_WEIGHT_BYTES = 2525696


def _trace(mode: str = "cpu", **fields: Any) -> TraceResult:
    return _cached_trace(mode, tuple(sorted(fields.items())))


@functools.cache
def _cached_trace(mode: str, fields: tuple[tuple[str, Any], ...]) -> TraceResult:
    setup = TrainingSetup(**{"micro_batch_size": 2, "seq_len": 64, **dict(fields)})
    return trace_step(SPEC, setup, mode=mode)  # type: ignore[arg-type]


def _totals_after(result: TraceResult, step: int, phase: Phase) -> dict[Category, int]:
    """Bytes held per category at the last event of (step, phase)."""
    totals: dict[Category, int] = {}
    snapshot: dict[Category, int] = {}
    for event in result.trace.events():
        totals[event.category] = totals.get(event.category, 0) + event.delta_bytes
        if (event.step, event.phase) == (step, phase):
            snapshot = dict(totals)
    return snapshot


def _weight_bytes(result: TraceResult, category: Category) -> int:
    return sum(allocation_bytes(r.nbytes) for r in result.records if r.weight_category is category)


def test_what_remains_after_zero_grad_is_weights_and_optimizer_state() -> None:
    result = _trace(method="full", precision="fp32", optimizer_impl="foreach")
    final = {c: b for c, b in result.trace.final_bytes().items() if b}
    assert final == {
        Category.TRAINABLE_WEIGHTS: FP32_WEIGHT_BYTES,
        Category.FROZEN_WEIGHTS: 2 * 512,  # rotary inv_freq and original_inv_freq buffers
        Category.OPTIMIZER_STATE: 2 * FP32_WEIGHT_BYTES,  # AdamW exp_avg, exp_avg_sq
    }
    assert _weight_bytes(result, Category.TRAINABLE_WEIGHTS) == FP32_WEIGHT_BYTES
    # foreach AdamW keeps its `step` counters on the host: outside the device trace
    assert result.outside_allocator_bytes[Placement.HOST] == NUM_PARAM_TENSORS * 4


def test_fused_adamw_keeps_its_step_counters_on_the_device() -> None:
    result = _trace(method="full", precision="fp32", optimizer_impl="fused")
    after_step0 = _totals_after(result, 0, Phase.OPTIMIZER)
    assert after_step0[Category.OPTIMIZER_STATE] == 2 * FP32_WEIGHT_BYTES + NUM_PARAM_TENSORS * 512
    assert result.outside_allocator_bytes[Placement.HOST] == 0


@pytest.mark.parametrize(
    ("fields", "grad_bytes"),
    [
        ({"method": "full", "precision": "fp32"}, FP32_WEIGHT_BYTES),
        ({"method": "full", "precision": "bf16-amp"}, FP32_WEIGHT_BYTES),  # fp32 weights
        ({"method": "full", "precision": "bf16"}, 1264128),  # bf16 weights and gradients
        # per layer fp32 adapters: q A 8x128, B 128x8, v A 8x128 (4 KiB each), v B 64x8 (2 KiB)
        ({"method": "lora", "precision": "bf16"}, 2 * (3 * 4096 + 2048)),
    ],
)
def test_gradients_equal_the_trainable_weights_in_their_dtype(
    fields: dict[str, Any], grad_bytes: int
) -> None:
    result = _trace(**fields)
    after_backward = _totals_after(result, 1, Phase.BACKWARD)
    assert after_backward[Category.GRADIENTS] == grad_bytes
    assert after_backward[Category.GRADIENTS] == _weight_bytes(result, Category.TRAINABLE_WEIGHTS)


def test_lazy_optimizer_state_appears_in_step_0_only() -> None:
    result = _trace(method="lora", precision="bf16")
    created = {
        (e.step, e.phase)
        for e in result.trace.events()
        if e.category is Category.OPTIMIZER_STATE and e.delta_bytes > 0
    }
    assert created == {(0, Phase.OPTIMIZER)}
    assert result.num_trainable_params == 2 * (8 * (128 + 128) + 8 * (128 + 64))  # q, v; r=8


def test_phase_peaks_cover_both_steps_and_reach_the_trace_peak() -> None:
    result = _trace(method="full", precision="bf16")
    phases = [Phase.FORWARD, Phase.LOSS, Phase.BACKWARD, Phase.ZERO_GRAD]
    expected = {(0, Phase.LOAD), (0, Phase.OPTIMIZER)} | {(s, p) for s in (0, 1) for p in phases}
    # the steady-state fused AdamW step allocates nothing, so step 1 has no optimizer events
    assert set(result.phase_peak_bytes) == expected
    assert max(result.phase_peak_bytes.values()) == result.peak_bytes


def test_loss_phase_tensors_are_the_logits_their_upcast_and_the_loss_buffers() -> None:
    result = _trace(method="full", precision="bf16")
    loss = [
        (r.op, r.shape, r.dtype, r.nbytes)
        for r in result.records
        if r.step == 0 and r.phase is Phase.LOSS and not r.external
    ]
    assert loss == [
        ("mm", (128, 1024), "bfloat16", 262144),  # lm_head logits (b*s, vocab)
        ("_to_copy", (2, 64, 1024), "float32", 524288),  # logits.float()
        ("constant_pad_nd", (2, 65), "int64", 1040),  # labels padded with -100
        ("clone", (2, 64), "int64", 1024),  # shifted labels .contiguous()
        ("_log_softmax", (128, 1024), "float32", 524288),  # cross_entropy's log-softmax
        ("nll_loss_forward", (), "float32", 4),  # the loss
        ("nll_loss_forward", (), "float32", 4),  # total weight
    ]
    assert {r.category for r in result.records if r.phase is Phase.LOSS} == {Category.LOGITS}


def test_logits_gradients_are_logits_until_the_lm_head_backward_ends() -> None:
    result = _trace(method="full", precision="bf16")
    window = [
        (r.op, r.shape, r.dtype)
        for r in result.records
        if r.step == 0 and r.phase is Phase.BACKWARD and r.category is Category.LOGITS
    ]
    assert window == [
        ("ones_like", (), "float32"),
        ("NllLossBackward0:nll_loss_backward", (128, 1024), "float32"),
        ("LogSoftmaxBackward0:_log_softmax_backward_data", (128, 1024), "float32"),
        ("ToCopyBackward0:_to_copy", (2, 64, 1024), "bfloat16"),
        ("MmBackward0:mm", (128, 128), "bfloat16"),  # gradient of the LM head's input
    ]


def test_traces_are_deterministic() -> None:
    first, second = (_trace("fake", method="full", precision="bf16-amp") for _ in range(2))
    assert list(first.trace.events()) == list(second.trace.events())


def test_qlora_keeps_quantization_state_in_its_own_category() -> None:
    result = _trace(method="qlora", grad_ckpt=False)
    # Per NF4 linear with double quant, in 512-byte blocks: uint8 absmax (one per 64 weights),
    # fp32 nested absmax, the 16-entry NF4 code, the 0-dim offset, and a 1 KiB copy of the
    # 256-entry 8-bit code. Attention (<= 16384 weights: 256 absmax codes) takes 5 blocks; the
    # MLP (45056 weights: 704 codes) 6.
    attention, mlp = 512 + 512 + 512 + 512 + 1024, 1024 + 512 + 512 + 512 + 1024
    shared_dynamic_code = 1024  # bnb's module-level name2qmap["dynamic"]
    expected = 2 * (4 * attention + 3 * mlp) + shared_dynamic_code
    assert result.trace.final_bytes()[Category.QUANT_STATE] == expected
    assert result.num_params == SPEC.num_params + result.num_trainable_params


def test_a_cpu_measurement_verifies_without_a_gpu(tmp_path: Path, run_cli: Any) -> None:
    """measure --device cpu --out, then verify: the same checks a GPU run gets, on CPU."""
    out = tmp_path / "run.json"
    measured = run_cli(
        "measure",
        "--model",
        "tiny-llama",
        "--method",
        "lora",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq",
        "64",
        "--out",
        str(out),
        "--json",
    )
    assert measured.code == 0, measured.err
    run = run_cli("verify", str(out), "--json")
    assert run.code == 0, run.err
    checks = {c["name"]: c for c in run.json()["runs"][0]["checks"]}
    assert {"allocated peak", "forward peak", "backward peak", "activations at peak"} <= set(checks)
    peak = checks["allocated peak"]
    assert peak["measured_bytes"] == measured.json()["peak_bytes"]
    assert abs(peak["predicted_bytes"] - peak["measured_bytes"]) <= 0.01 * peak["measured_bytes"]


def test_a_damaged_cpu_measurement_is_one_line(tmp_path: Path, run_cli: Any) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"traced": {"model": "tiny-llama"}, "trace": []}))
    run = run_cli("verify", str(path))
    assert run.code == 2
    assert run.err.count("\n") == 1
    assert "not a memplan measured run" in run.err

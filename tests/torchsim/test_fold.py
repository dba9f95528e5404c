"""Folding identical layers gives the trace of the full-depth model, event for event."""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import trace_step  # noqa: E402
from memplan.trace import Repeat  # noqa: E402

pytestmark = pytest.mark.torch


def _signature(result: Any) -> list[tuple[int, str, str, int]]:
    return [(e.delta_bytes, e.category.value, e.phase.value, e.step) for e in result.trace.events()]


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "lora", "precision": "bf16"},
        {"method": "full", "precision": "bf16-amp", "optimizer_impl": "foreach"},
        {"method": "qlora"},
        {"method": "adapter", "attention": "eager"},
    ],
    ids=["lora", "full-amp-foreach", "qlora-ckpt", "adapter-eager"],
)
def test_folded_trace_equals_the_traced_one(fields: dict[str, Any]) -> None:
    spec = load_model("tiny-llama").model_copy(update={"num_decoder_layers": 7})
    setup = TrainingSetup(micro_batch_size=1, seq_len=32, **fields)
    steps = 2 if fields["method"] == "lora" else 1  # step 1 repeats step 0 without new state
    folded = trace_step(spec, setup, mode="fake", steps=steps)
    traced = trace_step(spec, setup, mode="fake", fold=False, steps=steps)
    assert folded.layers_traced < 7
    assert traced.layers_traced == 7
    assert any(isinstance(item, Repeat) for item in folded.trace.items)
    assert _signature(folded) == _signature(traced)
    assert folded.peak_bytes == traced.peak_bytes
    # Host step counters and paged optimizer states of the full depth, outside the trace.
    assert folded.outside_allocator_bytes == traced.outside_allocator_bytes
    assert (folded.num_params, folded.num_trainable_params) == (
        traced.num_params,
        traced.num_trainable_params,
    )


def test_layers_checkpointed_alternately_fold_two_at_a_time() -> None:
    spec = load_model("tiny-llama").model_copy(update={"num_decoder_layers": 10})
    setup = TrainingSetup(method="lora", grad_ckpt=True, grad_ckpt_every=2, seq_len=32)
    folded = trace_step(spec, setup, mode="fake", steps=1)
    assert folded.notes[-1] == "traced 6 and 8 layers, folded to 10"
    assert _signature(folded) == _signature(
        trace_step(spec, setup, mode="fake", steps=1, fold=False)
    )


@pytest.mark.slow
def test_llama_2_70b_lora_step_simulates_in_well_under_a_minute() -> None:
    spec = load_model("llama-2-70b")
    setup = TrainingSetup(
        method="lora", precision="bf16", micro_batch_size=1, seq_len=2048, grad_ckpt=True
    )
    start = time.perf_counter()
    result = trace_step(spec, setup, mode="fake")
    assert time.perf_counter() - start < 60
    # sum(p.numel()) of Llama-2-70B, plus LoRA r=8 on q (8192 -> 8192) and v (8192 -> 1024)
    lora = 80 * 8 * ((8192 + 8192) + (8192 + 1024))
    assert result.num_trainable_params == lora == 16_384_000
    assert result.num_params == 68_976_648_192 + lora
    weights = result.trace.peak().breakdown_bytes
    assert weights[next(c for c in weights if c.value == "frozen_weights")] >= 2 * 68_976_648_192


def test_layers_of_two_kinds_fold_only_whole_patterns() -> None:
    # Gemma3's five sliding-window layers then a full one: short models of 4 and 5 layers hold
    # sliding layers only, so folding must go by whole patterns (here none fits: every layer
    # is traced); 64 tokens reach the 48-token window, so the kinds differ (the mask).
    from memplan.catalog import catalog_record

    base = load_model("tiny-gemma3")
    types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(16))
    layout = base.layout.model_copy(update={"layer_types": types})
    spec = base.model_copy(update={"num_decoder_layers": 16, "layout": layout})
    config = {**catalog_record("tiny-gemma3")["config"], "sliding_window_pattern": 6}
    setup = TrainingSetup(method="full", precision="bf16", seq_len=64, micro_batch_size=1)
    folded = trace_step(spec, setup, mode="fake", steps=1, hf_config=config)
    traced = trace_step(spec, setup, mode="fake", fold=False, steps=1, hf_config=config)
    assert _signature(folded) == _signature(traced)

"""Which parameters each method trains, and the notes the tracer attaches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import TraceResult, trace_step  # noqa: E402
from memplan.torchsim.methods import lora_target_modules  # noqa: E402
from memplan.trace import Phase  # noqa: E402

pytestmark = pytest.mark.torch


def _run(model: str, method: str, **fields: object) -> TraceResult:
    setup = TrainingSetup(method=method, seq_len=32, **fields)  # type: ignore[arg-type]
    return trace_step(load_model(model), setup, mode="fake", steps=1)


def test_lora_targets_come_from_roles() -> None:
    llama, gpt2 = load_model("tiny-llama"), load_model("tiny-gpt2")
    assert lora_target_modules(llama, None) == ["q_proj", "v_proj"]  # peft's Llama default
    assert lora_target_modules(llama, ("o", "down")) == ["down_proj", "o_proj"]
    assert lora_target_modules(gpt2, ("qkv", "o")) == ["attn.c_proj", "c_attn"]


def test_bitfit_without_biases_trains_nothing_and_says_so() -> None:
    result = _run("tiny-llama", "bitfit")
    assert result.num_trainable_params == 0
    assert "no biases" in " ".join(result.notes)
    assert {e.phase for e in result.trace.events()} == {Phase.LOAD, Phase.FORWARD, Phase.LOSS}


def test_bitfit_trains_the_linear_biases() -> None:
    # GPT-2 Conv1D biases per layer: c_attn 3h, attn.c_proj h, c_fc 4h, mlp.c_proj h (h=128)
    assert _run("tiny-gpt2", "bitfit").num_trainable_params == 2 * 9 * 128


def test_frozen_runs_forward_and_loss_only() -> None:
    result = _run("tiny-llama", "frozen")
    assert result.num_trainable_params == 0
    assert {e.phase for e in result.trace.events()} == {Phase.LOAD, Phase.FORWARD, Phase.LOSS}


def test_adapters_add_two_bottlenecks_per_layer() -> None:
    result = _run("tiny-llama", "adapter", adapter_size=64)
    per_adapter = (128 * 64 + 64) + (64 * 128 + 128)  # down and up with biases
    assert result.num_trainable_params == 2 * 2 * per_adapter


def test_prefix_tuning_trains_key_value_prefixes() -> None:
    result = _run("tiny-llama", "prefix", prefix_len=30)
    # peft PrefixTuning: prefix_len x layers x (key, value) x kv_heads * head_dim (GQA 2 x 32)
    assert result.num_trainable_params == 30 * 2 * 2 * 64


def test_flash_attention_is_traced_as_sdpa_and_noted() -> None:
    result = _run("tiny-llama", "lora", attention="flash")
    assert any("flash" in note for note in result.notes)


def test_families_without_sdpa_fall_back_to_eager() -> None:
    assert any("eager" in note for note in _run("tiny-gemma2", "lora").notes)

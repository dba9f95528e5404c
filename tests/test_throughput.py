"""FLOPs, time and cost estimates against hand-computed values."""

from __future__ import annotations

import pytest

from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.hardware import load_profile
from memplan.specs import TrainingSetup
from memplan.throughput import (
    attention_flops_per_token,
    compute_dtype,
    flops_per_token,
    matmul_params,
    parse_tokens,
)

LLAMA2_7B_LAYERS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o + gate, up, down
LLAMA2_7B_HEAD = 32000 * 4096  # untied lm_head


def test_parse_tokens() -> None:
    assert parse_tokens("50M") == 50_000_000
    assert parse_tokens("1.5B") == 1_500_000_000
    assert parse_tokens("2t") == 2 * 10**12
    assert parse_tokens("64k") == 64_000
    assert parse_tokens("123") == 123
    for bad in ("", "5Q", "-3M", "0", "M"):
        with pytest.raises(MemplanError):
            parse_tokens(bad)


def test_matmul_params_by_hand() -> None:
    m = matmul_params(load_model("llama-2-7b"))
    assert m.layer_params == LLAMA2_7B_LAYERS == 6_476_005_376
    assert m.head_params == LLAMA2_7B_HEAD
    # Embedding lookup and norms make up the rest of the 6,738,415,616 parameters.
    assert 6_738_415_616 - m.layer_params - m.head_params == 32000 * 4096 + 65 * 4096
    # GPT-2: tied head (the token embedding does the output projection), Conv1D projections.
    gpt2 = matmul_params(load_model("gpt2"))
    assert gpt2.layer_params == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)
    assert gpt2.head_params == 50257 * 768
    # Mixtral: the router and 2 of 8 experts per token.
    mixtral = matmul_params(load_model("mixtral-8x7b"))
    attention = 2 * 4096 * 4096 + 2 * 1024 * 4096
    experts = 2 * (2 * 14336 * 4096 + 4096 * 14336)
    assert mixtral.layer_params == 32 * (attention + 8 * 4096 + experts)


def test_attention_flops() -> None:
    spec = load_model("llama-2-7b")
    assert attention_flops_per_token(spec, 4096) == 4 * 32 * 4096 * 32 * 128
    mistral = load_model("mistral-7b")  # sliding window of 4096: no query sees more keys
    assert attention_flops_per_token(mistral, 8192) == attention_flops_per_token(mistral, 4096)
    assert attention_flops_per_token(mistral, 2048) == 4 * 32 * 2048 * 4096


def test_full_training_is_6n_plus_attention() -> None:
    spec = load_model("llama-2-7b")
    n = LLAMA2_7B_LAYERS + LLAMA2_7B_HEAD
    attn = 4 * 32 * 2048 * 4096
    f = flops_per_token(spec, TrainingSetup(seq_len=2048), 6_738_415_616)
    assert (f.forward, f.backward, f.recompute) == (2 * n + attn, 4 * n + 2 * attn, 0)
    assert f.total == 6 * n + 12 * 32 * 2048 * 4096  # PaLM Appendix B: 6N + 12 L H Q T


def test_checkpointing_recomputes_the_layers_forward() -> None:
    spec = load_model("llama-2-7b")
    attn = 4 * 32 * 2048 * 4096
    plain = flops_per_token(spec, TrainingSetup(seq_len=2048), 1)
    ckpt = flops_per_token(spec, TrainingSetup(seq_len=2048, grad_ckpt=True), 1)
    assert ckpt.recompute == 2 * LLAMA2_7B_LAYERS + attn  # the LM head is not recomputed
    assert ckpt.total == plain.total + ckpt.recompute
    # ~8N/6N: a third more compute.
    assert 1.30 < ckpt.total / plain.total < 1.34
    every_2nd = flops_per_token(spec, TrainingSetup(grad_ckpt=True, grad_ckpt_every=2), 1)
    assert every_2nd.recompute == (2 * LLAMA2_7B_LAYERS + 4 * 32 * 512 * 4096) * 16 // 32


def test_frozen_base_skips_weight_gradients() -> None:
    spec = load_model("tiny-llama")  # 2 layers, 4 heads of 32, vocab 1024, hidden 128
    n_layers, n_head, trainable = 368_640, 1024 * 128, 7168  # LoRA r=8 on q, v
    attn = 4 * 2 * 512 * 4 * 32
    f = flops_per_token(spec, TrainingSetup(method="lora"), trainable)
    forward = 2 * (n_layers + trainable) + 2 * n_head + attn
    assert f.forward == forward
    assert f.backward == forward + attn + 2 * trainable  # input grads + attention + adapter grads
    frozen = flops_per_token(spec, TrainingSetup(method="frozen"), 0)
    assert (frozen.forward, frozen.backward, frozen.recompute) == (
        2 * (n_layers + n_head) + attn,
        0,
        0,
    )


def test_devices_without_bf16_use_fp16() -> None:
    v100 = load_profile("v100-32gb")
    assert compute_dtype(TrainingSetup(method="lora"), v100) == "fp16"
    assert compute_dtype(TrainingSetup(), v100) == "fp16"  # bf16-amp
    assert compute_dtype(TrainingSetup(precision="fp32"), v100) is None
    assert compute_dtype(TrainingSetup(), load_profile("h100-sxm")) == "bf16"

"""What one Llama decoder layer saves for backward (tiny-llama, bf16, SDPA, b=2, s=64).

These lists are the reference the analytical model's activation terms are checked against:
(module inside the layer, allocating op, shape, dtype, bytes) of every storage autograd keeps.
h=128, i=352, 4 query / 2 key-value heads of 32, tokens b*s=128.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import TraceResult, trace_step  # noqa: E402
from memplan.trace import Category, Phase  # noqa: E402

pytestmark = pytest.mark.torch

Saved = tuple[str, str, tuple[int, ...], str, int]

# RMSNorm (LlamaRMSNorm) of a layer whose input needs a gradient: the fp32 upcast (pow, mul),
# the rsqrt; with a trainable weight also the bf16 normalized input and the output (q/k/v or
# gate/up matmuls save it for their weight gradients).
_NORM_FROZEN = [
    ("_to_copy", (2, 64, 128), "float32", 65536),
    ("rsqrt", (2, 64, 1), "float32", 512),
]
_NORM_TRAINED = [
    *_NORM_FROZEN,
    ("_to_copy", (2, 64, 128), "bfloat16", 32768),
    ("mul", (2, 64, 128), "bfloat16", 32768),
]
# SDPA saves q and k after RoPE, v, its output (b, heads, s, d; also o_proj's input, same
# storage: the CPU and CUDA flash kernels write it in (b, s, heads, d) order) and logsumexp.
_ATTENTION: list[Saved] = [
    ("self_attn", "add", (2, 4, 64, 32), "bfloat16", 32768),
    ("self_attn", "add", (2, 2, 64, 32), "bfloat16", 16384),
    ("self_attn", "_scaled_dot_product_flash_attention_for_cpu", (2, 4, 64, 32), "bfloat16", 32768),
    ("self_attn", "_scaled_dot_product_flash_attention_for_cpu", (2, 4, 64), "float32", 2048),
]
# SwiGLU: gate output (silu's input), silu output and up output (the product's inputs).
_MLP_FROZEN: list[Saved] = [
    ("mlp.gate_proj", "mm", (128, 352), "bfloat16", 90112),
    ("mlp.act_fn", "silu", (2, 64, 352), "bfloat16", 90112),
    ("mlp.up_proj", "mm", (128, 352), "bfloat16", 90112),
]
# peft LoRA on q and v: x cast to the fp32 adapter dtype (saved by lora_A, one copy per
# adapted projection) and lora_A's output (saved by lora_B); v's bf16 result is SDPA's value.
_LORA_QV: list[Saved] = [
    ("self_attn.q_proj", "_to_copy", (2, 64, 128), "float32", 65536),
    ("self_attn.q_proj.lora_A.default", "mm", (128, 8), "float32", 4096),
    ("self_attn.v_proj", "_to_copy", (2, 64, 128), "float32", 65536),
    ("self_attn.v_proj.lora_A.default", "mm", (128, 8), "float32", 4096),
    ("self_attn.v_proj", "_to_copy", (2, 64, 64), "bfloat16", 16384),
]

FULL_LAYER: list[Saved] = [
    *[("input_layernorm", *n) for n in _NORM_TRAINED],
    ("self_attn.v_proj", "mm", (128, 64), "bfloat16", 16384),
    *_ATTENTION,
    *[("post_attention_layernorm", *n) for n in _NORM_TRAINED],
    *_MLP_FROZEN,
    ("mlp", "mul", (2, 64, 352), "bfloat16", 90112),  # down_proj's input, for its weight grad
]
LORA_LAYER: list[Saved] = [
    *[("input_layernorm", *n) for n in _NORM_FROZEN],
    *_LORA_QV,
    *_ATTENTION,
    *[("post_attention_layernorm", *n) for n in _NORM_FROZEN],
    *_MLP_FROZEN,
]
# Layer 0 under LoRA: its input (the embedding) needs no gradient, so its norm saves nothing.
LORA_FIRST_LAYER: list[Saved] = LORA_LAYER[2:]


@functools.cache
def _trace(method: str) -> TraceResult:
    setup = TrainingSetup(method=method, precision="bf16", micro_batch_size=2, seq_len=64)
    return trace_step(load_model("tiny-llama"), setup, mode="cpu", steps=1)


def _saved_in_layer(result: TraceResult, layer: int) -> list[Saved]:
    prefix = f"layers.{layer}"
    return [
        (r.module.split(prefix, 1)[1].lstrip("."), r.op, r.shape, r.dtype, r.nbytes)
        for r in result.records
        if r.phase is Phase.FORWARD and r.category is Category.ACTIVATIONS and prefix in r.module
    ]


def test_full_fine_tuning_layer() -> None:
    assert _saved_in_layer(_trace("full"), 0) == FULL_LAYER
    assert _saved_in_layer(_trace("full"), 1) == FULL_LAYER
    b, s, h, i, heads, kv_heads, d = 2, 64, 128, 352, 4, 2, 32
    # 16bsh (two norms: fp32 upcast + two bf16) + 8bs (rsqrt) + 4bs*kv*d (v, k) + 4bs*heads*d
    # (q, output) + 4b*heads*s (logsumexp) + 8bsi (gate, silu, up, product)
    expected = 16 * b * s * h + 8 * b * s + 4 * b * s * kv_heads * d + 4 * b * s * heads * d
    expected += 4 * b * heads * s + 8 * b * s * i
    assert sum(saved[-1] for saved in FULL_LAYER) == expected == 723968


def test_lora_layer() -> None:
    assert _saved_in_layer(_trace("lora"), 1) == LORA_LAYER
    assert _saved_in_layer(_trace("lora"), 0) == LORA_FIRST_LAYER
    b, s, h, i, heads, kv_heads, d, r = 2, 64, 128, 352, 4, 2, 32, 8
    # 8bsh (two fp32 norm upcasts) + 8bs (rsqrt) + 8bsh (two fp32 adapter inputs) + 8bs*r
    # (two lora_A outputs) + 4bs*kv*d (v result, k) + 4bs*heads*d + 4b*heads*s + 6bsi
    expected = 16 * b * s * h + 8 * b * s + 8 * b * s * r + 4 * b * s * kv_heads * d
    expected += 4 * b * s * heads * d + 4 * b * heads * s + 6 * b * s * i
    assert sum(saved[-1] for saved in LORA_LAYER) == expected == 642048

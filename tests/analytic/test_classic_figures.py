"""Published rules of thumb, derived from first principles and checked against the model.

- full fine-tuning with AdamW under mixed precision: 16 bytes per parameter of model state
  (fp32 weights 4 + fp32 gradients 4 + Adam moments 8), so a 65B model needs over 1 TB;
- bf16 weights with torch AdamW (moments in the parameter dtype): 2 + 2 + 4 = 8 bytes;
- QLoRA (arXiv:2305.14314): LLaMA-65B in NF4 is ~34 GB of weights with double quantization
  (~37 GB without), embeddings and LM head staying 16-bit.
"""

from __future__ import annotations

import pytest

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.dtypes import DType
from memplan.specs import ModelSpec, TrainingSetup
from memplan.trace import MODEL_STATE_CATEGORIES as MODEL_STATE
from memplan.trace import Category

# LLaMA-65B: 80 layers of hidden 8192, SwiGLU width 22016, vocab 32000, untied head, MHA.
H, FFN, V, L = 8192, 22016, 32000, 80
LINEAR_SHAPES = [H * H] * 4 + [H * FFN] * 3  # q, k, v, o; gate, up, down
NUM_LINEARS = 7 * L


def blk(nbytes: int) -> int:
    """512-byte allocator blocks (kMinBlockSize)."""
    return -(-nbytes // 512) * 512


def test_llama_65b_shape(llama_65b: ModelSpec) -> None:
    assert (llama_65b.hidden_size, llama_65b.intermediate_size) == (H, FFN)
    assert (llama_65b.vocab_size, llama_65b.num_decoder_layers) == (V, L)
    linear = L * sum(LINEAR_SHAPES)
    embeddings = 2 * V * H  # embed_tokens and lm_head
    norms = (2 * L + 1) * H
    assert linear + embeddings + norms == llama_65b.num_params == 65_285_660_672


@pytest.mark.parametrize(
    ("precision", "bytes_per_param"),
    [
        ("bf16-amp", 16),  # fp32 weights 4 + fp32 grads 4 + fp32 exp_avg, exp_avg_sq 8
        ("fp32", 16),
        ("bf16", 8),  # bf16 weights 2 + bf16 grads 2 + bf16 moments 4 (torch AdamW, no master)
    ],
)
def test_full_fine_tuning_model_state_per_parameter(
    llama_65b: ModelSpec, precision: str, bytes_per_param: int
) -> None:
    prediction = predict(llama_65b, TrainingSetup(method="full", precision=precision))
    peak = prediction.trace.peak()
    state = sum(peak.breakdown_bytes[c] for c in MODEL_STATE)
    params = llama_65b.num_params
    assert params is not None
    # Exact but for allocator rounding: at most one 512-byte block per tensor and per kind
    # (weight, grad, two moments, the fused step counter): 723 tensors.
    num_tensors = 2 + L * 9 + 1
    assert 0 <= state - bytes_per_param * params <= 5 * 512 * num_tensors
    assert (
        peak.breakdown_bytes[Category.GRADIENTS] == peak.breakdown_bytes[Category.TRAINABLE_WEIGHTS]
    )  # every gradient exists at the peak (the end of backward)


def test_llama_65b_full_mixed_precision_needs_over_a_terabyte(llama_65b: ModelSpec) -> None:
    peak = predict(llama_65b, TrainingSetup(method="full", precision="bf16-amp")).trace.peak()
    assert peak.peak_bytes > 10**12
    non_state = peak.peak_bytes - sum(peak.breakdown_bytes[c] for c in MODEL_STATE)
    assert non_state > 0  # activations and workspaces come on top of the 16 bytes/param


def _nf4_bytes(*, double_quant: bool) -> int:
    """NF4 storage of LLaMA-65B's linears + 16-bit embeddings, head and norms, per tensor."""
    total = 0
    for numel in LINEAR_SHAPES:
        blocks = numel // 64  # one absmax per 64 weights
        packed = blk(numel // 2)  # two 4-bit codes per byte
        if double_quant:
            # uint8 absmax codes, fp32 scale per 256 blocks, 8-bit and 4-bit code books, offset
            state = blk(blocks) + blk(4 * -(-blocks // 256)) + blk(1024) + blk(64) + blk(4)
        else:
            state = blk(4 * blocks) + blk(64)  # fp32 absmax, 4-bit code book
        total += L * (packed + state)
    total += 2 * blk(2 * V * H)  # embed_tokens and lm_head stay bf16
    total += (2 * L + 1) * blk(2 * H)  # RMSNorm weights stay bf16
    total += 2 * blk(4 * 128 // 2)  # the rotary module's inv_freq buffers (fp32, head_dim / 2)
    if double_quant:
        total += blk(4 * 256)  # the shared 8-bit code book double quantization builds once
    return total


@pytest.mark.parametrize(("double_quant", "gb"), [(True, 34), (False, 37)])
def test_llama_65b_in_nf4(llama_65b: ModelSpec, double_quant: bool, gb: int) -> None:
    prediction = predict(llama_65b, TrainingSetup(method="qlora", double_quant=double_quant))
    by_category = prediction.state.bytes_by_category()
    base = by_category[Category.FROZEN_WEIGHTS] + by_category[Category.QUANT_STATE]
    assert base == _nf4_bytes(double_quant=double_quant)
    assert round(base / 10**9) == gb  # the QLoRA paper's "~34 GB / ~37 GB" (decimal GB)


def test_nf4_keeps_embeddings_head_and_norms_in_16_bit(llama_65b: ModelSpec) -> None:
    state = predict(llama_65b, TrainingSetup(method="qlora")).state
    unquantized = [g for g in state.groups if g.dtype is not DType.UINT8]
    labels = {g.label for g in unquantized if g.category is Category.FROZEN_WEIGHTS}
    assert labels == {
        "rotary_emb.inv_freq",
        "embeddings.embed_tokens.weight",
        "lm_head.lm_head.weight",
        "decoder_layer.input_layernorm.weight",
        "decoder_layer.post_attention_layernorm.weight",
        "final_norm.norm.weight",
    }
    weights = [g for g in unquantized if g.category is Category.FROZEN_WEIGHTS]
    assert {g.dtype for g in weights if g.label != "rotary_emb.inv_freq"} == {DType.BF16}
    packed = [
        g for g in state.groups if g.category is Category.FROZEN_WEIGHTS and g.dtype is DType.UINT8
    ]
    assert sum(g.count for g in packed) == NUM_LINEARS


@pytest.mark.parametrize(
    ("model", "setup", "trainable"),
    [
        # peft LoRA r=8 on q_proj, v_proj of Llama-2-7B: 32 layers x 2 x 8 x (4096 + 4096)
        ("llama-2-7b", TrainingSetup(method="lora"), 4_194_304),
        # QLoRA recipe on LLaMA-65B, r=64 on all 7 linears: 80 x 64 x (4 x 2 x 8192 + 3 x 30208)
        ("llama-65b", TrainingSetup(method="qlora"), 799_539_200),
    ],
)
def test_lora_trainable_parameters(model: str, setup: TrainingSetup, trainable: int) -> None:
    state = predict(load_model(model), setup).state
    assert state.num_trainable_params == trainable
    # LoRA weights are fp32 (peft autocast_adapter_dtype): 4 bytes each, 512-byte blocks.
    assert state.bytes_by_category()[Category.TRAINABLE_WEIGHTS] >= 4 * trainable

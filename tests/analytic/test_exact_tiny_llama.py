"""One small step, byte for byte: tiny-llama, bf16, full fine-tuning, batch 2 x 64, SDPA, AdamW.

Every expected number is derived here from the mechanism (which tensor exists, in which dtype,
rounded to the caching allocator's 512-byte blocks), not read back from memplan. The same
configuration run as a real PyTorch CPU step (memplan.torchsim) peaks within 0.05% of it
(the last test).
"""

from __future__ import annotations

import pytest

from memplan.analytic.predict import Prediction, predict
from memplan.specs import ModelSpec, TrainingSetup
from memplan.trace import Category, Phase

# tiny-llama (catalog/data/tiny-llama.json)
H, FFN, V = 128, 352, 1024  # hidden, intermediate, vocab
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 32, 2
B, S = 2, 64
T = B * S  # 128 tokens
BF16, FP32, INT64 = 2, 4, 8


def blk(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out: 512-byte multiples (kMinBlockSize)."""
    return -(-nbytes // 512) * 512


# Parameter tensors: (numel, count). q/o are H x H, k/v are (KV_HEADS * HEAD_DIM) x H, the
# SwiGLU gate/up/down are FFN x H, RMSNorm weights H; embeddings and the untied LM head V x H.
KV = KV_HEADS * HEAD_DIM
PARAMS = [
    (V * H, 1),  # embed_tokens
    (H * H, LAYERS),  # q_proj
    (KV * H, LAYERS),  # k_proj
    (KV * H, LAYERS),  # v_proj
    (H * H, LAYERS),  # o_proj
    (H, LAYERS),  # input_layernorm
    (H, LAYERS),  # post_attention_layernorm
    (FFN * H, LAYERS),  # gate_proj
    (FFN * H, LAYERS),  # up_proj
    (FFN * H, LAYERS),  # down_proj
    (H, 1),  # final norm
    (V * H, 1),  # lm_head
]
NUM_TENSORS = sum(count for _, count in PARAMS)  # 21

# Weights: every parameter its own bf16 allocation.
WEIGHT_BYTES = sum(blk(BF16 * numel) * count for numel, count in PARAMS)
# Fused torch AdamW: exp_avg and exp_avg_sq like the parameter (bf16), plus each parameter's
# step count as a 0-dim fp32 tensor on the device (fused kernels): one 512-byte block each.
ADAM_BYTES = 2 * WEIGHT_BYTES + blk(FP32) * NUM_TENSORS


def _rms_norm_saved() -> int:
    """LlamaRMSNorm saves x.float() (pow and the rstd mul), rsqrt's output (fp32 per row),
    the downcast normalized x (for the weight's gradient) and its output (read by the next
    matmuls, whose weights need gradients)."""
    return blk(T * H * FP32) + blk(T * FP32) + blk(T * H * BF16) + blk(T * H * BF16)


# On CUDA, SDPA picks flash (bf16, no mask, head size <= 256): mha_fwd's RNG state, a uint64
# [2], and an unused uint64 [], saved for backward (flash_api.cpp); CPU kernels save neither.
FLASH_RNG_BYTES = blk(2 * INT64) + blk(INT64)


def _layer_saved() -> int:
    attention = (
        blk(T * KV * BF16)  # v_proj output, saved by SDPA
        + blk(T * H * BF16)  # q after rotary, saved by SDPA (rotary itself saves only cos/sin)
        + blk(T * KV * BF16)  # k after rotary
        + blk(B * HEADS * S * FP32)  # SDPA's log-sum-exp per (batch, head, query)
        + FLASH_RNG_BYTES
        + blk(T * H * BF16)  # SDPA output: saved by SDPA and as o_proj's input
    )
    # gate_proj output (silu's input), silu output and up_proj output (the product's factors),
    # and the product (down_proj's input): four T x FFN bf16 tensors.
    mlp = 4 * blk(T * FFN * BF16)
    return 2 * _rms_norm_saved() + attention + mlp


# Activations alive when the forward ends: every layer's saved tensors, the final norm's, and
# the rotary cos/sin tables (seq x head_dim, saved by the rotary multiplications).
# The int64 input_ids are saved too: the trainable embedding's backward needs the indices.
ACTIVATION_BYTES = (
    LAYERS * _layer_saved() + _rms_norm_saved() + 2 * blk(S * HEAD_DIM * BF16) + blk(T * INT64)
)
# Loss peak: transformers upcasts the logits (logits.float()), log_softmax saves its fp32
# output; in backward nll_loss writes its fp32 input gradient and log_softmax_backward its own,
# while the saved output is still alive: 3 x tokens x vocab x 4 bytes. The bf16 logits were
# dropped with the model output, the upcast copy freed once log_softmax read it. The fp32
# loss and the ones_like seed loss.backward() gives its gradient live until backward returns.
LOGITS_BYTES = 3 * blk(T * V * FP32) + 2 * blk(FP32)
BATCH_BYTES = blk(T * INT64)  # the labels (input_ids are counted as saved activations)
# The rotary module's inv_freq and original_inv_freq buffers: head_dim / 2 fp32 values each.
BUFFER_BYTES = 2 * blk(HEAD_DIM // 2 * FP32)


@pytest.fixture(scope="module")
def prediction(tiny_llama: ModelSpec) -> Prediction:
    assert (tiny_llama.hidden_size, tiny_llama.intermediate_size, tiny_llama.vocab_size) == (
        H,
        FFN,
        V,
    )
    assert (tiny_llama.num_attention_heads, tiny_llama.num_key_value_heads) == (HEADS, KV_HEADS)
    assert (tiny_llama.head_dim, tiny_llama.num_decoder_layers) == (HEAD_DIM, LAYERS)
    assert not tiny_llama.tie_word_embeddings
    setup = TrainingSetup(
        method="full",
        precision="bf16",
        micro_batch_size=B,
        seq_len=S,
        attention="sdpa",
        optimizer="adamw",
        optimizer_impl="fused",
    )
    return predict(tiny_llama, setup)


def test_derived_constants() -> None:
    # The derivation in numbers, for whoever reads a failure.
    assert NUM_TENSORS == 21
    assert WEIGHT_BYTES == 1_264_128  # 631,424 parameters * 2 B, rounded per tensor
    assert ADAM_BYTES == 2_539_008
    assert ACTIVATION_BYTES == 1_590_784
    assert BUFFER_BYTES == 1_024
    assert LOGITS_BYTES == 1_573_888


def test_parameter_count(prediction: Prediction) -> None:
    assert prediction.state.num_params == sum(n * c for n, c in PARAMS) == 631_424
    assert prediction.state.num_trainable_params == 631_424


def test_steady_state_peak_is_the_loss_backward(prediction: Prediction) -> None:
    peak = prediction.trace.peak()
    expected = (
        WEIGHT_BYTES + BUFFER_BYTES + ADAM_BYTES + ACTIVATION_BYTES + LOGITS_BYTES + BATCH_BYTES
    )
    assert peak.peak_bytes == expected == 6_969_856
    assert (peak.phase, peak.step) == (Phase.BACKWARD, 1)  # step 1: Adam states exist


def test_breakdown_at_the_peak(prediction: Prediction) -> None:
    breakdown = prediction.trace.peak().breakdown_bytes
    assert breakdown == {
        Category.FROZEN_WEIGHTS: BUFFER_BYTES,
        Category.QUANT_STATE: 0,
        Category.TRAINABLE_WEIGHTS: WEIGHT_BYTES,
        Category.MASTER_WEIGHTS: 0,  # no DeepSpeed: torch AdamW steps the bf16 weights
        Category.GRADIENTS: 0,  # set to None by zero_grad; the first .grad comes after this
        Category.OPTIMIZER_STATE: ADAM_BYTES,
        Category.ACTIVATIONS: ACTIVATION_BYTES,
        Category.LOGITS: LOGITS_BYTES,
        Category.TEMPORARIES: BATCH_BYTES,
    }


def test_first_step_has_the_same_loss_peak_without_optimizer_state(
    prediction: Prediction,
) -> None:
    peaks = prediction.trace.phase_peaks()
    assert peaks[(0, Phase.LOAD)] == WEIGHT_BYTES + BUFFER_BYTES
    assert (
        peaks[(0, Phase.BACKWARD)]
        == WEIGHT_BYTES + BUFFER_BYTES + ACTIVATION_BYTES + LOGITS_BYTES + BATCH_BYTES
    )
    # Adam creates its states lazily in the first step() and keeps them.
    # weights + buffers + every .grad + the Adam state just created
    assert peaks[(0, Phase.OPTIMIZER)] == WEIGHT_BYTES + BUFFER_BYTES + WEIGHT_BYTES + ADAM_BYTES


def test_after_the_step_only_weights_and_optimizer_state_remain(prediction: Prediction) -> None:
    final = {c: v for c, v in prediction.trace.final_bytes().items() if v}
    assert final == {
        Category.FROZEN_WEIGHTS: BUFFER_BYTES,
        Category.TRAINABLE_WEIGHTS: WEIGHT_BYTES,
        Category.OPTIMIZER_STATE: ADAM_BYTES,
    }


@pytest.mark.torch
def test_a_real_cpu_step_agrees(tiny_llama: ModelSpec) -> None:
    """The same step on real CPU tensors, every storage tracked (memplan.torchsim).

    It peaks at the same moment and agrees per category within two 512-byte blocks (small
    tensors, masks, the analytical model might file under another category).
    """
    pytest.importorskip("torch")
    from memplan.torchsim import trace_step

    setup = TrainingSetup(
        method="full",
        precision="bf16",
        micro_batch_size=B,
        seq_len=S,
        attention="sdpa",
        optimizer="adamw",
        optimizer_impl="fused",
        device="cpu",
    )
    measured = trace_step(tiny_llama, setup, mode="cpu").trace.peak()
    analytic = predict(tiny_llama, setup).trace.peak()
    cpu_activations = ACTIVATION_BYTES - LAYERS * FLASH_RNG_BYTES
    assert (
        analytic.peak_bytes
        == WEIGHT_BYTES + BUFFER_BYTES + ADAM_BYTES + cpu_activations + LOGITS_BYTES + BATCH_BYTES
    )
    assert (measured.phase, measured.step) == (analytic.phase, analytic.step)
    assert measured.peak_bytes == pytest.approx(analytic.peak_bytes, rel=5e-4)
    for category, measured_bytes in measured.breakdown_bytes.items():
        assert abs(measured_bytes - analytic.breakdown_bytes[category]) <= 2 * 512, category

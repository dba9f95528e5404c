"""One rank of FSDP2 traced on torch's fake process group against the per-rank plan.

Each rank of a ``fully_shard`` run holds the same padded shapes, so rank 0's trace stands for
every rank. The analytical per-rank prediction (``fsdp_version=2``, FULL_SHARD) must agree
within 2% in total and per category (a category passes at the peak or at its high-water
mark, as in the oracle), for full fine-tuning and LoRA, at 2, 4 and 8 ranks, on two families
with untied embeddings and two whose LM head is the token embedding (accelerate puts it in the
final norm's unit).
"""

from __future__ import annotations

from functools import cache

import pytest

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.torchsim.step import trace_step
from memplan.trace import ALLOCATED_CATEGORIES, Category, Peak

TOLERANCE = 0.02


def _layout(ranks: int, stage: int = 3) -> ParallelSetup:
    return ParallelSetup(num_gpus=ranks, sharding="fsdp", zero_stage=stage, fsdp_version=2)


def _setup(method: str, grad_ckpt: bool = False) -> TrainingSetup:
    return TrainingSetup(
        method=method,
        precision="bf16-amp",
        micro_batch_size=2,
        seq_len=64,
        device="cpu",
        grad_ckpt=grad_ckpt,
    )


@cache
def _peaks(
    model: str, method: str, ranks: int, stage: int = 3, grad_ckpt: bool = False
) -> tuple[tuple[Peak, dict[Category, int]], tuple[Peak, dict[Category, int]]]:
    spec, setup = load_model(model), _setup(method, grad_ckpt)
    parallel = _layout(ranks, stage)
    traced = trace_step(spec, setup, parallel=parallel).trace
    analytical = predict(spec, setup, parallel).trace
    return (
        (traced.peak(), traced.category_peaks()),
        (analytical.peak(), analytical.category_peaks()),
    )


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
def test_fsdp2_rank_traced_equals_analytical(model: str, method: str, ranks: int) -> None:
    _assert_agree(*_peaks(model, method, ranks))


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_fsdp2_shard_grad_op_traced_equals_analytical(model: str, method: str, ranks: int) -> None:
    """SHARD_GRAD_OP (reshard_after_forward=False): sharded when idle, each unit gathered from
    its forward to its backward."""
    _assert_agree(*_peaks(model, method, ranks, 2))


@pytest.mark.parametrize("stage", [3, 2])
@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_fsdp2_checkpointed_traced_equals_analytical(
    model: str, method: str, ranks: int, stage: int
) -> None:
    """Activation checkpointing: the backward's peak, where each layer is gathered again for
    its recomputation and its unsharded gradients wait for its post-backward."""
    _assert_agree(*_peaks(model, method, ranks, stage, grad_ckpt=True))


def _assert_agree(
    traced_peaks: tuple[Peak, dict[Category, int]],
    analytical_peaks: tuple[Peak, dict[Category, int]],
) -> None:
    (traced, traced_most), (analytical, analytical_most) = traced_peaks, analytical_peaks
    assert analytical.peak_bytes == pytest.approx(traced.peak_bytes, rel=TOLERANCE), (
        f"predicted {analytical.peak_bytes:,} B in {analytical.phase.value}, traced "
        f"{traced.peak_bytes:,} B in {traced.phase.value}"
    )
    allowed = TOLERANCE * traced.peak_bytes
    for category in ALLOCATED_CATEGORIES:
        at_peak = abs(analytical.breakdown_bytes[category] - traced.breakdown_bytes[category])
        most = abs(analytical_most.get(category, 0) - traced_most.get(category, 0))
        assert at_peak <= allowed or most <= allowed, (
            f"{category.value}: predicted {analytical.breakdown_bytes[category]:,} B at the "
            f"peak and at most {analytical_most.get(category, 0):,} B; traced "
            f"{traced.breakdown_bytes[category]:,} B and {traced_most.get(category, 0):,} B"
        )


def test_rank_holds_its_shard_of_the_weights() -> None:
    """Weights per rank: every parameter split on dim 0 across the ranks (tiny-llama's dims
    divide by 8), fp32 under bf16 AMP: 631,424 parameters x 4 bytes / 8."""
    (traced, _), _ = _peaks("tiny-llama", "full", 8)
    weights = traced.breakdown_bytes[Category.TRAINABLE_WEIGHTS]
    assert 631_424 * 4 // 8 <= weights < 631_424 * 4 // 8 + 512 * 21  # 512-byte blocks


def test_process_group_is_released() -> None:
    """A traced rank leaves no process group behind (a second trace can start)."""
    import torch.distributed as dist

    _peaks("tiny-llama", "lora", 2)
    assert not dist.is_initialized()


def test_shard_grad_op_rank_holds_a_shard_and_gathers_every_layer() -> None:
    """FSDP2 SHARD_GRAD_OP keeps the same fp32 shards between steps as FULL_SHARD and, at the
    loss, every layer's and the embedding's 16-bit unsharded parameters on top: tiny-llama's
    2 layers of 184,832 parameters and its 1,024 x 128 embedding, 2 bytes each."""
    (sgo, _), _ = _peaks("tiny-llama", "full", 8, 2)
    (full_shard, _), _ = _peaks("tiny-llama", "full", 8)
    weights, temporaries = Category.TRAINABLE_WEIGHTS, Category.TEMPORARIES
    assert sgo.breakdown_bytes[weights] == full_shard.breakdown_bytes[weights]
    held = sgo.breakdown_bytes[temporaries] - full_shard.breakdown_bytes[temporaries]
    assert held == (2 * 184_832 + 1_024 * 128) * 2


def test_quantized_layers_are_refused_not_traced() -> None:
    """The tracer's 4-bit layers keep uint8 packed weights, not the bf16 quant_storage peft's
    FSDP-QLoRA shards: a sharded QLoRA trace is refused with the reason, and no process
    group is left behind."""
    import torch.distributed as dist

    from memplan.errors import MemplanError

    setup = TrainingSetup(method="qlora", micro_batch_size=2, seq_len=64, device="cpu")
    with pytest.raises(MemplanError, match="quant_storage"):
        trace_step(load_model("tiny-llama"), setup, parallel=_layout(2))
    assert not dist.is_initialized()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_7b_shape_at_8_ranks_traced_equals_analytical(method: str) -> None:
    """llama-2-7b's shapes on fake tensors, rank 0 of 8, every layer traced (no folding)."""
    spec = load_model("llama-2-7b")
    setup = TrainingSetup(
        method=method, precision="bf16-amp", micro_batch_size=1, seq_len=512, device="cpu"
    )
    result = trace_step(spec, setup, parallel=_layout(8))
    assert result.layers_traced == spec.num_layers
    traced, analytical = result.trace, predict(spec, setup, _layout(8)).trace
    _assert_agree(
        (traced.peak(), traced.category_peaks()), (analytical.peak(), analytical.category_peaks())
    )

"""Rules of thumb from fine-tuning lectures, checked against plan()."""

from __future__ import annotations

from memplan.hardware import list_profiles
from memplan.plan import plan, resolve_gpu
from memplan.specs import TrainingSetup
from memplan.units import GB, GiB, MiB


def test_65b_full_fine_tune_fits_on_no_single_gpu() -> None:
    largest = max(list_profiles(), key=lambda p: resolve_gpu(p.name).capacity_bytes)
    for setup in (
        TrainingSetup(method="full"),  # bf16 autocast over fp32 weights, AdamW: 16 bytes/param
        # Even the leanest full fine-tune: bf16 weights, 8-bit AdamW, checkpointing, batch 1.
        TrainingSetup(method="full", precision="bf16", optimizer="adamw-8bit", grad_ckpt=True),
    ):
        on_largest = plan("llama-65b", setup, gpu=largest.name)
        assert on_largest.fits is False
        # What must stay on the device exceeds every profile's capacity.
        required = on_largest.device_bytes - on_largest.paged_bytes
        assert all(required > resolve_gpu(p.name).capacity_bytes for p in list_profiles())


def test_65b_qlora_fits_on_a_48gb_card_at_batch_1_with_checkpointing() -> None:
    setup = TrainingSetup(method="qlora")  # the QLoRA paper's recipe (arXiv:2305.14314)
    assert setup.micro_batch_size == 1
    assert setup.grad_ckpt
    result = plan("llama-65b", setup, gpu="rtx-a6000")
    assert result.fits is True
    assert result.margin_bytes is not None
    assert result.margin_bytes >= 0  # fits without paging the optimizer state out
    assert 47 * GB < (result.gpu_capacity_bytes or 0) < 52 * GB  # a "48 GB" card


def test_7b_lora_fits_on_a_24gb_card() -> None:
    result = plan("llama-2-7b", TrainingSetup(method="lora"), gpu="rtx-4090")
    assert result.fits is True
    assert result.margin_bytes is not None
    assert result.margin_bytes > 0
    assert 24 * GiB - 16 * MiB < (result.gpu_capacity_bytes or 0) <= 24 * GiB

"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA on 4-bit frozen weights.

A named preset of :mod:`memplan.methods.lora`: the same adapters and step, with the recipe of
the paper's ``qlora.py`` as defaults (NF4 with double quantization, bf16 compute, paged AdamW,
r=64 alpha=16 on every linear layer, dropout 0.05, gradient checkpointing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from memplan.methods.lora import LoRA

if TYPE_CHECKING:
    from memplan.specs.training import TrainingSetup


class QLoRA(LoRA):
    name = "qlora"
    summary = "LoRA on 4-bit (NF4) frozen weights: the QLoRA recipe as defaults"
    rank = 20
    defaults: ClassVar[dict[str, Any]] = {
        "precision": "bf16",
        "quant": "nf4",
        "double_quant": True,
        "optimizer": "paged-adamw",
        "grad_ckpt": True,
        "lora_r": 64,
        "lora_alpha": 16.0,
        "lora_dropout": 0.05,
        "lora_targets": ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down"),
    }

    def check_setup(self, setup: TrainingSetup) -> None:
        from memplan.dtypes import Quantization
        from memplan.specs.training import Precision

        if setup.quant not in (Quantization.NF4, Quantization.FP4):
            raise ValueError(f"method=qlora needs quant nf4 or fp4, got quant={setup.quant.value}")
        if setup.precision is Precision.FP32:
            raise ValueError(
                "method=qlora computes in 16-bit (bnb_4bit_compute_dtype): use precision bf16 "
                "or fp16, not fp32"
            )
        super().check_setup(setup)


METHOD = QLoRA()

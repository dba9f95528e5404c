"""torchtune's single-device recipes (recipes/lora_finetune_single_device.py and the
recipes/configs/llama3_1/8B_{lora,qlora}_single_device.yaml configs).

Pure bf16 (dtype: bf16, no autocast), adapters in bf16 too (the recipe checks
validate_expected_param_dtype), activation checkpointing on, AdamW(fused=True); QLoRA
quantizes the base linears with torchao's to_nf4 (blocks of 64, scales quantized in blocks of
256: the same bytes as bitsandbytes' NF4 with double quantization).
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.stacks.base import Default, Request, TrainingStack

_BF16 = Default("bf16", "torchtune configs dtype: bf16 (set_default_dtype, no autocast)")
_CKPT = Default(True, "torchtune 8B_lora/qlora_single_device.yaml enable_activation_checkpointing")
_FUSED = Default("fused", "torchtune configs optimizer torch.optim.AdamW fused=True")
_ADAMW = Default("adamw", "torchtune configs optimizer torch.optim.AdamW fused=True")
_BF16_ADAPTERS = Default("bf16", "torchtune recipe validate_expected_param_dtype(dtype=bf16)")
_DQ = Default(True, "torchtune modules/peft/lora.py to_nf4 (scaler_block_size=256)")
# recipes/configs/llama3_1/8B_lora_single_device.yaml and 8B_qlora_single_device.yaml:
# lora_rank 8, lora_alpha 16, no dropout; attention q, v, output (QLoRA: q, k, v, output) and
# the MLP (apply_lora_to_mlp: True), not the output projection.
_R8 = Default(8, "torchtune 8B_lora/qlora_single_device.yaml lora_rank: 8")
_ALPHA16 = Default(16.0, "torchtune 8B_lora/qlora_single_device.yaml lora_alpha: 16")
_NO_DROPOUT = Default(0.0, "torchtune 8B_lora/qlora_single_device.yaml lora_dropout: 0.0")
_LORA_TARGETS = Default(
    ("q", "v", "o", "gate", "up", "down"),
    "torchtune 8B_lora_single_device.yaml q_proj, v_proj, output_proj + MLP",
)
_QLORA_TARGETS = Default(
    ("q", "k", "v", "o", "gate", "up", "down"),
    "torchtune 8B_qlora_single_device.yaml q_proj, k_proj, v_proj, output_proj + MLP",
)
_CHUNKED = Default("chunked", "torchtune configs loss: LinearCrossEntropyLoss (8 chunks)")
_PAGED8 = Default("paged-adamw-8bit", "torchtune 8B_full_single_device.yaml PagedAdamW8bit")
_IN_BWD = Default(True, "torchtune 8B_full_single_device.yaml optimizer_in_bwd: True")


class Torchtune(TrainingStack):
    name = "torchtune"
    summary = "torchtune single-device LoRA/QLoRA recipes (pure bf16, checkpointing on)"
    rank = 50
    not_modelled = (
        "torchtune's own model code (not the Hugging Face modeling file memplan follows)",
    )

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {"precision": _BF16, "grad_ckpt": _CKPT, "loss": _CHUNKED}
        if request.method.name == "full":
            # The full single-device recipe: paged 8-bit AdamW stepped inside backward (it
            # needs gradient_accumulation_steps 1; with accumulation the LoRA recipes' AdamW).
            if not request.accumulates:
                out |= {"optimizer": _PAGED8, "optimizer_in_backward": _IN_BWD}
            else:
                out |= {"optimizer": _ADAMW, "optimizer_impl": _FUSED}
        else:
            out |= {"optimizer": _ADAMW, "optimizer_impl": _FUSED}
        if request.adapters:
            out["adapter_dtype"] = _BF16_ADAPTERS
        if request.method.uses_lora:
            targets = _QLORA_TARGETS if request.quantized else _LORA_TARGETS
            out |= {
                "lora_r": _R8,
                "lora_alpha": _ALPHA16,
                "lora_dropout": _NO_DROPOUT,
                "lora_targets": targets,
            }
        if request.quantized:
            out["double_quant"] = _DQ
        return out


STACK = Torchtune()

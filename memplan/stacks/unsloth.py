"""Unsloth's FastLanguageModel with its SFT defaults (unsloth/models/llama.py, loader.py,
models/rl.py UnslothSFTConfig, unsloth_zoo training_utils.py).

bf16 weights under bf16 autocast (modelled as pure bf16); 4-bit loads are NF4 with double
quantization; unsloth's own k-bit preparation upcasts only the LoRA matrices to fp32 (norms,
embeddings and LM head stay bf16); LoRA r=16, alpha=16, no dropout, on every linear layer;
8-bit AdamW; "unsloth" gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.specs.training import ALL_LINEAR
from memplan.stacks.base import Default, Request, TrainingStack

_BF16 = Default("bf16", "unsloth FastLanguageModel.from_pretrained dtype=None: bf16")
_CKPT = Default(True, "unsloth get_peft_model use_gradient_checkpointing='unsloth'")
_ADAMW8 = Default("adamw-8bit", "unsloth models/rl.py UnslothSFTConfig optim='adamw_8bit'")
_FP32_ADAPTERS = Default("fp32", "unsloth_zoo prepare_model_for_training: LoRA A/B upcast")
_R16 = Default(16, "unsloth FastLanguageModel.get_peft_model r=16")
_ALPHA16 = Default(16.0, "unsloth FastLanguageModel.get_peft_model lora_alpha=16")
_NO_DROPOUT = Default(0.0, "unsloth FastLanguageModel.get_peft_model lora_dropout=0")
_ALL = Default(ALL_LINEAR, "unsloth get_peft_model target_modules q,k,v,o,gate,up,down")
_DQ = Default(True, "unsloth models/llama.py bnb_4bit_use_double_quant=True")
# unsloth_zoo fused_losses/cross_entropy_loss.py: the LM head and an fp32 cross-entropy per
# chunk, the input's gradient computed in forward and kept for backward: Liger's mechanism.
_FUSED_CE = Default("fused-linear", "unsloth_zoo unsloth_fused_ce_loss (gradient in forward)")


class Unsloth(TrainingStack):
    name = "unsloth"
    summary = "Unsloth FastLanguageModel + SFT defaults (bf16, 8-bit AdamW, r=16 on every linear)"
    rank = 70
    not_modelled = (
        "Unsloth's 'unsloth' checkpointing keeps each layer's input in host memory: modelled "
        "on the device (an over-estimate of device memory)",
        "Unsloth's fused cross-entropy sizes its chunks by free memory (up to 4 GiB of fp32 "
        "logits); modelled with Liger's chunk size",
        "Unsloth's Triton kernels (RoPE, RMS norm, SwiGLU, LoRA MLP) save other tensors than "
        "the Hugging Face modules memplan follows",
    )

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {"precision": _BF16, "grad_ckpt": _CKPT, "optimizer": _ADAMW8, "loss": _FUSED_CE}
        if request.adapters:
            out["adapter_dtype"] = _FP32_ADAPTERS
        if request.method.uses_lora:
            out |= {
                "lora_r": _R16,
                "lora_alpha": _ALPHA16,
                "lora_dropout": _NO_DROPOUT,
                "lora_targets": _ALL,
            }
        if request.quantized:
            out["double_quant"] = _DQ
        return out


STACK = Unsloth()

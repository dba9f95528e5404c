"""LLaMA-Factory (src/llamafactory/hparams/*.py, model/adapter.py, model/model_utils/*).

torch_dtype "auto" (bf16 for Llama checkpoints) under bf16 autocast (modelled as pure bf16);
gradient checkpointing on (disable_gradient_checkpointing=False, use_reentrant_gc=True);
trainable parameters cast to fp32 (cast_trainable_params_to_fp32); 4-bit models are not passed
through prepare_model_for_kbit_training; NF4 with double quantization; LoRA r=8 on every
linear layer (lora_target="all").
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.specs.training import ALL_LINEAR
from memplan.stacks.base import Default, Request, TrainingStack

_BF16 = Default("bf16", "llamafactory model/loader.py torch_dtype='auto'; examples bf16: true")
_CKPT = Default(True, "llamafactory hparams/model_args.py disable_gradient_checkpointing=False")
_FUSED = Default("fused", "TrainingArguments.optim = adamw_torch_fused (not overridden)")
_FP32_ADAPTERS = Default("fp32", "llamafactory model/adapter.py cast_trainable_params_to_fp32")
_R8 = Default(8, "llamafactory hparams/finetuning_args.py lora_rank=8")
_ALL = Default(ALL_LINEAR, "llamafactory hparams/finetuning_args.py lora_target='all'")
_DQ = Default(True, "llamafactory hparams/model_args.py double_quantization=True")


class LlamaFactory(TrainingStack):
    name = "llama-factory"
    summary = "LLaMA-Factory SFT (bf16 load under autocast, checkpointing on, fp32 adapters)"
    rank = 40
    not_modelled = (
        "LLaMA-Factory checkpoints with use_reentrant=True (modelled as non-reentrant)",
    )

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {"precision": _BF16, "grad_ckpt": _CKPT, "optimizer_impl": _FUSED}
        if request.adapters:
            out["adapter_dtype"] = _FP32_ADAPTERS
        if request.method.uses_lora:
            out |= {"lora_r": _R8, "lora_targets": _ALL}
        if request.quantized:
            out["double_quant"] = _DQ
        return out


STACK = LlamaFactory()

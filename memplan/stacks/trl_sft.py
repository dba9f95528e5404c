"""TRL's SFTTrainer (trl 1.9, trl/trainer/sft_trainer.py, sft_config.py, base_config.py).

A model given by name loads in fp32 (trainer/utils.py create_model_from_path: dtype "float32")
and trains under bf16 autocast (base_config.py: bf16=True unless fp16); gradient
checkpointing is on. A quantized model is not prepared with peft's
prepare_model_for_kbit_training: its trainable parameters are cast to bf16 after
get_peft_model, the other parameters keep the fp32 load, the 4-bit weights dequantize to the
fp32 they were quantized from.
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.stacks.base import Default, Request, TrainingStack

_AMP = Default(
    "bf16-amp", "trl create_model_from_path dtype='float32'; TrainingArguments bf16=True"
)
_CKPT = Default(True, "trl base_config.py gradient_checkpointing=True (use_reentrant=False)")
_FUSED = Default("fused", "TrainingArguments.optim = adamw_torch_fused (not overridden by TRL)")
_BF16_ADAPTERS = Default(
    "bf16", "trl sft_trainer.py: trainable params of a quantized model cast to bf16"
)
_NO_DQ = Default(False, "trl get_quantization_config: use_bnb_nested_quant=False")


class TRLSFT(TrainingStack):
    name = "trl-sft"
    summary = "TRL SFTTrainer (fp32 load under bf16 autocast, checkpointing on)"
    rank = 20
    not_modelled = (
        "TRL's default loss_type='chunked_nll' (256-token checkpointed chunks, masked tokens "
        "dropped before the LM head) is modelled as full fp32 logits (an over-estimate)",
    )

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {"precision": _AMP, "grad_ckpt": _CKPT, "optimizer_impl": _FUSED}
        if request.quantized:
            out |= {"adapter_dtype": _BF16_ADAPTERS, "double_quant": _NO_DQ}
        return out


STACK = TRLSFT()

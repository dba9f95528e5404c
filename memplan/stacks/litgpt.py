"""litgpt's finetune scripts (litgpt/finetune/lora.py, litgpt/utils.py, v0.5).

The command line's precision is bf16-mixed (get_default_supported_precision: fp32 parameters
under bf16 autocast); with quantize=bnb.nf4 mixed precision is refused and the run is
bf16-true. Parameters, adapters included, are created in the precision's dtype
(fabric.init_module). The LM head and cross-entropy run in 128-token chunks on bf16 logits
(no fp32 upcast). Quantized runs step bitsandbytes' PagedAdamW (32-bit); others
torch.optim.AdamW without fused= (the foreach loop on CUDA). No activation checkpointing on
one device. Several devices: FSDP2 fully_shard on the trainable linears and then the blocks, so
frozen weights get no gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.stacks.base import Default, Request, TrainingStack

_MIXED = Default("bf16-amp", "litgpt utils.get_default_supported_precision: bf16-mixed")
_TRUE = Default("bf16", "litgpt finetune/lora.py: quantize needs bf16-true")
_FOREACH = Default("foreach", "litgpt utils.instantiate_torch_optimizer: AdamW without fused=")
_ADAMW = Default("adamw", "litgpt finetune/lora.py optimizer='AdamW'")
_PAGED = Default("paged-adamw", "litgpt finetune/lora.py: bnb.optim.PagedAdamW when quantized")
_NO_CKPT = Default(False, "litgpt finetune/lora.py: no activation checkpointing on one device")
_NO_DQ = Default(False, "lightning_fabric BitsandbytesPrecision('nf4'): compress_statistics=False")
_FP32_ADAPTERS = Default("fp32", "litgpt fabric.init_module under bf16-mixed: fp32 parameters")
_BF16_ADAPTERS = Default("bf16", "litgpt fabric.init_module under bf16-true: bf16 parameters")


class LitGPT(TrainingStack):
    name = "litgpt"
    summary = "litgpt finetune (bf16-mixed, or bf16-true with 4-bit; chunked bf16 loss)"
    rank = 60
    not_modelled = (
        "litgpt's own model code (not the Hugging Face modeling file memplan follows)",
        "the LM head and cross-entropy run in 128-token chunks on bf16 logits that stay alive "
        "until backward (utils.chunked_cross_entropy): modelled as the Hugging Face loss over "
        "whole logits with their fp32 upcast",
    )

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {"grad_ckpt": _NO_CKPT}
        if request.quantized:
            out |= {"precision": _TRUE, "optimizer": _PAGED, "double_quant": _NO_DQ}
        else:
            out |= {"precision": _MIXED, "optimizer": _ADAMW, "optimizer_impl": _FOREACH}
        if request.adapters:
            out["adapter_dtype"] = _BF16_ADAPTERS if request.quantized else _FP32_ADAPTERS
        return out

    def parallel_defaults(self) -> Mapping[str, Default]:
        # finetune/lora.py parallelize_fn: fully_shard on the trainable linears first.
        return {
            "fsdp_mixed_units": Default(False, "litgpt parallelize_fn: LoRA linears sharded apart")
        }


STACK = LitGPT()

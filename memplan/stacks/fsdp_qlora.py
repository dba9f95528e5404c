"""Answer.AI's fsdp_qlora (train.py, June 2024).

precision="bf16": the model, its 4-bit weights' quant storage and compute in bf16, no FSDP
MixedPrecision and no autocast; bitsandbytes Linear4bit NF4 (compress_statistics left at its
default, True: double quantization); peft LoRA r=64, alpha=16, dropout 0.1 on every linear
layer; non-reentrant checkpointing of every decoder layer; torch AdamW(fused=False). Sharded:
FSDP1 FULL_SHARD with CPUOffload(offload_params=True) and a wrap policy that gives the LoRA
linears units of their own.
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.specs.training import ALL_LINEAR
from memplan.stacks.base import Default, Request, TrainingStack

_BF16 = Default("bf16", "fsdp_qlora train.py precision='bf16' (no MixedPrecision)")
_CKPT = Default(True, "fsdp_qlora train.py use_gradient_checkpointing=True")
_ADAMW = Default("adamw", "fsdp_qlora train.py optimizer='adamw'")
_FOREACH = Default("foreach", "fsdp_qlora train.py torch.optim.AdamW(fused=False)")
_R64 = Default(64, "fsdp_qlora train.py lora_rank=64")
_ALPHA16 = Default(16.0, "fsdp_qlora train.py lora_alpha=16")
_DROPOUT = Default(0.1, "fsdp_qlora train.py lora_dropout=0.1")
_ALL = Default(ALL_LINEAR, "fsdp_qlora train.py lora_target_modules='all'")
_DQ = Default(True, "bitsandbytes Linear4bit compress_statistics=True (not passed by train.py)")


class FSDPQLoRA(TrainingStack):
    name = "fsdp-qlora"
    summary = "Answer.AI fsdp_qlora train.py (pure bf16, LoRA r=64 on every linear, CPU offload)"
    rank = 90

    def defaults(self, request: Request) -> Mapping[str, Default]:
        out = {
            "precision": _BF16,
            "grad_ckpt": _CKPT,
            "optimizer": _ADAMW,
            "optimizer_impl": _FOREACH,
        }
        if request.method.uses_lora:
            out |= {
                "lora_r": _R64,
                "lora_alpha": _ALPHA16,
                "lora_dropout": _DROPOUT,
                "lora_targets": _ALL,
            }
        if request.quantized:
            out["double_quant"] = _DQ
        return out

    def parallel_defaults(self) -> Mapping[str, Default]:
        return {
            "fsdp_mixed_units": Default(False, "fsdp_qlora train.py: LoRA linears wrapped apart"),
            "offload": Default("optimizer+params", "fsdp_qlora train.py use_cpu_offload=True"),
        }


STACK = FSDPQLoRA()

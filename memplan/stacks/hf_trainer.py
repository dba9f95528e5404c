"""transformers' Trainer with peft: the loop most fine-tuning scripts and notebooks run.

Its defaults are the fields' own (memplan models this loop when no stack is named); the stack
names where each comes from.
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.stacks.base import Default, Request, TrainingStack

# transformers training_args.py, TrainingArguments.optim: "adamw_torch_fused" with torch >= 2.8.
_FUSED_ADAMW = Default("fused", "transformers TrainingArguments.optim = adamw_torch_fused")
# transformers loss/loss_utils.py ForCausalLMLoss: logits.float() before cross_entropy.
_FP32_LOGITS = Default(True, "transformers loss_utils.ForCausalLMLoss upcasts logits to fp32")


class HFTrainer(TrainingStack):
    name = "hf-trainer"
    summary = "transformers Trainer + peft (TrainingArguments defaults)"
    rank = 10

    def defaults(self, request: Request) -> Mapping[str, Default]:
        return {"optimizer_impl": _FUSED_ADAMW, "logits_fp32": _FP32_LOGITS}

    def parallel_defaults(self) -> Mapping[str, Default]:
        # transformers distributed/fsdp.py update_fsdp_plugin_peft: a peft model's FSDP wrap
        # policy is peft's fsdp_auto_wrap_policy (trainable modules are units of their own).
        return {"fsdp_mixed_units": Default(False, "transformers update_fsdp_plugin_peft")}


STACK = HFTrainer()

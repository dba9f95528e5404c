"""What the mixture-of-experts families share: transformers' fused 3-D experts (grouped_mm),
which bitsandbytes and peft leave alone because they are no nn.Linear modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


def grouped_experts_assumptions(
    family: str, experts_class: str, spec: ModelSpec, setup: TrainingSetup, *, note: str = ""
) -> list[str]:
    """The assumption lines of a family whose experts run transformers' grouped_mm."""
    from memplan.architecture import architecture
    from memplan.dtypes import Quantization

    lines = [
        f"{family}: experts run transformers' grouped_mm implementation "
        "(integrations/moe.py): top-k routed copies of each token sorted by expert, the "
        f"grouped matmuls in the weights' dtype (not autocast){note}"
    ]
    if setup.quant is not Quantization.NONE:
        arch = architecture(spec)
        experts = sum(b.repeat * t.numel for b, t in arch.tensors() if t.copies > 1)
        lines.append(
            f"{family}: {setup.quant.value} replaces nn.Linear modules only (transformers "
            "replace_with_bnb_linear): the experts' 3-D gate_up_proj/down_proj "
            f"({experts:,} of {arch.num_params:,} parameters) and the router stay "
            f"{setup.precision.weight_dtype.value}"
        )
    if setup.tuning.uses_lora:
        lines.append(
            f"{family}: peft target_modules (all-linear too) match nn.Linear modules: "
            f"gate_up_proj and down_proj are 3-D parameters of {experts_class} and get no "
            "adapter, nor does the router; LoRA sits on the attention projections"
        )
    return lines

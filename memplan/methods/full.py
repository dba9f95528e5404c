"""Full fine-tuning: every parameter of the model trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from memplan.methods.base import TuningMethod

if TYPE_CHECKING:
    from memplan.architecture import ParamKind
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class Full(TuningMethod):
    name = "full"
    summary = "every parameter trains"
    rank = 0
    allows_quantized_base = False
    # Hugging Face Trainer --bf16: fp32 weights under autocast, fused AdamW.
    defaults: ClassVar[dict[str, Any]] = {"precision": "bf16-amp", "optimizer": "adamw"}

    def trains(self, kind: ParamKind, *, bias: bool) -> bool:
        return True

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        built.model.requires_grad_(True)
        return built.model


METHOD = Full()

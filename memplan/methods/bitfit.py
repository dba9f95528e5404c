"""BitFit (Ben Zaken et al. 2021): only the bias terms train.

Every bias trains, LayerNorm biases included (the paper's 0.08% of BERT-large); weights,
embeddings and norm scales stay frozen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.methods.base import TuningMethod

if TYPE_CHECKING:
    from memplan.architecture import ParamKind
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class BitFit(TuningMethod):
    name = "bitfit"
    summary = "bias terms only (Ben Zaken et al. 2021)"
    rank = 50
    allows_quantized_base = False

    def trains(self, kind: ParamKind, *, bias: bool) -> bool:
        return bias

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        from memplan.architecture import architecture, is_bias

        biases = [t for _, t in architecture(spec).tensors() if is_bias(t)]
        if any(t.in_step for t in biases):
            return None
        if biases:  # nothing trained is used: the loss would not require grad
            return (
                f"method=bitfit trains biases, and {spec.name} has them only in modules a "
                "text-only step never runs (its vision tower)"
            )
        return f"method=bitfit trains biases, and {spec.name} has none"

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        # Every parameter named *.bias: linear and norm biases (and BERT's MLM output bias).
        for name, param in built.model.named_parameters():
            param.requires_grad_(name.endswith("bias"))
        return built.model

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return ["BitFit: only bias terms are trained (linear and norm biases)"]


METHOD = BitFit()

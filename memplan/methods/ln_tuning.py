"""LayerNorm tuning (Zhao et al. 2023, arXiv:2312.11420) as peft's ``LNTuningConfig`` runs it.

peft wraps each targeted norm in an ``LNTuningLayer`` holding a ``deepcopy`` of it
(``ln_tuning_layers``): the copy, in the norm's own dtype, is what trains and what the forward
runs; the original stays in the model, frozen. The targets are peft's defaults for the model
type (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING); a type without defaults is
refused as peft refuses it. Nothing else of the model trains.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Final

from memplan.methods.base import AddedParam, TuningMethod

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup

# peft utils/constants.py TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING (peft 0.21),
# for the model types memplan's families read.
PEFT_TARGETS: Final[dict[str, tuple[str, ...]]] = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    "mt5": ("layer_norm", "final_layer_norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gemma2": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ),
    "gemma3_text": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ),
    "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",),
}


def model_type(spec: ModelSpec) -> str:
    """The Hugging Face model_type peft looks the defaults up by (the family's first)."""
    from memplan.families import family

    return family(spec.family).model_types[0]


def matches(module: str, targets: tuple[str, ...]) -> bool:
    """peft's target_modules rule for a list: the whole name or a dotted suffix."""
    return any(module == t or module.endswith(f".{t}") for t in targets)


class LNTuning(TuningMethod):
    name = "ln-tuning"
    needs_transformers = True
    summary = "trainable copies of the norms (Zhao et al. 2023, peft LNTuningConfig)"
    rank = 48

    def norm_targets(self, spec: ModelSpec) -> tuple[str, ...]:
        return PEFT_TARGETS.get(model_type(spec), ())

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        if model_type(spec) not in PEFT_TARGETS:
            return (
                f"method={self.name}: peft has no default norms to tune for model type "
                f"{model_type(spec)} (LNTuningConfig: 'Please specify `target_modules`')"
            )
        return None

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """A copy of each targeted norm's weight (and bias), in the norm's dtype."""
        from memplan.architecture import ParamKind

        targets = self.norm_targets(arch.spec)
        out: list[AddedParam] = []
        for block, t in arch.tensors():
            module, _, part = t.name.rpartition(".")
            if t.kind is not ParamKind.NORM or not matches(module, targets):
                continue
            label = f"{block.name}.{module}.ln_tuning_layers.{part}"
            out.append(AddedParam(label, t.numel, block.repeat, t.numel, ctx.weight_dtype))
        return out

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        from peft import LNTuningConfig, get_peft_model

        from memplan.errors import MemplanError
        from memplan.torchsim.models import peft_task_type

        reason = self.unsupported(spec, setup)
        if reason or not built.is_hf:
            raise MemplanError(reason or f"method={self.name} needs a transformers model")
        built.model.requires_grad_(False)
        config = LNTuningConfig(task_type=peft_task_type(built))  # the type's default targets
        with warnings.catch_warnings():
            # BaseTuner warns about every norm class it does not know; LNTuningLayer copies any.
            warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
            return get_peft_model(built.model, config)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        targets = ", ".join(self.norm_targets(spec))
        return [
            f"LN tuning: a trainable copy of every {targets} (peft LNTuningLayer, in the "
            "norm's dtype) runs in place of the frozen original"
        ]


METHOD = LNTuning()

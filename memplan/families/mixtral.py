"""Mixtral (transformers ``modeling_mixtral``): Mistral's attention, a sparse MoE MLP.

MixtralSparseMoeBlock: a router (``mlp.gate``, MixtralTopKRouter) and the experts stored as two
3-D parameters (transformers >= 5 ``MixtralExperts``: gate_up_proj experts x 2*ffn x hidden,
down_proj experts x hidden x ffn), top-k experts per token, run by transformers' grouped_mm
experts implementation (:func:`memplan.analytic.layers.moe_mlp`).

Neither the router nor the experts is an ``nn.Linear``: bitsandbytes quantization
(``replace_with_bnb_linear`` swaps ``nn.Linear`` modules only) leaves them in 16-bit, and peft's
``target_modules`` (``all-linear`` too) put LoRA adapters on the attention projections only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.mistral import Mistral

if TYPE_CHECKING:
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class Mixtral(Mistral):
    name = "mixtral"
    model_types = ("mixtral",)
    tiny_model = "tiny-mixtral"
    hf_model_class = "MixtralForCausalLM"

    def extra_fields(self, config: Config) -> dict[str, Any]:
        return {
            **super().extra_fields(config),
            "num_experts": cfg.integer(config, "num_local_experts", 8),
            "num_experts_per_token": cfg.integer(config, "num_experts_per_tok", 2),
        }

    def mlp_params(self, spec: Any) -> list[Any]:
        from memplan.architecture import ParamKind, ParamTensor

        h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
        return [
            ParamTensor("mlp.gate.weight", (e, h), ParamKind.ROUTER, "router"),
            ParamTensor(
                "mlp.experts.gate_up_proj", (2 * i, h), ParamKind.LINEAR, "gate_up", copies=e
            ),
            ParamTensor("mlp.experts.down_proj", (h, i), ParamKind.LINEAR, "down", copies=e),
        ]

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        from memplan.families._moe import grouped_experts_assumptions

        return grouped_experts_assumptions("mixtral", "MixtralExperts", spec, setup)


FAMILY = Mixtral()

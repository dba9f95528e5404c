"""Mixtral (transformers ``modeling_mixtral``): Mistral's attention, a sparse MoE MLP.

MixtralSparseMoeBlock: a router (``mlp.gate``) and the experts stored as two 3-D parameters
(transformers >= 5 ``MixtralExperts``: gate_up_proj experts x 2*ffn x hidden, down_proj
experts x hidden x ffn), top-k experts per token.
"""

from __future__ import annotations

from typing import Any

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.mistral import Mistral


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


FAMILY = Mixtral()

"""Qwen3-MoE (transformers ``modeling_qwen3_moe``): Qwen3's attention, a sparse MoE MLP.

Qwen3MoeAttention is Qwen3's (per-head q/k RMSNorms before the rotary embedding).
Qwen3MoeSparseMoeBlock: a router (``mlp.gate``, Qwen3MoeTopKRouter) and the experts as two 3-D
parameters (``Qwen3MoeExperts``, as Mixtral's: gate_up_proj experts x 2*moe_ffn x hidden,
down_proj experts x hidden x moe_ffn), run by transformers' grouped_mm experts implementation
(:func:`memplan.analytic.layers.moe_mlp`); no shared expert. Unlike Mixtral's router it
renormalizes the top-k weights only with ``norm_topk_prob`` and casts them to the router
logits' dtype, so under 16-bit weights the routing product stays 16-bit.

A layer is MoE when it is not in ``mlp_only_layers`` and (index + 1) is a multiple of
``decoder_sparse_step``; the others run a dense Qwen3MoeMLP of ``intermediate_size``. memplan
models stacks of one kind: all MoE (every published Qwen3-MoE) or all dense.

Neither the router nor the experts is an ``nn.Linear``: bitsandbytes quantization leaves them
in 16-bit and peft's LoRA targets put adapters on the attention projections only (see
:mod:`memplan.families.mixtral`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.llama import Llama
from memplan.families.mistral import WindowLayout
from memplan.families.qwen3 import Qwen3

if TYPE_CHECKING:
    from memplan.analytic.layers import RopeStyle
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup

# Qwen3MoeConfig defaults.
_DEFAULT_WINDOW = 4096  # Qwen3MoeConfig.sliding_window (kept only with use_sliding_window)
_DEFAULT_EXPERTS = 128  # Qwen3MoeConfig.num_experts
_DEFAULT_TOP_K = 8  # Qwen3MoeConfig.num_experts_per_tok
_DEFAULT_MOE_FFN = 768  # Qwen3MoeConfig.moe_intermediate_size


class Qwen3MoeLayout(WindowLayout):
    norm_topk_prob: bool = Field(
        default=False,
        description="The router renormalizes its top-k weights to sum to one.",
    )


class Qwen3Moe(Qwen3):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    tiny_model = "tiny-qwen3_moe"
    hf_model_class = "Qwen3MoeForCausalLM"
    layout_type = Qwen3MoeLayout
    default_kv_heads = 4  # Qwen3MoeConfig.num_key_value_heads
    default_max_positions = 32768
    # peft's qwen2_moe conversion pattern maps down_proj to the experts' 3-D down_proj and
    # gate to the router's weight (gate_up_proj is no v4 name: it matches no module).
    lora_expert_roles = ("down", "router")

    def read_config(self, config: Config) -> dict[str, Any]:
        # Qwen3MoeAttention: getattr(config, "head_dim", hidden // heads) (no 128 default).
        fields = Llama.read_config(self, config)
        if fields["num_experts"]:
            # The experts' width replaces the dense MLP's (no layer runs the dense one).
            fields["intermediate_size"] = cfg.integer(
                config, "moe_intermediate_size", _DEFAULT_MOE_FFN
            )
        return fields

    def extra_fields(self, config: Config) -> dict[str, Any]:
        experts = cfg.integer(config, "num_experts", _DEFAULT_EXPERTS, minimum=0)
        layers = cfg.integer(config, "num_hidden_layers")
        step = cfg.integer(config, "decoder_sparse_step", 1)
        dense_only = config.get("mlp_only_layers") or []
        moe = [experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(layers)]
        if any(moe) and not all(moe):
            raise ValueError(
                "qwen3_moe: stacks mixing dense and MoE layers (mlp_only_layers, "
                "decoder_sparse_step > 1) are not modeled"
            )
        fields: dict[str, Any] = {
            "layout": {
                "sliding_window": _sliding_window(config),
                "norm_topk_prob": cfg.flag(config, "norm_topk_prob", False),
            }
        }
        if all(moe):
            fields["num_experts"] = experts
            fields["num_experts_per_token"] = cfg.integer(
                config, "num_experts_per_tok", _DEFAULT_TOP_K
            )
        else:
            fields["num_experts"] = 0
        return fields

    def mlp_params(self, spec: Any) -> list[Any]:
        if not spec.num_experts:
            return super().mlp_params(spec)
        from memplan.architecture import ParamKind, ParamTensor

        h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
        return [
            # Qwen3MoeTopKRouter.weight: a bare (experts, hidden) parameter read by F.linear.
            ParamTensor("mlp.gate.weight", (e, h), ParamKind.ROUTER, "router"),
            ParamTensor(
                "mlp.experts.gate_up_proj", (2 * i, h), ParamKind.LINEAR, "gate_up", copies=e
            ),
            ParamTensor("mlp.experts.down_proj", (h, i), ParamKind.LINEAR, "down", copies=e),
        ]

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        # create_sliding_window_causal_mask whenever config.sliding_window is set: every layer.
        return self.sliding_window(spec)

    def style(self, spec: ModelSpec) -> RopeStyle:
        from memplan.analytic.layers import RopeStyle

        return RopeStyle(
            head_qk_norm=True,
            topk_renormalize=self.layout(spec).norm_topk_prob,
            topk_weights_cast=True,  # router_top_value.to(router_logits.dtype)
        )

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        if not spec.num_experts:
            return []
        from memplan.families._moe import grouped_experts_assumptions

        note = "; no router aux loss (output_router_logits off)"
        return grouped_experts_assumptions("qwen3_moe", "Qwen3MoeExperts", spec, setup, note=note)


def _sliding_window(config: Config) -> int | None:
    """Qwen3MoeConfig keeps sliding_window only with use_sliding_window; every layer's attention
    then reads it (no layer_types)."""
    if not cfg.flag(config, "use_sliding_window", False):
        return None
    if "sliding_window" in config:
        return cfg.optional_integer(config, "sliding_window")
    return _DEFAULT_WINDOW


FAMILY = Qwen3Moe()

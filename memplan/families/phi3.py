"""Phi-3 (transformers ``modeling_phi3``): a Llama-style decoder with fused projections.

``qkv_proj`` computes queries, keys and values in one matmul and ``gate_up_proj`` both MLP
halves; their outputs are split into views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.llama import Llama
from memplan.families.mistral import WindowLayout

if TYPE_CHECKING:
    from memplan.analytic.layers import RopeStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec


class Phi3(Llama):
    name = "phi3"
    model_types = ("phi3",)
    tiny_model = "tiny-phi3"
    hf_model_class = "Phi3ForCausalLM"
    layout_type = WindowLayout
    # peft has no default target for phi3 (it asks for target_modules); memplan takes the fused
    # qkv_proj, the counterpart of q_proj + v_proj, as for the other fused-attention families.
    lora_roles = ("qkv",)
    default_max_positions = 4096

    def read_config(self, config: Config) -> dict[str, Any]:
        fields = super().read_config(config)
        fields["hidden_dropout"] = cfg.fraction(config, "resid_pdrop")
        return fields

    def biases(self, config: Config) -> tuple[bool, bool, bool]:
        return False, False, False  # Phi3Attention / Phi3MLP: bias=False

    def extra_fields(self, config: Config) -> dict[str, Any]:
        return {"layout": {"sliding_window": cfg.sliding_window(config)}}

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        # create_sliding_window_causal_mask in every layer when config.sliding_window is set.
        return self.sliding_window(spec)

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            decoder_only_blocks,
            fused_attention_params,
            linear_params,
            norm_params,
            token_embedding_param,
        )

        h, i = spec.hidden_size, spec.intermediate_size
        layer = [
            *fused_attention_params(spec, "self_attn.qkv_proj", "self_attn.o_proj"),
            *linear_params("mlp.gate_up_proj", 2 * i, h, "gate_up", bias=False),
            *linear_params("mlp.down_proj", h, i, "down", bias=False),
            *norm_params("input_layernorm", h, with_bias=False),
            *norm_params("post_attention_layernorm", h, with_bias=False),
        ]
        embeddings = [token_embedding_param("embed_tokens", spec)]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("norm", h, with_bias=False))

    def style(self, spec: ModelSpec) -> RopeStyle:
        from memplan.analytic.layers import RopeStyle

        return RopeStyle(qkv=("self_attn.qkv_proj",), fused_mlp=True, rotary_cat=True)


FAMILY = Phi3()

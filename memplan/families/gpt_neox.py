"""GPT-NeoX / Pythia (transformers ``modeling_gpt_neox``): fused query_key_value, parallel
residual, partial rotary embeddings, untied head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families._gpt import PreLnFamily
from memplan.families.base import Config, Layout

if TYPE_CHECKING:
    from memplan.analytic.layers import PreLnStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec


class NeoxLayout(Layout):
    rotary_dim: PositiveInt | None = Field(
        default=None, description="Dimensions per head with rotary embedding (rotary_pct)."
    )


def _rotary_fraction(config: Config) -> float:
    """GPT-NeoX rotary_pct (transformers >= 5: rope_parameters.partial_rotary_factor)."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("partial_rotary_factor") is not None:
        key, value = "partial_rotary_factor", rope["partial_rotary_factor"]
    else:
        key, value = cfg.get(config, "rotary_pct", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    return float(value)


class GptNeox(PreLnFamily):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    tiny_model = "tiny-gpt-neox"
    hf_model_class = "GPTNeoXForCausalLM"
    layout_type = NeoxLayout
    lora_roles = ("qkv",)  # query_key_value

    def read_config(self, config: Config) -> dict[str, Any]:
        hidden = cfg.integer(config, "hidden_size")
        heads = cfg.integer(config, "num_attention_heads")
        head_dim = cfg.head_width(hidden, heads)
        bias = cfg.flag(config, "attention_bias", True)
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": hidden,
            "num_decoder_layers": cfg.integer(config, "num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": head_dim,
            "intermediate_size": cfg.integer(config, "intermediate_size"),
            "gated_mlp": False,
            "hidden_act": cfg.text(config, "hidden_act", "gelu"),
            "norm_type": "layernorm",
            "attention_bias": bias,
            "attention_out_bias": bias,
            "mlp_bias": True,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", False),
            "position_embedding": "rope",
            "max_position_embeddings": cfg.integer(config, "max_position_embeddings", 2048),
            "parallel_attention": cfg.flag(config, "use_parallel_residual", True),
            "hidden_dropout": cfg.fraction(config, "hidden_dropout"),
            "attention_dropout": cfg.fraction(config, "attention_dropout"),
            "layout": {"rotary_dim": int(head_dim * _rotary_fraction(config))},
        }

    def rotary_dim(self, spec: ModelSpec) -> int:
        assert isinstance(spec.layout, NeoxLayout)
        return spec.layout.rotary_dim or spec.head_dim

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            decoder_only_blocks,
            fused_attention_params,
            mlp_params,
            norm_params,
            token_embedding_param,
        )

        h = spec.hidden_size
        layer = [
            *norm_params("input_layernorm", h, with_bias=True),
            *norm_params("post_attention_layernorm", h, with_bias=True),
            *fused_attention_params(spec, "attention.query_key_value", "attention.dense"),
            *mlp_params(spec, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        ]
        embeddings = [token_embedding_param("embed_in", spec)]
        final = norm_params("final_layer_norm", h, with_bias=True)
        return decoder_only_blocks(spec, embeddings, layer, final)

    def style(self, spec: ModelSpec) -> PreLnStyle:
        from memplan.analytic.layers import PreLnStyle

        return PreLnStyle(
            norms=("input_layernorm", "post_attention_layernorm"),
            qkv=("attention.query_key_value",),
            out="attention.dense",
            mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            rotary_dim=self.rotary_dim(spec),
        )


FAMILY = GptNeox()

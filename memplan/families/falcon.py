"""Falcon (transformers ``modeling_falcon``): fused query_key_value with multi-query or grouped
KV heads, parallel attention and MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field

from memplan.families import _config as cfg
from memplan.families._gpt import PreLnFamily
from memplan.families.base import Config, Layout

if TYPE_CHECKING:
    from memplan.analytic.layers import PreLnStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec

FalconNorms = Literal["input", "ln_attn+ln_mlp", "input+post_attention"]

# FalconDecoderLayer norm names per layout.layer_norms.
_NORMS: Final[dict[str, tuple[str, ...]]] = {
    "input": ("input_layernorm",),
    "ln_attn+ln_mlp": ("ln_attn", "ln_mlp"),
    "input+post_attention": ("input_layernorm", "post_attention_layernorm"),
}


class FalconLayout(Layout):
    layer_norms: FalconNorms = Field(
        default="input",
        description="LayerNorms per layer: 'input' (parallel attention, falcon-7b), "
        "'ln_attn+ln_mlp' (new_decoder_architecture) or 'input+post_attention' (sequential).",
    )


class Falcon(PreLnFamily):
    name = "falcon"
    model_types = ("falcon",)
    tiny_model = "tiny-falcon"
    hf_model_class = "FalconForCausalLM"
    layout_type = FalconLayout
    lora_roles = ("qkv",)  # query_key_value

    def layout(self, spec: ModelSpec) -> FalconLayout:
        assert isinstance(spec.layout, FalconLayout)
        return spec.layout

    def read_config(self, config: Config) -> dict[str, Any]:
        hidden = cfg.integer(config, ("hidden_size", "n_embed"))
        heads = cfg.integer(config, "num_attention_heads")
        new_arch = cfg.flag(config, "new_decoder_architecture", False)
        multi_query = cfg.flag(config, "multi_query", True)
        parallel = cfg.flag(config, "parallel_attn", True)
        # FalconAttention: new architecture -> num_kv_heads (default: all heads); else
        # multi_query -> one shared KV head; else one KV head per query head.
        kv_heads = (
            cfg.integer(config, "num_kv_heads", heads) if new_arch else 1 if multi_query else heads
        )
        # FalconDecoderLayer: two norms unless parallel attention with num_ln_in_parallel_attn
        # == 1 (which new_decoder_architecture turns to 2 when unset).
        num_ln = cfg.integer(config, "num_ln_in_parallel_attn", 2 if new_arch else 1)
        norms = (
            "input+post_attention" if not parallel else "ln_attn+ln_mlp" if num_ln == 2 else "input"
        )
        bias = cfg.flag(config, "bias", False)
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": hidden,
            "num_decoder_layers": cfg.integer(config, "num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": cfg.head_width(hidden, heads),
            "intermediate_size": cfg.integer(config, "ffn_hidden_size", 4 * hidden),
            "gated_mlp": False,
            "hidden_act": cfg.text(config, "activation", "gelu"),
            "norm_type": "layernorm",
            "attention_bias": bias,
            "attention_out_bias": bias,
            "mlp_bias": bias,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "position_embedding": "alibi" if cfg.flag(config, "alibi", False) else "rope",
            "max_position_embeddings": cfg.integer(config, "max_position_embeddings", 2048),
            "parallel_attention": parallel or new_arch,
            "hidden_dropout": cfg.fraction(config, "hidden_dropout"),
            "attention_dropout": cfg.fraction(config, "attention_dropout"),
            "layout": {"layer_norms": norms},
        }

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
            *fused_attention_params(spec, "self_attention.query_key_value", "self_attention.dense"),
            *mlp_params(spec, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            *(
                t
                for n in _NORMS[self.layout(spec).layer_norms]
                for t in norm_params(n, h, with_bias=True)
            ),
        ]
        embeddings = [token_embedding_param("word_embeddings", spec)]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("ln_f", h, with_bias=True))

    def style(self, spec: ModelSpec) -> PreLnStyle:
        from memplan.analytic.layers import PreLnStyle

        return PreLnStyle(
            qkv=("self_attention.query_key_value",),
            out="self_attention.dense",
            mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            mlp_reads_ln1=self.layout(spec).layer_norms == "input",
        )


FAMILY = Falcon()

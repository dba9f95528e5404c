"""Llama (transformers ``modeling_llama``): RMSNorm, rotary embeddings, GQA, SwiGLU MLP.

The base of the Llama-style families: Mistral, Mixtral and Qwen2 change defaults, biases and
the MLP; Gemma2 and Phi-3 change more (their own modules).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from memplan.families import _config as cfg
from memplan.families.base import Config, ModelFamily

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.layers import LayerGraph, RopeStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec


class Llama(ModelFamily):
    name = "llama"
    model_types = ("llama",)
    tiny_model = "tiny-llama"
    hf_model_class = "LlamaForCausalLM"
    # Optional-field defaults of the configuration class (configuration_<type>.py).
    default_kv_heads: ClassVar[int | None] = None  # None: one KV head per query head (MHA)
    default_max_positions: ClassVar[int] = 2048

    # -- config.json -------------------------------------------------------------------------
    def read_config(self, config: Config) -> dict[str, Any]:
        hidden = cfg.integer(config, "hidden_size")
        heads = cfg.integer(config, "num_attention_heads")
        kv_heads = cfg.integer(config, "num_key_value_heads", self.default_kv_heads or heads)
        head_dim = cfg.head_width(hidden, heads, cfg.optional_integer(config, "head_dim"))
        attention_bias, out_bias, mlp_bias = self.biases(config)
        return {
            **cfg.rope_decoder(config, hidden, heads, kv_heads, head_dim),
            "hidden_act": cfg.text(config, "hidden_act", "silu"),
            "attention_bias": attention_bias,
            "attention_out_bias": out_bias,
            "mlp_bias": mlp_bias,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", False),
            "max_position_embeddings": cfg.integer(
                config, "max_position_embeddings", self.default_max_positions
            ),
            **self.extra_fields(config),
        }

    def biases(self, config: Config) -> tuple[bool, bool, bool]:
        """(q/k/v, output projection, MLP) biases: Llama's attention_bias covers q, k, v and o."""
        attention = cfg.flag(config, "attention_bias", False)
        return attention, attention, cfg.flag(config, "mlp_bias", False)

    def extra_fields(self, config: Config) -> dict[str, Any]:
        """Fields a relative adds (sliding window, experts)."""
        return {}

    # -- parameters ---------------------------------------------------------------------------
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            attention_params,
            decoder_only_blocks,
            norm_params,
            token_embedding_param,
        )

        h = spec.hidden_size
        layer = [
            *attention_params(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            *norm_params("input_layernorm", h, with_bias=False),
            *norm_params("post_attention_layernorm", h, with_bias=False),
            *self.mlp_params(spec),
        ]
        embeddings = [token_embedding_param("embed_tokens", spec)]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("norm", h, with_bias=False))

    def mlp_params(self, spec: ModelSpec) -> list[Any]:
        from memplan.architecture import gated_mlp_params

        return gated_mlp_params(spec, "mlp.", ("gate_proj", "up_proj", "down_proj"))

    # -- the step ------------------------------------------------------------------------------
    def style(self, spec: ModelSpec) -> RopeStyle:
        from memplan.analytic.layers import RopeStyle

        return RopeStyle()

    def layer(self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
        from memplan.analytic.layers import rope_decoder_layer

        return rope_decoder_layer(
            spec, ctx, input_requires_grad=input_requires_grad, style=self.style(spec)
        )


FAMILY = Llama()

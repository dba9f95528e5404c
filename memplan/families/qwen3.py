"""Qwen3 (transformers ``modeling_qwen3``): Llama's layer with RMSNorms on queries and keys.

Qwen3Attention normalizes each head of the q and k projections (``q_norm``, ``k_norm``: RMSNorms
over head_dim, on the (batch, seq, heads, head_dim) views, before the transpose and the rotary
embedding). No q/k/v biases by default (``attention_bias`` covers q, k, v and o, as in Llama);
head_dim is explicit (128 by default, not hidden / heads); sliding-window attention applies to
the layers ``layer_types`` marks, and is off unless ``use_sliding_window``.
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

# Qwen3Config defaults.
_DEFAULT_HEAD_DIM = 128  # Qwen3Config.head_dim (Qwen3Attention reads it; not hidden / heads)
_DEFAULT_WINDOW = 4096  # Qwen3Config.sliding_window
_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen3Config.max_window_layers


class Qwen3(Llama):
    name = "qwen3"
    model_types = ("qwen3",)
    tiny_model = "tiny-qwen3"
    hf_model_class = "Qwen3ForCausalLM"
    layout_type = WindowLayout
    default_kv_heads = 32  # Qwen3Config.num_key_value_heads
    default_max_positions = 32768

    def read_config(self, config: Config) -> dict[str, Any]:
        head_dim = cfg.integer(config, "head_dim", _DEFAULT_HEAD_DIM)
        return super().read_config({**config, "head_dim": head_dim})

    def extra_fields(self, config: Config) -> dict[str, Any]:
        return {"layout": {"sliding_window": _sliding_window(config)}}

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        # create_sliding_window_causal_mask for the sliding layers; a stack mixing full and
        # sliding layers is taken as all sliding (each of its layers then builds a mask).
        return self.sliding_window(spec)

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            attention_params,
            decoder_only_blocks,
            norm_params,
            token_embedding_param,
        )

        h, d = spec.hidden_size, spec.head_dim
        layer = [
            *attention_params(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            # Qwen3RMSNorm(head_dim): one weight per head dimension, shared by all heads.
            *norm_params("self_attn.q_norm", d, with_bias=False),
            *norm_params("self_attn.k_norm", d, with_bias=False),
            *norm_params("input_layernorm", h, with_bias=False),
            *norm_params("post_attention_layernorm", h, with_bias=False),
            *self.mlp_params(spec),
        ]
        embeddings = [token_embedding_param("embed_tokens", spec)]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("norm", h, with_bias=False))

    def style(self, spec: ModelSpec) -> RopeStyle:
        from memplan.analytic.layers import RopeStyle

        return RopeStyle(head_qk_norm=True)


def _sliding_window(config: Config) -> int | None:
    """The window of the sliding layers (None: no layer slides).

    Qwen3Config keeps sliding_window only when use_sliding_window is set; layer_types defaults
    to sliding attention from layer max_window_layers on.
    """
    if not cfg.flag(config, "use_sliding_window", False):
        return None
    if "sliding_window" in config:  # null: Qwen3Attention gets sliding_window=None
        window = cfg.optional_integer(config, "sliding_window")
    else:
        window = _DEFAULT_WINDOW
    types = config.get("layer_types")
    if types is None:
        first = cfg.integer(config, "max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS, minimum=0)
        sliding = first < cfg.integer(config, "num_hidden_layers")
    else:
        sliding = "sliding_attention" in types
    return window if sliding else None


FAMILY = Qwen3()

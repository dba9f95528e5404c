"""BLOOM (transformers ``modeling_bloom``): ALiBi (no position table), a LayerNorm right after
the token embedding, fused query_key_value, eager attention only, its own GELU function."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.families import _config as cfg
from memplan.families._gpt import PreLnFamily
from memplan.families.base import Config

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import PreLnStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import Attention


class Bloom(PreLnFamily):
    name = "bloom"
    model_types = ("bloom",)
    tiny_model = "tiny-bloom"
    hf_model_class = "BloomForCausalLM"
    lora_roles = ("qkv",)  # query_key_value
    # BloomModel builds the eager causal mask (create_causal_mask) beside the ALiBi bias.

    def read_config(self, config: Config) -> dict[str, Any]:
        """BloomConfig: n_embed / n_layer / n_head aliases, ALiBi, MLP fixed at 4 * hidden."""
        hidden = cfg.integer(config, ("n_embed", "hidden_size"))
        heads = cfg.integer(config, ("num_attention_heads", "n_head"))
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": hidden,
            "num_decoder_layers": cfg.integer(config, ("n_layer", "num_hidden_layers")),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": cfg.head_width(hidden, heads),
            # BloomMLP: dense_h_to_4h = nn.Linear(hidden_size, 4 * hidden_size); n_inner unused.
            "intermediate_size": 4 * hidden,
            "gated_mlp": False,
            "hidden_act": "gelu_pytorch_tanh",  # BloomGelu: the tanh approximation
            "norm_type": "layernorm",
            "attention_bias": True,
            "attention_out_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "position_embedding": "alibi",
            "max_position_embeddings": cfg.integer(config, "seq_length", 2048),
            "hidden_dropout": cfg.fraction(config, "hidden_dropout"),
            "attention_dropout": cfg.fraction(config, "attention_dropout"),
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
            *norm_params("input_layernorm", h, with_bias=True),
            *fused_attention_params(spec, "self_attention.query_key_value", "self_attention.dense"),
            *norm_params("post_attention_layernorm", h, with_bias=True),
            *mlp_params(spec, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        ]
        embeddings = [
            token_embedding_param("word_embeddings", spec),
            *norm_params("word_embeddings_layernorm", h, with_bias=True),
        ]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("ln_f", h, with_bias=True))

    def attention(self, requested: Attention) -> Attention:
        """BloomPreTrainedModel declares no SDPA support: a run asking for SDPA trains with
        eager attention."""
        from memplan.specs.training import Attention

        return Attention.EAGER if requested is Attention.SDPA else requested

    def style(self, spec: ModelSpec) -> PreLnStyle:
        from memplan.analytic.layers import PreLnStyle

        return PreLnStyle(
            norms=("input_layernorm", "post_attention_layernorm"),
            qkv=("self_attention.query_key_value",),
            out="self_attention.dense",
            mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            eager_only=True,  # the ALiBi bias is added to explicit scores
            mlp_act=_bloom_gelu,
            branch_end="residual",  # BloomAttention and BloomMLP end with dropout_add
        )

    def embeddings(
        self, spec: ModelSpec, ctx: StepContext, seg: Segment, *, output_requires_grad: bool
    ) -> Tensor:
        from memplan.analytic.blocks import layer_norm

        x = super().embeddings(spec, ctx, seg, output_requires_grad=output_requires_grad)
        return layer_norm(seg, ctx, x, "word_embeddings_layernorm", spec.hidden_size)


def _bloom_gelu(seg: Segment, x: Tensor) -> Tensor:
    """BloomGelu's GeLUFunction: saves its input; bloom_gelu_forward runs its arithmetic outside
    autograd with four input-sized temporaries alive at once, bloom_gelu_back with five beside
    the incoming gradient."""
    return seg.op(
        "mlp.gelu_impl",
        [x],
        x.numel,
        x.dtype,
        saves=[x],
        fwd_workspace_bytes=3 * x.nbytes,
        bwd_workspace_bytes=4 * x.nbytes,
    )


FAMILY = Bloom()

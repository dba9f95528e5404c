"""OPT (transformers ``modeling_opt``): learned positions with an offset of 2, an optional
projection between the embedding width and the hidden size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, NonNegativeInt, PositiveInt

from memplan.families import _config as cfg
from memplan.families._gpt import PreLnFamily
from memplan.families.base import Config, Layout

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import PreLnStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec


class OptLayout(Layout):
    word_embed_proj_dim: PositiveInt | None = Field(
        default=None,
        description="Token-embedding width; project_in / project_out map it to hidden_size "
        "when they differ (opt-350m). None: hidden_size.",
    )
    position_offset: NonNegativeInt = Field(
        default=2, description="Extra rows of the position table (OPTLearnedPositionalEmbedding)."
    )
    do_layer_norm_before: bool = Field(
        default=True, description="Pre-LN (true) or post-LN (false, opt-350m) layers."
    )
    final_layer_norm: bool = Field(
        default=True,
        description="A final LayerNorm (do_layer_norm_before and not _remove_final_layer_norm).",
    )
    layer_norm_affine: bool = Field(
        default=True, description="LayerNorms have weight and bias (elementwise_affine)."
    )


class Opt(PreLnFamily):
    name = "opt"
    model_types = ("opt",)
    tiny_model = "tiny-opt"
    hf_model_class = "OPTForCausalLM"
    layout_type = OptLayout
    # transformers 5's OPTDecoder adds the positions to inputs_embeds without dropout.

    def layout(self, spec: ModelSpec) -> OptLayout:
        assert isinstance(spec.layout, OptLayout)
        return spec.layout

    def read_config(self, config: Config) -> dict[str, Any]:
        hidden = cfg.integer(config, "hidden_size")
        heads = cfg.integer(config, "num_attention_heads")
        bias = cfg.flag(config, "enable_bias", True)
        pre_ln = cfg.flag(config, "do_layer_norm_before", True)
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": hidden,
            "num_decoder_layers": cfg.integer(config, "num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": cfg.head_width(hidden, heads),
            "intermediate_size": cfg.integer(config, "ffn_dim"),
            "gated_mlp": False,
            "hidden_act": cfg.text(config, "activation_function", "relu"),
            "norm_type": "layernorm",
            "attention_bias": bias,
            "attention_out_bias": bias,
            "mlp_bias": bias,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "position_embedding": "learned",
            "max_position_embeddings": cfg.integer(config, "max_position_embeddings", 2048),
            "hidden_dropout": cfg.fraction(config, "dropout", 0.1),
            "attention_dropout": cfg.fraction(config, "attention_dropout"),
            "layout": {
                "word_embed_proj_dim": cfg.integer(config, "word_embed_proj_dim", hidden),
                "do_layer_norm_before": pre_ln,
                "final_layer_norm": pre_ln
                and not cfg.flag(config, "_remove_final_layer_norm", False),
                "layer_norm_affine": cfg.flag(config, "layer_norm_elementwise_affine", True),
            },
        }

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            Block,
            attention_params,
            linear_params,
            lm_head_blocks,
            mlp_params,
            norm_params,
            table_param,
            token_embedding_param,
        )

        h = spec.hidden_size
        layout = self.layout(spec)
        proj = layout.word_embed_proj_dim or h

        def norm(name: str) -> list[Any]:  # layer_norm_elementwise_affine=False: no parameters
            return norm_params(name, h, with_bias=True) if layout.layer_norm_affine else []

        layer = [
            *attention_params(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
            *norm("self_attn_layer_norm"),
            *mlp_params(spec, "fc1", "fc2"),
            *norm("final_layer_norm"),
        ]
        rows = spec.max_position_embeddings + layout.position_offset
        embeddings = [
            token_embedding_param("embed_tokens", spec, proj),
            table_param("embed_positions", rows, h),
        ]
        if proj != h:
            embeddings += [
                *linear_params("project_in", h, proj, None, bias=False),
                *linear_params("project_out", proj, h, None, bias=False),
            ]
        # OPTDecoder: a final LayerNorm only with do_layer_norm_before (not opt-350m).
        final = norm("final_layer_norm") if layout.final_layer_norm else []
        return (
            Block("embeddings", tuple(embeddings)),
            Block("decoder_layer", tuple(layer), repeat=spec.num_decoder_layers),
            *((Block("final_norm", tuple(final)),) if final else ()),
            *lm_head_blocks(spec, proj),
        )

    def style(self, spec: ModelSpec) -> PreLnStyle:
        from memplan.analytic.layers import PreLnStyle

        return PreLnStyle(
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            out="self_attn.out_proj",
            mlp=("fc1", "fc2"),
        )

    def embeddings(
        self, spec: ModelSpec, ctx: StepContext, seg: Segment, *, output_requires_grad: bool
    ) -> Tensor:
        from memplan.analytic.head import learned_positions

        x = super().embeddings(spec, ctx, seg, output_requires_grad=output_requires_grad)
        # OPT derives positions per sequence (batch, seq); its table has position_offset extra
        # rows.
        return learned_positions(
            ctx,
            seg,
            x,
            rows=ctx.num_tokens,
            table_rows=spec.max_position_embeddings + self.layout(spec).position_offset,
            hidden=spec.hidden_size,
        )

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        if not self.layout(spec).final_layer_norm:
            return x
        return super().final_norm(spec, ctx, x, seg, stack=stack)


FAMILY = Opt()

"""GPT-2 (transformers ``modeling_gpt2``): Conv1D projections, learned positions, tied head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from memplan.families import _config as cfg
from memplan.families._gpt import PreLnFamily
from memplan.families.base import Config, Layout

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import PreLnStyle
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec


class Gpt2Layout(Layout):
    cross_attention: bool = Field(
        default=False, description="Layers attend to an encoder too (add_cross_attention)."
    )


class Gpt2(PreLnFamily):
    name = "gpt2"
    model_types = ("gpt2",)
    tiny_model = "tiny-gpt2"
    hf_model_class = "GPT2LMHeadModel"
    layout_type = Gpt2Layout
    lora_roles = ("qkv",)  # c_attn
    embedding_dropout = True  # GPT2Model.drop

    def read_config(self, config: Config) -> dict[str, Any]:
        """GPT2Config: n_embd / n_layer / n_head (hidden_size etc. accepted as aliases)."""
        hidden = cfg.integer(config, ("n_embd", "hidden_size"))
        heads = cfg.integer(config, ("n_head", "num_attention_heads"))
        # GPT2Block: inner_dim = n_inner if not None else 4 * hidden_size.
        inner = cfg.integer(config, "n_inner", 4 * hidden)
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": hidden,
            "num_decoder_layers": cfg.integer(config, ("n_layer", "num_hidden_layers")),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": cfg.head_width(hidden, heads),
            "intermediate_size": inner,
            "gated_mlp": False,
            "hidden_act": cfg.text(config, "activation_function", "gelu_new"),
            "norm_type": "layernorm",
            "attention_bias": True,
            "attention_out_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "position_embedding": "learned",
            "max_position_embeddings": cfg.integer(
                config, ("n_positions", "max_position_embeddings"), 1024
            ),
            "hidden_dropout": cfg.fraction(config, "resid_pdrop", 0.1),
            "attention_dropout": cfg.fraction(config, "attn_pdrop", 0.1),
            "layout": {"cross_attention": cfg.flag(config, "add_cross_attention", False)},
        }

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        """Conv1D weights are stored (in, out); memplan lists them (out, in) like nn.Linear."""
        from memplan.architecture import (
            decoder_only_blocks,
            fused_attention_params,
            linear_params,
            mlp_params,
            norm_params,
            table_param,
            token_embedding_param,
        )

        h = spec.hidden_size
        layer = [
            *norm_params("ln_1", h, with_bias=True),
            *fused_attention_params(spec, "attn.c_attn", "attn.c_proj"),
            *norm_params("ln_2", h, with_bias=True),
            *mlp_params(spec, "mlp.c_fc", "mlp.c_proj"),
        ]
        assert isinstance(spec.layout, Gpt2Layout)
        if spec.layout.cross_attention:
            # GPT2Attention(is_cross_attention=True): q_attn for the queries, c_attn for k and v.
            layer += [
                *linear_params("crossattention.c_attn", 2 * h, h, "qkv", bias=True),
                *linear_params("crossattention.q_attn", h, h, "q", bias=True),
                *linear_params("crossattention.c_proj", h, h, "o", bias=True),
                *norm_params("ln_cross_attn", h, with_bias=True),
            ]
        embeddings = [
            token_embedding_param("wte", spec),
            table_param("wpe", spec.max_position_embeddings, h),
        ]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("ln_f", h, with_bias=True))

    def style(self, spec: ModelSpec) -> PreLnStyle:
        from memplan.analytic.layers import PreLnStyle

        # GPT-2's eager attention keeps the scores' dtype through softmax.
        return PreLnStyle(
            qkv=("attn.c_attn",),
            out="attn.c_proj",
            mlp=("mlp.c_fc", "mlp.c_proj"),
            softmax_fp32=False,
            branch_end="dropout",  # GPT2Attention's resid_dropout, GPT2MLP's dropout
        )

    def embeddings(
        self, spec: ModelSpec, ctx: StepContext, seg: Segment, *, output_requires_grad: bool
    ) -> Tensor:
        from memplan.analytic.head import learned_positions

        x = super().embeddings(spec, ctx, seg, output_requires_grad=output_requires_grad)
        # GPT-2 looks positions up for (1, seq).
        return learned_positions(
            ctx,
            seg,
            x,
            rows=ctx.seq_len,
            table_rows=spec.max_position_embeddings,
            hidden=spec.hidden_size,
        )


FAMILY = Gpt2()

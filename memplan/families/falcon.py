"""Falcon (transformers ``modeling_falcon``): fused query_key_value with multi-query or grouped
KV heads, parallel attention and MLP, its own attention code (``FalconAttention``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field

from memplan.families import _config as cfg
from memplan.families._gpt import PreLnFamily
from memplan.families.base import Config, Layout

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import LayerGraph
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
    new_decoder_architecture: bool = Field(
        default=False,
        description="query_key_value groups queries with their key/value head (falcon-40b); "
        "the split broadcasts keys and values to every query head.",
    )


class Falcon(PreLnFamily):
    name = "falcon"
    # FalconLinear.forward: ``input @ self.weight.T`` (modeling_falcon.py).
    cached_weight_casts = False
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
            "layout": {"layer_norms": norms, "new_decoder_architecture": new_arch},
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

    def unsupported(self, spec: ModelSpec, method: str) -> str | None:
        multi_query = spec.num_key_value_heads != spec.num_attention_heads
        if method == "prefix" and multi_query and not self.layout(spec).new_decoder_architecture:
            # peft sizes the prefix from num_key_value_heads, which FalconConfig lacks.
            return (
                "method=prefix cannot run on multi-query Falcon: peft builds the prefix with "
                "every attention head and Falcon's cache cannot concatenate it to its one KV head"
            )
        return None

    def layer(self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
        """FalconDecoderLayer: with parallel attention the MLP reads the attention's norm (or
        ln_mlp), its output adds the attention output in place and one dropout_add joins the
        residual; sequential layers dropout_add the attention output first."""
        from memplan.analytic.blocks import dropout, layer_norm, residual_add
        from memplan.analytic.graph import Segment
        from memplan.analytic.layers import LayerGraph, plain_mlp

        seg = Segment("layer")
        h, norms = spec.hidden_size, self.layout(spec).layer_norms
        x = seg.input(
            ctx.num_tokens * h,
            ctx.activation_dtype,
            "layer.input",
            requires_grad=input_requires_grad,
        )
        ln_attn = layer_norm(seg, ctx, x, _NORMS[norms][0], h)
        ln_mlp = layer_norm(seg, ctx, x, "ln_mlp", h) if norms == "ln_attn+ln_mlp" else ln_attn
        o, shared = self._attention(spec, ctx, seg, ln_attn)
        o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
        residual = x
        if norms == "input+post_attention":
            # dropout_add(attention_output, residual, config.attention_dropout)
            o = dropout(seg, ctx, o, spec.attention_dropout, "attn_dropout")
            residual = residual_add(seg, x, o, "residual_attn")
            ln_mlp = layer_norm(seg, ctx, residual, "post_attention_layernorm", h)
        m = plain_mlp(seg, ctx, spec, ln_mlp, ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
        m = ctx.method.branch_output(seg, ctx, m, "adapter_mlp")
        if norms != "input+post_attention":  # mlp_output += attention_output (in place)
            m = seg.op("mlp_add_attn", [m, o], m.numel, m.dtype, view_of=m, passthrough_grad=True)
        m = dropout(seg, ctx, m, spec.hidden_dropout, "mlp_dropout")
        out = residual_add(seg, residual, m, "residual_mlp")
        # The layer's locals (the norms' outputs, the caller's hidden_states) die when it returns.
        seg.hold(ln_attn, ln_mlp, x)
        return LayerGraph(seg, x, out, shared)

    def _attention(
        self, spec: ModelSpec, ctx: StepContext, seg: Segment, x: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """FalconAttention: fused projection, _split_heads, rotary, SDPA or eager, dense."""
        from memplan.analytic.blocks import LinearSpec, rotary
        from memplan.analytic.layers import qkv_projections, rope_tables, self_attention

        tp = ctx.tensor_parallel_degree
        heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
        q, k, v = qkv_projections(seg, ctx, spec, x, names=("self_attention.query_key_value",))
        if self.layout(spec).new_decoder_architecture:
            q, k, v = _grouped_split(seg, q, k, v)
            kv_heads = heads
        elif kv_heads != heads:  # fused_qkv[..., [-2], :]: indexing copies the shared k and v
            k, v = (_index_copy(seg, t, f"self_attention.{n}") for t, n in ((k, "k"), (v, "v")))
        shared: tuple[Tensor, ...] = ()
        rope = spec.position_embedding == "rope"
        if rope:
            cos, sin = rope_tables(spec, ctx, seg)
            shared = (cos, sin)
            q, k = rotary(seg, q, cos, sin, "q_rope"), rotary(seg, k, cos, sin, "k_rope")
        dense = LinearSpec(
            "self_attention.dense",
            heads * spec.head_dim,
            spec.hidden_size,
            "o",
            bias=spec.attention_out_bias,
        )
        o = self_attention(
            seg,
            ctx,
            spec,
            (q, k, v),
            dense,
            heads=heads,
            kv_heads=kv_heads,
            label="attn",
            # The rotary branch calls SDPA with dropout_p=0.0 and applies no dropout in eager.
            dropout_p=0.0 if rope else spec.attention_dropout,
            # softmax(scores + mask, dtype=hidden_states.dtype): the dtype of the residual stream.
            softmax_fp32=False,
            mask_dtype=ctx.activation_dtype,
            # The shared KV head reaches SDPA and matmul as it is (no enable_gqa, no repeat_kv).
            kv_broadcast=kv_heads != heads,
            # FalconModel materializes the causal mask for SDPA (allow_is_causal_skip=False).
            mask=True,
        )
        return o, shared


def _index_copy(seg: Segment, view: Tensor, label: str) -> Tensor:
    """``fused_qkv[..., [i], :]``: advanced indexing copies the slice; IndexBackward scatters
    its gradient into zeros shaped like the fused output (new_zeros + index_put)."""
    assert view.base is not None
    base = view.base
    return seg.op(label, [base], view.numel, view.dtype, bwd_workspace_bytes=base.nbytes)


def _grouped_split(seg: Segment, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """new_decoder_architecture's _split_heads: k and v indexed per group and broadcast to the
    group's query heads; flattening the heads copies each of q, k, v into full heads."""
    q = seg.op("self_attention.q_flat", [q], q.numel, q.dtype, passthrough_grad=True)
    k, v = (
        seg.op(
            f"self_attention.{n}_flat",
            [_index_copy(seg, t, f"self_attention.{n}")],
            q.numel,
            t.dtype,
        )
        for t, n in ((k, "k"), (v, "v"))
    )
    return q, k, v


FAMILY = Falcon()

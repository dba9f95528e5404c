"""OLMo2 (transformers ``modeling_olmo2``): a Llama-style decoder with norms after the branches.

Olmo2DecoderLayer has no input norm: attention and MLP read the residual stream directly, and
their outputs pass through ``post_attention_layernorm`` / ``post_feedforward_layernorm`` before
being added to it. Olmo2Attention normalizes the whole q and k projections (``q_norm``,
``k_norm``: RMSNorms of width heads * head_dim and kv_heads * head_dim) before the reshape into
heads and the rotary embedding. Olmo2RMSNorm multiplies by its weight in fp32 and casts the
product back: ``(weight * x).to(input_dtype)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.llama import Llama

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import LayerGraph
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec


class Olmo2(Llama):
    name = "olmo2"
    model_types = ("olmo2",)
    tiny_model = "tiny-olmo2"
    hf_model_class = "Olmo2ForCausalLM"
    # Olmo2Config: num_key_value_heads None -> num_attention_heads; max positions 2048.
    default_kv_heads = None
    default_max_positions = 2048
    # peft has no default target_modules for olmo2 (it asks for them); memplan takes Llama's.
    lora_roles = ("q", "v")

    def biases(self, config: Config) -> tuple[bool, bool, bool]:
        # attention_bias covers q, k, v and o; Olmo2MLP hard-codes bias=False.
        attention = cfg.flag(config, "attention_bias", False)
        return attention, attention, False

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            attention_params,
            decoder_only_blocks,
            norm_params,
            token_embedding_param,
        )

        h = spec.hidden_size
        q_width = spec.num_attention_heads * spec.head_dim
        kv_width = spec.num_key_value_heads * spec.head_dim
        layer = [
            *attention_params(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            # Olmo2RMSNorm over the whole q and k projections (not per head, unlike Qwen3).
            *norm_params("self_attn.q_norm", q_width, with_bias=False),
            *norm_params("self_attn.k_norm", kv_width, with_bias=False),
            *norm_params("post_attention_layernorm", h, with_bias=False),
            *norm_params("post_feedforward_layernorm", h, with_bias=False),
            *self.mlp_params(spec),
        ]
        embeddings = [token_embedding_param("embed_tokens", spec)]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("norm", h, with_bias=False))

    def layer(self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
        return olmo2_layer(spec, ctx, input_requires_grad=input_requires_grad)

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        from memplan.analytic.blocks import rms_norm

        return rms_norm(seg, ctx, x, "norm", spec.hidden_size, fp32_product=True)


def olmo2_layer(spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
    """Olmo2DecoderLayer: x + norm(attn(x)), then h + norm(mlp(h)).

    The attention's q and k are normalized over their whole width, then viewed as heads,
    transposed and rotated as in Llama.
    """
    from memplan.analytic.blocks import LinearSpec, cast, residual_add, rms_norm, rotary
    from memplan.analytic.graph import Segment
    from memplan.analytic.layers import (
        LayerGraph,
        gated_mlp,
        qk_norms,
        qkv_projections,
        rope_tables,
        self_attention,
    )
    from memplan.dtypes import DType

    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    # Olmo2RotaryEmbedding returns cos and sin in fp32 (no cast to the hidden states' dtype).
    cos, sin = rope_tables(spec, ctx, seg, dtype=DType.FP32)

    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    q, k, v = qkv_projections(seg, ctx, spec, x, names=names)
    q, k = qk_norms(seg, ctx, spec, q, k, per_head=False, fp32_product=True)
    # apply_rotary_pos_emb rotates in fp32 (16-bit q, k times the fp32 tables) and casts the
    # results back to q's and k's dtypes.
    q = cast(seg, rotary(seg, q, cos, sin, "q_rope"), q.dtype, "q_rope.downcast")
    k = cast(seg, rotary(seg, k, cos, sin, "k_rope"), k.dtype, "k_rope.downcast")
    o = self_attention(
        seg,
        ctx,
        spec,
        (q, k, v),
        LinearSpec("self_attn.o_proj", heads * spec.head_dim, h, "o", bias=spec.attention_out_bias),
        heads=heads,
        kv_heads=kv_heads,
        label="self_attn",
        dropout_p=spec.attention_dropout,
    )
    # Methods hook the self_attn and mlp modules' outputs, before the layer's post-norms.
    o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
    o = rms_norm(seg, ctx, o, "post_attention_layernorm", h, fp32_product=True)
    h1 = residual_add(seg, x, o, "residual_attn")
    m = gated_mlp(seg, ctx, spec, h1, intermediate=spec.intermediate_size // tp)
    m = ctx.method.branch_output(seg, ctx, m, "adapter_mlp")
    m = rms_norm(seg, ctx, m, "post_feedforward_layernorm", h, fp32_product=True)
    out = residual_add(seg, h1, m, "residual_mlp")
    seg.hold(x)  # the caller's `hidden_states` keeps the layer input until the layer returns
    return LayerGraph(seg, x, out, (cos, sin))


FAMILY = Olmo2()

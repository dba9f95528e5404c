"""Transformer layers as segments of ops: the shared builders the families configure.

A family module picks a layer builder (``rope_decoder_layer`` for Llama and its relatives,
``pre_ln_layer`` for GPT-style blocks) and passes its module names and variants as a style;
families with layers of their own (BERT, T5) build them from the pieces here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from memplan.analytic.blocks import (
    LinearSpec,
    activation,
    attention_core,
    cast,
    dropout,
    grouped_linear,
    layer_norm,
    linear,
    partial_rotary,
    promote,
    repeat_kv,
    residual_add,
    rms_norm,
    rotary,
)
from memplan.analytic.context import StepContext
from memplan.analytic.graph import Segment, Tensor
from memplan.dtypes import DType, dtype_bytes
from memplan.families import family
from memplan.specs.model import ModelSpec


def self_attention(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    qkv: tuple[Tensor, Tensor, Tensor],
    out: LinearSpec,
    *,
    heads: int,
    kv_heads: int,
    label: str,
    dropout_p: float,
    softmax_fp32: bool = True,
    eager_only: bool = False,
    softcap: bool = False,
    head_major_q: bool = False,
    mask_dtype: DType | None = None,
    kv_broadcast: bool = False,
    mask: bool = False,
) -> Tensor:
    """:func:`attention_context` and the output projection ``out``."""
    attn = attention_context(
        seg,
        ctx,
        spec,
        qkv,
        heads=heads,
        kv_heads=kv_heads,
        label=label,
        dropout_p=dropout_p,
        softmax_fp32=softmax_fp32,
        eager_only=eager_only,
        softcap=softcap,
        head_major_q=head_major_q,
        mask_dtype=mask_dtype,
        kv_broadcast=kv_broadcast,
        mask=mask,
    )
    return linear(seg, ctx, attn, out)


def attention_context(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    qkv: tuple[Tensor, Tensor, Tensor],
    *,
    heads: int,
    kv_heads: int,
    label: str,
    dropout_p: float,
    softmax_fp32: bool = True,
    eager_only: bool = False,
    softcap: bool = False,
    head_major_q: bool = False,
    mask_dtype: DType | None = None,
    kv_broadcast: bool = False,
    mask: bool = False,
    hold_qkv: bool = False,
    context_numel: int | None = None,
) -> Tensor:
    """Prefix keys/values, autocast's casts and attention over the sequence: the context the
    output projection reads. ``hold_qkv``: the caller's locals keep q and the keys and values
    (once a cache update replaced them) until the context is made.

    Under AMP scaled_dot_product_attention is on autocast's lower-precision list, so q, k and v
    (fp32 after a rotary product with fp32 tables) are cast to the compute dtype first.
    ``mask``: the model hands SDPA a materialized causal mask whatever the setup (Falcon); the
    other arguments are attention_core's.
    """
    q, k, v = qkv
    k, v = ctx.method.attention_kv(seg, ctx, k, v, kv_heads * spec.head_dim)
    masked = (mask or ctx.sdpa_mask) and not eager_only
    if ctx.sdpa_mask and not eager_only and 1 < kv_heads != heads and not kv_broadcast:
        # sdpa_attention_forward turns enable_gqa off when it passes a mask, so repeat_kv
        # copies the key/value heads (transformers integrations/sdpa_attention.py); one key/value
        # head (multi-query) expands into a view: the reshape merges a dimension of size one.
        k = repeat_kv(seg, k, heads // kv_heads, f"{label}.repeat_k")
        v = repeat_kv(seg, v, heads // kv_heads, f"{label}.repeat_v")
        kv_heads = heads
    locals_ = (q, k, v)
    if ctx.amp:
        q, k, v = (cast(seg, t, ctx.compute_dtype, f"{t.label}.autocast") for t in (q, k, v))
    context = attention_core(
        seg,
        ctx,
        q,
        k,
        v,
        num_heads=heads,
        num_kv_heads=kv_heads,
        label=label,
        dropout_p=dropout_p,
        softmax_fp32=softmax_fp32,
        eager_only=eager_only,
        softcap=softcap,
        mask_dtype=mask_dtype,
        kv_broadcast=kv_broadcast,
        kv_len=ctx.seq_len + ctx.prefix_len,
        mask=masked,
        head_major_q=head_major_q,
        context_numel=context_numel,
        causal=family(spec.family).causal,
    )
    if hold_qkv:
        seg.hold(*locals_, label=f"{label}.qkv_locals")
    return context


@dataclass
class LayerGraph:
    """A layer's ops, its input and output, and the shared tensors it reads."""

    segment: Segment
    input: Tensor
    output: Tensor
    shared: tuple[Tensor, ...] = ()  # rotary cos/sin: allocated once per forward


def rope_tables(
    spec: ModelSpec,
    ctx: StepContext,
    seg: Segment,
    rotary_dim: int = 0,
    *,
    dtype: DType | None = None,
    label: str = "rope",
) -> tuple[Tensor, Tensor]:
    """cos and sin of LlamaRotaryEmbedding: (1, seq, rotary_dim or head_dim) in the activation
    dtype (``dtype``: a rotary embedding that returns them in another, OLMo2's fp32)."""
    numel = ctx.seq_len * (rotary_dim or spec.head_dim)
    dtype = dtype or ctx.activation_dtype
    cos = seg.input(numel, dtype, f"{label}.cos", requires_grad=False, persistent=True)
    sin = seg.input(numel, dtype, f"{label}.sin", requires_grad=False, persistent=True)
    return cos, sin


@dataclass(frozen=True, slots=True)
class RopeStyle:
    """Module names and variants of a Llama-style decoder layer."""

    # q, k, v projections; one name: a fused projection whose output is split (Phi-3).
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    fused_mlp: bool = False  # one gate_up_proj whose output is split (Phi-3)
    # apply_rotary_pos_emb ends with torch.cat([rotated, pass-through]) (Phi-3): q and k are
    # new tensors laid out (batch, heads, seq, head_dim).
    rotary_cat: bool = False
    # Gemma2: norms in fp32 times (1 + weight), and norms after attention and after the MLP.
    gemma_norms: bool = False
    attn_softcap: bool = False  # Gemma2: attention scores soft-capped with tanh
    # Qwen3: RMSNorms on each head of the queries and keys (over head_dim) before the rotary
    # embedding.
    head_qk_norm: bool = False
    # MoE routers: the top-k weights renormalized to sum to one (Mixtral always; Qwen3-MoE's
    # norm_topk_prob), and cast to the router logits' dtype before the experts (Qwen3-MoE).
    topk_renormalize: bool = True
    topk_weights_cast: bool = False
    # Rotary tables the model's forward makes once for every layer (Gemma3: one per layer
    # type, of its own base), and the one this layer reads.
    rope_tables: tuple[str, ...] = ("rope",)
    rope_table: int = 0


def rope_decoder_layer(
    spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool, style: RopeStyle
) -> LayerGraph:
    """LlamaDecoderLayer and relatives: pre-RMSNorm attention with rotary embeddings + MLP.

    Mistral, Qwen2 and Mixtral share the layout; Phi-3 fuses qkv and gate/up projections;
    Gemma2 adds post-attention and pre/post-MLP norms and computes its norms in fp32.
    """
    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h = spec.hidden_size
    n = ctx.num_tokens
    heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    gemma = style.gemma_norms
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    tables = [rope_tables(spec, ctx, seg, label=label) for label in style.rope_tables]
    cos, sin = tables[style.rope_table]

    hn = rms_norm(seg, ctx, x, "input_layernorm", h, gemma=gemma)
    q, k, v = qkv_projections(seg, ctx, spec, hn, names=style.qkv)
    if style.head_qk_norm:
        q, k = qk_norms(seg, ctx, spec, q, k, per_head=True, gemma=gemma)
    q = rotary(seg, q, cos, sin, "q_rope", cat=style.rotary_cat)
    k = rotary(seg, k, cos, sin, "k_rope", cat=style.rotary_cat)
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
        softcap=style.attn_softcap,
        head_major_q=style.rotary_cat,
    )
    o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
    seg.hold(hn)  # `hidden_states` still names the norm output until self_attn returns
    if gemma:
        o = rms_norm(seg, ctx, o, "post_attention_layernorm", h, gemma=True)
    h1 = residual_add(seg, x, o, "residual_attn")
    norm2 = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    hn2 = rms_norm(seg, ctx, h1, norm2, h, gemma=gemma)
    if spec.is_moe:
        m = moe_mlp(
            seg,
            ctx,
            spec,
            hn2,
            renormalize=style.topk_renormalize,
            cast_weights=style.topk_weights_cast,
        )
    else:
        m = gated_mlp(
            seg, ctx, spec, hn2, intermediate=spec.intermediate_size // tp, fused=style.fused_mlp
        )
    m = ctx.method.branch_output(seg, ctx, m, "adapter_mlp")
    seg.hold(hn2)  # ... and the second norm's output until the MLP returns
    if gemma:  # after the MLP module (and the hooks on its output)
        m = rms_norm(seg, ctx, m, "post_feedforward_layernorm", h, gemma=True)
    out = residual_add(seg, h1, m, "residual_mlp")
    seg.hold(x)  # the caller's `hidden_states` keeps the layer input until the layer returns
    return LayerGraph(seg, x, out, tuple(t for table in tables for t in table))


def qk_norms(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    q: Tensor,
    k: Tensor,
    *,
    per_head: bool,
    fp32_product: bool = False,
    gemma: bool = False,
) -> tuple[Tensor, Tensor]:
    """self_attn.q_norm and k_norm: RMSNorms of the q and k projections' outputs.

    ``per_head``: over the head_dim of the (batch, seq, heads, head_dim) views (Qwen3),
    else over the whole projection width before the reshape (OLMo2). Each is rms_norm's op
    sequence (``fp32_product``: OLMo2's weight product in fp32; ``gemma``: Gemma3RMSNorm's
    (1 + weight) in fp32); its output replaces the projection's, which is freed unless saved.
    """
    tp = ctx.tensor_parallel_degree
    d = spec.head_dim
    q_size = d if per_head else spec.num_attention_heads // tp * d
    k_size = d if per_head else spec.num_key_value_heads // tp * d
    q = rms_norm(seg, ctx, q, "self_attn.q_norm", q_size, fp32_product=fp32_product, gemma=gemma)
    k = rms_norm(seg, ctx, k, "self_attn.k_norm", k_size, fp32_product=fp32_product, gemma=gemma)
    return q, k


def gated_mlp(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    x: Tensor,
    *,
    intermediate: int,
    fused: bool = False,
    prefix: str = "mlp.",
) -> Tensor:
    """LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)); the activation saves its input.

    Phi-3's gate_up_proj computes both halves in one matmul and splits the output (views of
    one storage).
    """
    h = spec.hidden_size
    bias = spec.mlp_bias
    if fused:
        gu = linear(
            seg, ctx, x, LinearSpec("mlp.gate_up_proj", h, 2 * intermediate, "gate_up", bias=bias)
        )
        g = seg.op("mlp.gate", [gu], gu.numel // 2, gu.dtype, view_of=gu, passthrough_grad=True)
        a = activation(seg, g, spec.hidden_act, "mlp.act_fn", fp32_pow=ctx.cuda_autocast)
        u = seg.op("mlp.up", [gu], gu.numel // 2, gu.dtype, view_of=gu, passthrough_grad=True)
    else:
        gate = LinearSpec(f"{prefix}gate_proj", h, intermediate, "gate", bias=bias)
        g = linear(seg, ctx, x, gate)
        a = activation(seg, g, spec.hidden_act, f"{prefix}act_fn", fp32_pow=ctx.cuda_autocast)
        u = linear(seg, ctx, x, LinearSpec(f"{prefix}up_proj", h, intermediate, "up", bias=bias))
    p = seg.op(f"{prefix}mul", [a, u], a.numel, a.dtype, saves=[a, u])
    down = LinearSpec(f"{prefix}down_proj", intermediate, h, "down", bias=bias)
    return linear(seg, ctx, p, down)


def moe_mlp(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    x: Tensor,
    *,
    renormalize: bool = True,
    cast_weights: bool = False,
    fp32_router: bool = False,
    scaled: bool = False,
) -> Tensor:
    """A sparse MoE block as transformers >= 5 runs it (MixtralSparseMoeBlock,
    Qwen3MoeSparseMoeBlock): the top-k router, then the experts' default implementation,
    ``grouped_mm_experts_forward`` (integrations/moe.py; ``get_correct_experts_implementation``
    picks "grouped_mm", on CUDA and on CPU alike).

    The tokens x top-k (token, expert) pairs are sorted by expert; the routed copies of the
    tokens run through the experts' two grouped matmuls, are scaled by their routing weight
    (fp32, or the logits' dtype with ``cast_weights``), put back in token order and summed over
    the top-k. ``renormalize``, ``cast_weights``: topk_router's.
    """
    n, h = ctx.num_tokens, spec.hidden_size
    pairs = n * spec.num_experts_per_token
    weights, index, router_locals = topk_router(
        seg,
        ctx,
        spec,
        x,
        renormalize=renormalize,
        cast_weights=cast_weights,
        fp32_router=fp32_router,
        scaled=scaled,
    )
    # torch.sort(expert_ids): the sorted ids (a local) and the permutation (kept by gathers).
    ids = seg.op("mlp.experts.sorted_ids", [index], pairs, DType.INT64, requires_grad=False)
    perm = seg.op("mlp.experts.perm", [index], pairs, DType.INT64, requires_grad=False)
    tokens = seg.op("mlp.experts.token_ids", [perm], pairs, DType.INT64, requires_grad=False)
    # hidden_states[perm // top_k]: index backward scatters into a zero-filled (tokens, h).
    routed = seg.op(
        "mlp.experts.gather",
        [x, tokens],
        pairs * h,
        x.dtype,
        saves=[tokens],
        bwd_workspace_bytes=x.nbytes,
    )
    pair_weights = seg.op(
        "mlp.experts.gather_weights",
        [weights, perm],
        pairs,
        weights.dtype,
        saves=[perm],
        bwd_workspace_bytes=weights.nbytes,
    )
    # histc over the sorted ids (as fp32 on CPU, int32 on CUDA: 4 bytes), cumsum to offsets.
    histc_in = seg.op("mlp.experts.histc_input", [ids], pairs, DType.FP32, requires_grad=False)
    counts = seg.op(
        "mlp.experts.histc", [histc_in], spec.num_experts, DType.FP32, requires_grad=False
    )
    offsets = seg.op(
        "mlp.experts.offsets", [counts], spec.num_experts, DType.INT32, requires_grad=False
    )
    y = _grouped_experts(seg, ctx, spec, routed, offsets)
    # proj_out * sample_weights: fp32 weights (or fp32 grouped-matmul outputs under AMP)
    # promote the product to fp32. Backward computes both gradients in the product's dtype;
    # the engine casts each to its input's dtype after the node released its saved tensors
    # (validate_outputs), and sums grad * proj_out over the hidden dimension for the weights'
    # gradient.
    dtype = promote(y.dtype, pair_weights.dtype)
    if y.dtype is not dtype:
        y = seg.op("mlp.experts.promote", [y], y.numel, dtype, view_of=y)
    if pair_weights.dtype is not dtype:
        pair_weights = seg.op(
            "mlp.experts.promote_weights",
            [pair_weights],
            pairs,
            dtype,
            view_of=pair_weights,
        )
    weighted = seg.op(
        "mlp.experts.route_weight",
        [y, pair_weights],
        pairs * h,
        dtype,
        saves=[
            y if pair_weights.requires_grad else None,
            pair_weights if y.requires_grad else None,
        ],
        bwd_workspace_bytes=pairs * h * dtype_bytes(dtype),
    )
    # inv_perm = empty_like(perm); inv_perm[perm] = arange(pairs): back to token order.
    inverse = seg.op(
        "mlp.experts.inverse_perm",
        [perm],
        pairs,
        DType.INT64,
        requires_grad=False,
        fwd_workspace_bytes=pairs * 8,
    )
    ordered = seg.op(
        "mlp.experts.unpermute",
        [weighted, inverse],
        pairs * h,
        dtype,
        saves=[inverse],
        bwd_workspace_bytes=weighted.nbytes,
    )
    # .view(tokens, top_k, h).sum(dim=1) (in the product's dtype), then
    # .to(hidden_states.dtype).
    summed = seg.op("mlp.experts.sum", [ordered], n * h, dtype)
    out = cast(seg, summed, x.dtype, "mlp.experts.output_cast")
    # Locals of the experts' forward and the block's (the router logits) until they return.
    seg.hold(ids, histc_in, counts, *router_locals, label="mlp.locals")
    return out


def topk_router(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    x: Tensor,
    *,
    renormalize: bool = True,
    cast_weights: bool = False,
    fp32_router: bool = False,
    scaled: bool = False,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """MixtralTopKRouter: F.linear to expert logits, fp32 softmax, top-k, the top-k weights
    renormalized in place. Returns the weights, the expert indices and the block's locals.

    Qwen3MoeTopKRouter: the renormalization only with ``norm_topk_prob`` (``renormalize``),
    then the weights cast to the logits' dtype (``cast_weights``); softmax(dtype=float) casts
    the logits to fp32 first, as ``.float()`` does (except CUDA fp16 logits, whose
    half_to_float kernel skips the copy).
    """
    n, h = ctx.num_tokens, spec.hidden_size
    e, k = spec.num_experts, spec.num_experts_per_token
    router = LinearSpec("mlp.gate", h, e, "router", bias=False, quantizable=False)
    if fp32_router and not ctx.amp:
        # DeepseekV2TopkRouter: F.linear(x.type(fp32), weight.type(fp32)) with a weight kept in
        # fp32 (_keep_in_fp32_modules_strict): the input's fp32 copy, fp32 logits (autocast
        # would cast both back to its dtype).
        xf = cast(seg, x, DType.FP32, "mlp.gate.input_float")
        logits = linear(seg, dataclasses.replace(ctx, weight_dtype=DType.FP32), xf, router)
    else:
        logits = linear(seg, ctx, x, router)
    logits32 = cast(seg, logits, DType.FP32, "mlp.gate.logits_float")
    probs = seg.op("mlp.gate.softmax", [logits32], n * e, DType.FP32, saves_output=True)
    index = seg.op("mlp.gate.topk_indices", [probs], n * k, DType.INT64, requires_grad=False)
    top = seg.op("mlp.gate.topk", [probs, index], n * k, DType.FP32, saves=[index])
    if scaled:  # topk_weights * routed_scaling_factor: a new tensor, nothing saved
        top = seg.op("mlp.gate.scale", [top], n * k, DType.FP32, passthrough_grad=True)
    if not renormalize:
        weights = top
        if cast_weights:  # router_top_value.to(router_logits.dtype)
            weights = cast(seg, top, logits.dtype, "mlp.gate.weights_cast")
        return weights, index, (logits, weights)
    total = seg.op("mlp.gate.sum", [top], n, DType.FP32)
    # An in-place division keeps a copy of its original input for the divisor's gradient,
    # -grad * self / other**2 (three temporaries of the weights' size).
    original = seg.op("mlp.gate.topk_clone", [top], n * k, DType.FP32, requires_grad=False)
    weights = seg.op(
        "mlp.gate.renormalize",
        [top, total, original],
        n * k,
        DType.FP32,
        view_of=top,
        saves=[original, total],
        bwd_workspace_bytes=3 * top.nbytes,
    )
    if cast_weights:  # router_top_value.to(router_logits.dtype): the fp32 weights are freed
        weights = cast(seg, weights, logits.dtype, "mlp.gate.weights_cast")
        return weights, index, (logits, weights)
    return weights, index, (logits, top)


def _grouped_experts(
    seg: Segment, ctx: StepContext, spec: ModelSpec, x: Tensor, offsets: Tensor
) -> Tensor:
    """The experts' gated MLP on the sorted rows: grouped gate_up_proj (E, 2i, h), its halves
    through act_fn(gate) * up (views of one storage), grouped down_proj (E, h, i)."""
    h, i = spec.hidden_size, spec.intermediate_size // ctx.tensor_parallel_degree
    e = spec.num_experts
    gate_up = LinearSpec("mlp.experts.gate_up_proj", h, 2 * i, "gate_up", bias=False, copies=e)
    gu = grouped_linear(seg, ctx, x, offsets, gate_up)
    g = seg.op("mlp.experts.gate", [gu], gu.numel // 2, gu.dtype, view_of=gu, passthrough_grad=True)
    a = activation(seg, g, spec.hidden_act, "mlp.experts.act_fn", fp32_pow=ctx.cuda_autocast)
    u = seg.op("mlp.experts.up", [gu], gu.numel // 2, gu.dtype, view_of=gu, passthrough_grad=True)
    p = seg.op("mlp.experts.mul", [a, u], a.numel, a.dtype, saves=[a, u])
    down = LinearSpec("mlp.experts.down_proj", i, h, "down", bias=False, copies=e)
    return grouped_linear(seg, ctx, p, offsets, down)


def qkv_projections(
    seg: Segment, ctx: StepContext, spec: ModelSpec, x: Tensor, *, names: tuple[str, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v projections: one fused matmul whose output is split into views (one name), or
    three."""
    tp = ctx.tensor_parallel_degree
    h = spec.hidden_size
    q_out = spec.num_attention_heads // tp * spec.head_dim
    kv_out = spec.num_key_value_heads // tp * spec.head_dim
    if len(names) == 1:
        qkv = linear(
            seg,
            ctx,
            x,
            LinearSpec(names[0], h, q_out + 2 * kv_out, "qkv", bias=spec.attention_bias),
        )
        rows = x.numel // h
        # .split() returns views of the fused output; SplitBackward concatenates their grads.
        q = seg.op(
            f"{names[0]}.q", [qkv], rows * q_out, qkv.dtype, view_of=qkv, passthrough_grad=True
        )
        k = seg.op(
            f"{names[0]}.k", [qkv], rows * kv_out, qkv.dtype, view_of=qkv, passthrough_grad=True
        )
        v = seg.op(
            f"{names[0]}.v", [qkv], rows * kv_out, qkv.dtype, view_of=qkv, passthrough_grad=True
        )
        return q, k, v
    q = linear(seg, ctx, x, LinearSpec(names[0], h, q_out, "q", bias=spec.attention_bias))
    k = linear(seg, ctx, x, LinearSpec(names[1], h, kv_out, "k", bias=spec.attention_bias))
    v = linear(seg, ctx, x, LinearSpec(names[2], h, kv_out, "v", bias=spec.attention_bias))
    return q, k, v


ActivationBuilder = Callable[[Segment, Tensor], Tensor]
"""An MLP activation's ops (seg, x) -> output, for activations outside ACT2FN (BloomGelu)."""


def plain_mlp(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    x: Tensor,
    names: tuple[str, str],
    act: ActivationBuilder | None = None,
) -> Tensor:
    """fc -> activation -> proj (GPT-2, OPT, GPT-NeoX, Falcon, BLOOM, BERT)."""
    h, i = spec.hidden_size, spec.intermediate_size // ctx.tensor_parallel_degree
    up = linear(seg, ctx, x, LinearSpec(names[0], h, i, "up", bias=spec.mlp_bias))
    a = (
        act(seg, up)
        if act
        else activation(seg, up, spec.hidden_act, "mlp.act", fp32_pow=ctx.cuda_autocast)
    )
    return linear(seg, ctx, a, LinearSpec(names[1], i, h, "down", bias=spec.mlp_bias))


@dataclass(frozen=True, slots=True)
class PreLnStyle:
    """Module names and variants of a pre-LayerNorm GPT-style block."""

    qkv: tuple[str, ...]  # one name: a fused projection whose output is split
    out: str  # attention output projection
    mlp: tuple[str, str]  # MLP in and out projections
    softmax_fp32: bool = True  # attention softmax in fp32 (GPT-2's eager path keeps the dtype)
    eager_only: bool = False  # eager attention whatever the setup asks (BLOOM)
    rotary_dim: int = 0  # rotary dimensions per head, rotated then cat with the rest (GPT-NeoX)
    mlp_act: ActivationBuilder | None = None  # the MLP's activation, if not ACT2FN[hidden_act]
    # What the attention and MLP modules (where methods hook their outputs) end with: their
    # output "projection" (the layer applies dropout: OPT, GPT-NeoX), their "dropout"
    # (GPT-2), or dropout and the "residual" add (BLOOM's dropout_add).
    branch_end: Literal["projection", "dropout", "residual"] = "projection"
    # The two LayerNorms' module names (before the attention, before the MLP).
    norms: tuple[str, str] = ("ln_1", "ln_2")


def pre_ln_layer(
    spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool, style: PreLnStyle
) -> LayerGraph:
    """Pre-LayerNorm blocks with a plain MLP: GPT-2, GPT-NeoX, BLOOM, OPT.

    GPT-NeoX adds attention and MLP to the residual in parallel; BLOOM's ALiBi scores need the
    eager path; GPT-2 and OPT apply residual dropout.
    """
    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    shared: tuple[Tensor, ...] = ()
    ln1 = layer_norm(seg, ctx, x, style.norms[0], h)
    q, k, v = qkv_projections(seg, ctx, spec, ln1, names=style.qkv)
    if spec.position_embedding == "rope":
        cos, sin = rope_tables(spec, ctx, seg, style.rotary_dim)
        shared = (cos, sin)
        q, k = (
            partial_rotary(seg, t, cos, sin, style.rotary_dim, spec.head_dim, f"{n}_rope")
            for t, n in ((q, "q"), (k, "k"))
        )
    o = self_attention(
        seg,
        ctx,
        spec,
        (q, k, v),
        LinearSpec(style.out, heads * spec.head_dim, h, "o", bias=spec.attention_out_bias),
        heads=heads,
        kv_heads=kv_heads,
        label="attn",
        dropout_p=spec.attention_dropout,
        softmax_fp32=style.softmax_fp32,
        eager_only=style.eager_only,
        # create_causal_mask builds the additive mask in the embeddings' dtype.
        mask_dtype=ctx.activation_dtype,
        head_major_q=bool(shared),  # torch.cat made q a new (batch, heads, seq, dim) tensor
    )
    with_residual = style.branch_end == "residual"
    o = _branch_end(seg, ctx, spec, o, x, "attn", style.branch_end)
    seg.hold(ln1)  # `hidden_states` names ln_1's output until the attention returns
    if spec.parallel_attention:
        mlp_in = layer_norm(seg, ctx, x, style.norms[1], h)
        m = plain_mlp(seg, ctx, spec, mlp_in, style.mlp, style.mlp_act)
        m = _branch_end(seg, ctx, spec, m, x, "mlp", style.branch_end)
        # GPTNeoXLayer: mlp_output + attn_output + hidden_states, the branches summed first.
        out = residual_add(seg, residual_add(seg, m, o, "branch_sum"), x, "residual")
        seg.hold(mlp_in, x)
        return LayerGraph(seg, x, out, shared)
    h1 = o if with_residual else residual_add(seg, x, o, "residual_attn")
    ln2 = layer_norm(seg, ctx, h1, style.norms[1], h)
    m = plain_mlp(seg, ctx, spec, ln2, style.mlp, style.mlp_act)
    m = _branch_end(seg, ctx, spec, m, h1, "mlp", style.branch_end)
    seg.hold(ln2)  # ... and ln_2's output until the MLP returns
    out = m if with_residual else residual_add(seg, h1, m, "residual_mlp")
    # The block's `attn_output` local and the caller's `hidden_states` (the layer input) are
    # released when the layer returns.
    seg.hold(o, x)
    return LayerGraph(seg, x, out, shared)


def _branch_end(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    y: Tensor,
    residual: Tensor,
    name: str,
    end: Literal["projection", "dropout", "residual"],
) -> Tensor:
    """A branch's hidden dropout, the method's hook on its module's output (bottleneck
    adapters) where the module ends, and the residual add when the module does it."""
    if end == "projection":
        y = ctx.method.branch_output(seg, ctx, y, f"adapter_{name}")
        return dropout(seg, ctx, y, spec.hidden_dropout, f"{name}_dropout")
    y = dropout(seg, ctx, y, spec.hidden_dropout, f"{name}_dropout")
    if end == "residual":
        y = residual_add(seg, residual, y, f"residual_{name}")
    return ctx.method.branch_output(seg, ctx, y, f"adapter_{name}")

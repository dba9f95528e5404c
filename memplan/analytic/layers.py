"""One transformer layer as a segment of ops, per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memplan.analytic.blocks import (
    LinearSpec,
    activation,
    attention_core,
    cast,
    dropout,
    layer_norm,
    linear,
    residual_add,
    rms_norm,
    rotary,
)
from memplan.analytic.context import StepContext
from memplan.analytic.graph import Segment, Tensor
from memplan.dtypes import DType
from memplan.specs.model import ModelSpec
from memplan.specs.training import Method


def bottleneck_adapter(seg: Segment, ctx: StepContext, x: Tensor, size: int, label: str) -> Tensor:
    """Houlsby adapter on a branch output: x + up(act(down(x))), trainable, in adapter dtype."""
    if ctx.method is not Method.ADAPTER:
        return x
    rows = ctx.num_tokens
    h = x.numel // rows
    xa = cast(seg, x, ctx.adapter_dtype, f"{label}.input_cast")
    down_grad = ctx.param_grad(
        f"{label}.down", h * size + size, trainable=True, dtype=ctx.adapter_dtype
    )
    d = seg.op(
        f"{label}.down", [xa], rows * size, ctx.adapter_dtype, saves=[xa], param_grads=[down_grad]
    )
    a = seg.op(f"{label}.act", [d], d.numel, d.dtype, saves=[d])
    up_grad = ctx.param_grad(f"{label}.up", size * h + h, trainable=True, dtype=ctx.adapter_dtype)
    u = seg.op(f"{label}.up", [a], x.numel, ctx.adapter_dtype, saves=[a], param_grads=[up_grad])
    return residual_add(seg, x, cast(seg, u, x.dtype, f"{label}.output_cast"), f"{label}.residual")


def prefix_kv(
    seg: Segment, ctx: StepContext, k: Tensor, v: Tensor, kv_width: int
) -> tuple[Tensor, Tensor]:
    """peft prefix tuning: each layer's keys and values are the prefix concatenated in front."""
    if ctx.method is not Method.PREFIX or not ctx.prefix_len:
        return k, v
    extra = ctx.batch * ctx.prefix_len * kv_width
    pk = seg.input(extra, k.dtype, "prefix.key", requires_grad=True, persistent=True)
    pv = seg.input(extra, v.dtype, "prefix.value", requires_grad=True, persistent=True)
    k = seg.op("prefix_cat_k", [pk, k], k.numel + extra, k.dtype, passthrough_grad=True)
    v = seg.op("prefix_cat_v", [pv, v], v.numel + extra, v.dtype, passthrough_grad=True)
    return k, v


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
) -> Tensor:
    """Prefix keys/values, autocast's casts, attention over the sequence, output projection.

    Under AMP scaled_dot_product_attention is on autocast's lower-precision list, so q, k and v
    (fp32 after a rotary product with fp32 tables) are cast to the compute dtype first.
    """
    q, k, v = qkv
    k, v = prefix_kv(seg, ctx, k, v, kv_heads * spec.head_dim)
    if ctx.amp:
        q, k, v = (cast(seg, t, ctx.compute_dtype, f"{t.label}.autocast") for t in (q, k, v))
    attn = attention_core(
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
        kv_len=ctx.seq_len + ctx.prefix_len,
    )
    return linear(seg, ctx, attn, out)


@dataclass
class LayerGraph:
    """A layer's ops, its input and output, and the shared tensors it reads."""

    segment: Segment
    input: Tensor
    output: Tensor
    shared: tuple[Tensor, ...] = ()  # rotary cos/sin: allocated once per forward


def rope_tables(spec: ModelSpec, ctx: StepContext, seg: Segment) -> tuple[Tensor, Tensor]:
    """cos and sin of LlamaRotaryEmbedding: (1, seq, head_dim) in the activation dtype."""
    numel = ctx.seq_len * spec.head_dim
    cos = seg.input(numel, ctx.activation_dtype, "rope.cos", requires_grad=False, persistent=True)
    sin = seg.input(numel, ctx.activation_dtype, "rope.sin", requires_grad=False, persistent=True)
    return cos, sin


# Families whose decoder layer is LlamaDecoderLayer's layout (llama_layer) and whose model ends
# in an RMSNorm.
LLAMA_FAMILIES: Final = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")


def llama_layer(spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
    """LlamaDecoderLayer and relatives: pre-RMSNorm attention with rotary embeddings + MLP.

    Mistral, Qwen2 and Mixtral share the layout; Phi-3 fuses qkv and gate/up projections;
    Gemma2 adds post-attention and pre/post-MLP norms and computes its norms in fp32.
    """
    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h = spec.hidden_size
    n = ctx.num_tokens
    heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    gemma = spec.family == "gemma2"
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    cos, sin = rope_tables(spec, ctx, seg)

    hn = rms_norm(seg, ctx, x, "input_layernorm", h, gemma=gemma)
    names = (
        ("self_attn.qkv_proj",)
        if spec.family == "phi3"
        else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    )
    q, k, v = _qkv(seg, ctx, spec, hn, fused=len(names) == 1, names=names)
    q = rotary(seg, q, cos, sin, "q_rope")
    k = rotary(seg, k, cos, sin, "k_rope")
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
    o = bottleneck_adapter(seg, ctx, o, ctx.adapter_size, "adapter_attn")
    seg.hold(hn)  # `hidden_states` still names the norm output until self_attn returns
    if gemma:
        o = rms_norm(seg, ctx, o, "post_attention_layernorm", h, gemma=True)
    h1 = residual_add(seg, x, o, "residual_attn")
    norm2 = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    hn2 = rms_norm(seg, ctx, h1, norm2, h, gemma=gemma)
    if spec.is_moe:
        m = moe_mlp(seg, ctx, spec, hn2)
    else:
        m = gated_mlp(
            seg,
            ctx,
            spec,
            hn2,
            intermediate=spec.intermediate_size // tp,
            fused=spec.family == "phi3",
        )
    if gemma:
        m = rms_norm(seg, ctx, m, "post_feedforward_layernorm", h, gemma=True)
    m = bottleneck_adapter(seg, ctx, m, ctx.adapter_size, "adapter_mlp")
    seg.hold(hn2)  # ... and the second norm's output until the MLP returns
    out = residual_add(seg, h1, m, "residual_mlp")
    seg.hold(x)  # the caller's `hidden_states` keeps the layer input until the layer returns
    return LayerGraph(seg, x, out, (cos, sin))


def gated_mlp(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    x: Tensor,
    *,
    intermediate: int,
    rows_label: str = "mlp",
    fused: bool = False,
    copies: int = 1,
) -> Tensor:
    """LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)); the activation saves its input.

    Phi-3's gate_up_proj computes both halves in one matmul and splits the output (views of
    one storage); so do transformers' fused MoE experts (``copies`` of them).
    """
    h = spec.hidden_size
    bias = spec.mlp_bias
    if fused:
        gu = linear(
            seg,
            ctx,
            x,
            LinearSpec(
                f"{rows_label}.gate_up_proj",
                h,
                2 * intermediate,
                "gate_up",
                bias=bias,
                copies=copies,
            ),
        )
        g = seg.op(
            f"{rows_label}.gate", [gu], gu.numel // 2, gu.dtype, view_of=gu, passthrough_grad=True
        )
        a = activation(seg, g, spec.hidden_act, f"{rows_label}.act_fn")
        u = seg.op(
            f"{rows_label}.up", [gu], gu.numel // 2, gu.dtype, view_of=gu, passthrough_grad=True
        )
    else:
        g = linear(
            seg, ctx, x, LinearSpec(f"{rows_label}.gate_proj", h, intermediate, "gate", bias=bias)
        )
        a = activation(seg, g, spec.hidden_act, f"{rows_label}.act_fn")
        u = linear(
            seg, ctx, x, LinearSpec(f"{rows_label}.up_proj", h, intermediate, "up", bias=bias)
        )
    p = seg.op(f"{rows_label}.mul", [a, u], a.numel, a.dtype, saves=[a, u])
    return linear(
        seg,
        ctx,
        p,
        LinearSpec(f"{rows_label}.down_proj", intermediate, h, "down", bias=bias, copies=copies),
    )


def moe_mlp(seg: Segment, ctx: StepContext, spec: ModelSpec, x: Tensor) -> Tensor:
    """MixtralSparseMoeBlock: a router, top-k experts per token, weighted sum of their outputs.

    Tokens are gathered per expert; summed over experts the expert MLPs see
    tokens x top_k rows, as if one dense MLP ran on the routed copies.
    """
    n = ctx.num_tokens
    h = spec.hidden_size
    e, k = spec.num_experts, spec.num_experts_per_token
    router = linear(
        seg, ctx, x, LinearSpec("mlp.gate", h, e, "router", bias=False, quantizable=False)
    )
    probs = seg.op("mlp.router_softmax", [router], n * e, DType.FP32, saves_output=True)
    weights = seg.op("mlp.topk", [probs], n * k, DType.FP32, saves=[probs])
    routed = seg.op("mlp.dispatch", [x], n * k * h, x.dtype)
    # transformers' fused experts: gate_up_proj (E, 2i, h) and down_proj (E, h, i) tensors.
    y = gated_mlp(
        seg,
        ctx,
        spec,
        routed,
        intermediate=spec.intermediate_size // ctx.tensor_parallel_degree,
        rows_label="mlp.experts",
        fused=True,
        copies=e,
    )
    scaled = seg.op("mlp.route_weight", [y, weights], y.numel, y.dtype, saves=[y, weights])
    return seg.op("mlp.combine", [scaled], n * h, x.dtype)


def _qkv(
    seg: Segment,
    ctx: StepContext,
    spec: ModelSpec,
    x: Tensor,
    *,
    fused: bool,
    names: tuple[str, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v projections: one fused matmul whose output is split into views, or three."""
    tp = ctx.tensor_parallel_degree
    h = spec.hidden_size
    q_out = spec.num_attention_heads // tp * spec.head_dim
    kv_out = spec.num_key_value_heads // tp * spec.head_dim
    if fused:
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


def _plain_mlp(
    seg: Segment, ctx: StepContext, spec: ModelSpec, x: Tensor, names: tuple[str, str]
) -> Tensor:
    """fc -> activation -> proj (GPT-2, OPT, GPT-NeoX, Falcon, BLOOM, BERT)."""
    h, i = spec.hidden_size, spec.intermediate_size // ctx.tensor_parallel_degree
    up = linear(seg, ctx, x, LinearSpec(names[0], h, i, "up", bias=spec.mlp_bias))
    a = activation(seg, up, spec.hidden_act, "mlp.act")
    return linear(seg, ctx, a, LinearSpec(names[1], i, h, "down", bias=spec.mlp_bias))


_GPT_NAMES: dict[str, tuple[tuple[str, ...], str, tuple[str, str]]] = {
    # family: (qkv names, output projection, (mlp in, mlp out))
    "gpt2": (("attn.c_attn",), "attn.c_proj", ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": (
        ("attention.query_key_value",),
        "attention.dense",
        ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "falcon": (
        ("self_attention.query_key_value",),
        "self_attention.dense",
        ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "bloom": (
        ("self_attention.query_key_value",),
        "self_attention.dense",
        ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "opt": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.out_proj",
        ("fc1", "fc2"),
    ),
}


def gpt_layer(spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
    """Pre-LayerNorm blocks with a plain MLP: GPT-2, GPT-NeoX, Falcon, BLOOM, OPT.

    GPT-NeoX and Falcon add attention and MLP to the residual in parallel; BLOOM's ALiBi
    scores need the eager path; GPT-2 and OPT apply residual dropout.
    """
    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    qkv_names, o_name, mlp_names = _GPT_NAMES[spec.family]
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    shared: tuple[Tensor, ...] = ()
    ln1 = layer_norm(seg, ctx, x, "ln_1", h)
    q, k, v = _qkv(seg, ctx, spec, ln1, fused=len(qkv_names) == 1, names=qkv_names)
    if spec.position_embedding == "rope":
        cos, sin = rope_tables(spec, ctx, seg)
        shared = (cos, sin)
        q, k = rotary(seg, q, cos, sin, "q_rope"), rotary(seg, k, cos, sin, "k_rope")
    o = self_attention(
        seg,
        ctx,
        spec,
        (q, k, v),
        LinearSpec(o_name, heads * spec.head_dim, h, "o", bias=spec.attention_out_bias),
        heads=heads,
        kv_heads=kv_heads,
        label="attn",
        dropout_p=spec.attention_dropout,
        softmax_fp32=spec.family != "gpt2",
        eager_only=spec.position_embedding == "alibi",
    )
    o = dropout(seg, ctx, o, spec.hidden_dropout, "resid_dropout")
    o = bottleneck_adapter(seg, ctx, o, ctx.adapter_size, "adapter_attn")
    seg.hold(ln1)  # `hidden_states` names ln_1's output until the attention returns
    if spec.parallel_attention:
        mlp_in = (
            ln1
            if spec.layout.get("falcon_layer_norms") == "input"
            else layer_norm(seg, ctx, x, "ln_2", h)
        )
        m = dropout(
            seg,
            ctx,
            _plain_mlp(seg, ctx, spec, mlp_in, mlp_names),
            spec.hidden_dropout,
            "mlp_dropout",
        )
        m = bottleneck_adapter(seg, ctx, m, ctx.adapter_size, "adapter_mlp")
        out = residual_add(seg, residual_add(seg, x, o, "residual_attn"), m, "residual_mlp")
        seg.hold(mlp_in, x)
        return LayerGraph(seg, x, out, shared)
    h1 = residual_add(seg, x, o, "residual_attn")
    ln2 = layer_norm(seg, ctx, h1, "ln_2", h)
    m = dropout(
        seg, ctx, _plain_mlp(seg, ctx, spec, ln2, mlp_names), spec.hidden_dropout, "mlp_dropout"
    )
    m = bottleneck_adapter(seg, ctx, m, ctx.adapter_size, "adapter_mlp")
    seg.hold(ln2)  # ... and ln_2's output until the MLP returns
    out = residual_add(seg, h1, m, "residual_mlp")
    # The block's `attn_output` local and the caller's `hidden_states` (the layer input) are
    # released when the layer returns.
    seg.hold(o, x)
    return LayerGraph(seg, x, out, shared)


def bert_layer(spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
    """BertLayer: post-LayerNorm self-attention and MLP with dropout after each branch."""
    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads = spec.num_attention_heads // tp
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    names = ("attention.self.query", "attention.self.key", "attention.self.value")
    q, k, v = _qkv(seg, ctx, spec, x, fused=False, names=names)
    o = self_attention(
        seg,
        ctx,
        spec,
        (q, k, v),
        LinearSpec("attention.output.dense", heads * spec.head_dim, h, "o", bias=True),
        heads=heads,
        kv_heads=heads,
        label="attention",
        dropout_p=spec.attention_dropout,
        softmax_fp32=False,
    )
    o = dropout(seg, ctx, o, spec.hidden_dropout, "attention.output.dropout")
    o = bottleneck_adapter(seg, ctx, o, ctx.adapter_size, "adapter_attn")
    h1 = layer_norm(
        seg, ctx, residual_add(seg, o, x, "attention.residual"), "attention.output.LayerNorm", h
    )
    m = _plain_mlp(seg, ctx, spec, h1, ("intermediate.dense", "output.dense"))
    m = dropout(seg, ctx, m, spec.hidden_dropout, "output.dropout")
    m = bottleneck_adapter(seg, ctx, m, ctx.adapter_size, "adapter_mlp")
    out = layer_norm(seg, ctx, residual_add(seg, m, h1, "output.residual"), "output.LayerNorm", h)
    return LayerGraph(seg, x, out, ())


def t5_layer(
    spec: ModelSpec,
    ctx: StepContext,
    *,
    input_requires_grad: bool,
    decoder: bool,
    encoder_len: int,
    encoder_out: Tensor | None = None,
) -> LayerGraph:
    """T5Block: pre-RMSNorm self-attention (+ cross-attention in the decoder) and MLP.

    T5 adds a relative position bias to unscaled scores, so attention runs the eager path;
    dropout follows every branch.
    """
    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads = spec.num_attention_heads // tp
    inner = heads * spec.head_dim
    p = spec.hidden_dropout
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    hn = rms_norm(seg, ctx, x, "layer.0.layer_norm", h)
    q, k, v = _qkv(
        seg,
        ctx,
        spec,
        hn,
        fused=False,
        names=("SelfAttention.q", "SelfAttention.k", "SelfAttention.v"),
    )
    o = self_attention(
        seg,
        ctx,
        spec,
        (q, k, v),
        LinearSpec("SelfAttention.o", inner, h, "o", bias=False),
        heads=heads,
        kv_heads=heads,
        label="SelfAttention",
        dropout_p=spec.attention_dropout,
        eager_only=True,
    )
    o = dropout(seg, ctx, o, p, "layer.0.dropout")
    o = bottleneck_adapter(seg, ctx, o, ctx.adapter_size, "adapter_attn")
    hidden = residual_add(seg, x, o, "layer.0.residual")
    shared: tuple[Tensor, ...] = ()
    if decoder and encoder_out is not None:
        enc = seg.input(
            encoder_out.numel,
            encoder_out.dtype,
            "encoder_hidden_states",
            requires_grad=encoder_out.requires_grad,
            persistent=True,
        )
        shared = (enc,)
        cn = rms_norm(seg, ctx, hidden, "layer.1.layer_norm", h)
        cq = linear(seg, ctx, cn, LinearSpec("EncDecAttention.q", h, inner, "q", bias=False))
        ck = linear(seg, ctx, enc, LinearSpec("EncDecAttention.k", h, inner, "k", bias=False))
        cv = linear(seg, ctx, enc, LinearSpec("EncDecAttention.v", h, inner, "v", bias=False))
        ca = attention_core(
            seg,
            ctx,
            cq,
            ck,
            cv,
            num_heads=heads,
            num_kv_heads=heads,
            label="EncDecAttention",
            kv_len=encoder_len,
            dropout_p=spec.attention_dropout,
            eager_only=True,
        )
        co = dropout(
            seg,
            ctx,
            linear(seg, ctx, ca, LinearSpec("EncDecAttention.o", inner, h, "o", bias=False)),
            p,
            "layer.1.dropout",
        )
        hidden = residual_add(seg, hidden, co, "layer.1.residual")
    fn = rms_norm(seg, ctx, hidden, "layer.-1.layer_norm", h)
    i = spec.intermediate_size // tp
    if spec.gated_mlp:  # T5DenseGatedActDense: act(wi_0 x) * wi_1 x
        g = linear(seg, ctx, fn, LinearSpec("DenseReluDense.wi_0", h, i, "gate", bias=False))
        a = activation(seg, g, spec.hidden_act, "DenseReluDense.act")
        u = linear(seg, ctx, fn, LinearSpec("DenseReluDense.wi_1", h, i, "up", bias=False))
        mid = seg.op("DenseReluDense.mul", [a, u], a.numel, a.dtype, saves=[a, u])
    else:
        up = linear(seg, ctx, fn, LinearSpec("DenseReluDense.wi", h, i, "up", bias=False))
        mid = activation(seg, up, spec.hidden_act, "DenseReluDense.act")
    mid = dropout(seg, ctx, mid, p, "DenseReluDense.dropout")
    ff = linear(seg, ctx, mid, LinearSpec("DenseReluDense.wo", i, h, "down", bias=False))
    ff = bottleneck_adapter(
        seg, ctx, dropout(seg, ctx, ff, p, "layer.-1.dropout"), ctx.adapter_size, "adapter_mlp"
    )
    out = residual_add(seg, hidden, ff, "layer.-1.residual")
    return LayerGraph(seg, x, out, shared)

"""Op builders for transformer building blocks, as the Hugging Face/PyTorch kernels run them.

Each builder appends the ops one module performs to a :class:`Segment` and returns its output.
Which tensors each op saves follows autograd's derivative formulas: ``mm`` saves its input
only when the weight needs a gradient and the weight only when the input does; ``mul`` saves
each operand for the other's gradient; ``silu``/``gelu`` save their input; ``softmax`` and
``log_softmax`` and ``rsqrt`` save their output; ``add``, ``cat``, views and casts save nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.analytic.context import StepContext
from memplan.analytic.graph import ParamGrad, Segment, Tensor
from memplan.analytic.symbolic import NotSymbolicError
from memplan.dtypes import DType, Quantization, dtype_bytes
from memplan.specs.training import Attention, LinearRole


@dataclass(frozen=True, slots=True)
class LinearSpec:
    """One nn.Linear as the step sees it."""

    label: str
    in_features: int
    out_features: int
    role: LinearRole | None
    bias: bool
    quantizable: bool = True  # bnb replaces it (False for the LM head and routers)
    trainable: bool | None = None  # None: decided by the method
    copies: int = 1  # MoE experts: identical weights run one after another on routed rows
    tied: bool = False  # the LM head sharing the token embedding's weight


def _param_grad(ctx: StepContext, label: str, numel: int, trainable: bool) -> ParamGrad:
    return ctx.param_grad(label, numel, trainable=trainable)


def cast(seg: Segment, x: Tensor, dtype: DType, name: str) -> Tensor:
    """``x.to(dtype)``: a new tensor when the dtype changes, else ``x`` itself."""
    if x.dtype is dtype:
        return x
    return seg.op(name, [x], x.numel, dtype, passthrough_grad=False)


def linear(seg: Segment, ctx: StepContext, x: Tensor, spec: LinearSpec) -> Tensor:
    """``F.linear`` (+ LoRA), in the weight's storage regime: plain, autocast or quantized."""
    rows = x.numel // spec.in_features
    numel_w = spec.in_features * spec.out_features
    quantized = spec.quantizable and ctx.quant is not Quantization.NONE
    trainable = ctx.trains_linear if spec.trainable is None else spec.trainable
    trainable = trainable and not quantized
    bias_trainable = spec.bias and (trainable or ctx.trains_bias)
    tie = "first" if spec.tied else ""
    grads = [
        ctx.param_grad(f"{spec.label}.weight", numel_w * spec.copies, trainable=trainable, tie=tie)
    ]
    if spec.bias:
        bias_numel = spec.out_features * spec.copies
        grads.append(_param_grad(ctx, f"{spec.label}.bias", bias_numel, bias_trainable))

    out_dtype = ctx.compute_dtype if (ctx.amp or quantized) else ctx.weight_dtype
    if quantized:
        # bnb MatMul4Bit: dequantize the whole weight to the compute dtype, matmul, and keep
        # only the packed weight for backward, where it dequantizes again (grad_input).
        xin = cast(seg, x, ctx.compute_dtype, f"{spec.label}.input_cast")
        deq = seg.op(
            f"{spec.label}.dequantize", [], numel_w, ctx.compute_dtype, requires_grad=False
        )
        needs_grad_input = xin.requires_grad
        out = seg.op(
            spec.label,
            [xin, deq],
            rows * spec.out_features,
            out_dtype,
            # bitsandbytes < 0.43.2 also kept the input A in ctx.tensors (fixed in #1270).
            saves=[xin] if ctx.quant_matmul_saves_input else [],
            param_grads=grads,
            requires_grad=needs_grad_input or bias_trainable,
            bwd_workspace_bytes=numel_w * dtype_bytes(ctx.compute_dtype) if needs_grad_input else 0,
        )
    elif ctx.amp:
        # torch.autocast casts the activation per op (never cached) and the fp32 weight once
        # (cached for leaf weights that require grad, until autocast exits).
        xin = cast(seg, x, ctx.compute_dtype, f"{spec.label}.input_cast")
        # The cast's backward turns the compute-dtype weight gradient into the fp32 .grad.
        wc = seg.op(
            f"{spec.label}.weight_cast",
            [],
            numel_w,
            ctx.compute_dtype,
            requires_grad=trainable or bias_trainable,
            param_grads=grads,
        )
        if trainable:
            seg.autocast_cached.append(wc)
        out = seg.op(
            spec.label,
            [xin, wc],
            rows * spec.out_features,
            out_dtype,
            saves=[xin if trainable else None, wc if xin.requires_grad else None],
        )
    else:
        out = seg.op(
            spec.label,
            [x],
            rows * spec.out_features,
            out_dtype,
            saves=[x if trainable else None],
            param_grads=grads,
        )
    return ctx.method.linear(seg, ctx, x, out, spec, quantized=quantized)


def rms_norm(
    seg: Segment, ctx: StepContext, x: Tensor, label: str, size: int, *, gemma: bool = False
) -> Tensor:
    """LlamaRMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, times weight.

    Gemma2RMSNorm instead multiplies by (1 + weight) in fp32 and casts the product back.
    T5LayerNorm computes the same quantities as Llama's.
    """
    rows = x.numel // size
    trainable = ctx.trains_norm
    x32 = cast(seg, x, DType.FP32, f"{label}.upcast")
    # pow_backward: grad * (2 * x.pow(1)) keeps two fp32 temporaries beside the result.
    sq = seg.op(
        f"{label}.pow",
        [x32],
        x32.numel,
        DType.FP32,
        saves=[x32],
        bwd_workspace_bytes=2 * x32.nbytes,
    )
    var = seg.op(f"{label}.mean", [sq], rows, DType.FP32)
    var_eps = seg.op(f"{label}.add_eps", [var], rows, DType.FP32, passthrough_grad=True)
    rstd = seg.op(f"{label}.rsqrt", [var_eps], rows, DType.FP32, saves_output=True)
    # mul backward for rstd: (grad * x).sum(-1) materializes grad * x before the reduction.
    normed = seg.op(
        f"{label}.mul_rstd",
        [x32, rstd],
        x32.numel,
        DType.FP32,
        saves=[x32, rstd],
        bwd_workspace_bytes=x32.nbytes,
    )
    grad = _param_grad(ctx, f"{label}.weight", size, trainable)
    if gemma:  # (normed * (1 + w.float())).type_as(x)
        scaled = seg.op(
            label,
            [normed],
            normed.numel,
            DType.FP32,
            saves=[normed if trainable else None],
            param_grads=[grad],
            bwd_workspace_bytes=normed.nbytes if trainable else 0,
        )
        return cast(seg, scaled, x.dtype, f"{label}.downcast")
    normed = cast(seg, normed, x.dtype, f"{label}.downcast")
    out_dtype = _promote(ctx.weight_dtype, normed.dtype)
    return seg.op(
        label,
        [normed],
        normed.numel,
        out_dtype,
        saves=[normed if trainable else None],
        param_grads=[grad],
        # The weight's gradient (grad * normed).sum() materializes the product first.
        bwd_workspace_bytes=normed.numel * dtype_bytes(out_dtype) if trainable else 0,
    )


def _promote(a: DType, b: DType) -> DType:
    if a is b:
        return a
    return DType.FP32 if DType.FP32 in (a, b) else a


def residual_add(seg: Segment, a: Tensor, b: Tensor, label: str) -> Tensor:
    """``a + b``: a new tensor; the gradient passes to both inputs unchanged."""
    dtype = _promote(a.dtype, b.dtype)
    return seg.op(label, [a, b], a.numel, dtype, passthrough_grad=True)


def rotary(seg: Segment, x: Tensor, cos: Tensor, sin: Tensor, label: str) -> Tensor:
    """apply_rotary_pos_emb: (x * cos) + (rotate_half(x) * sin); saves only cos and sin.

    x arrives as a transposed view of the projection output, so its gradient is copied to a
    contiguous tensor (clone) before the projection's backward.
    """
    dtype = _promote(x.dtype, cos.dtype)
    xc = seg.op(f"{label}.mul_cos", [x], x.numel, dtype, saves=[cos], bwd_workspace_bytes=x.nbytes)
    neg = seg.op(f"{label}.neg", [x], x.numel // 2, x.dtype)
    # rotate_half backward: slice_backward zero-fills a full-width gradient per half.
    rot = seg.op(f"{label}.rotate_half", [x, neg], x.numel, x.dtype, bwd_workspace_bytes=x.nbytes)
    rs = seg.op(f"{label}.mul_sin", [rot], x.numel, dtype, saves=[sin])
    return seg.op(label, [xc, rs], x.numel, dtype, passthrough_grad=True)


def partial_rotary(
    seg: Segment,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    head_dim: int,
    label: str,
) -> Tensor:
    """GPT-NeoX's apply_rotary_pos_emb: the first ``rotary_dim`` of each head rotate, the rest
    pass through, and torch.cat joins both into a new (batch, heads, seq, head_dim) tensor in
    the rotated part's dtype (the pass-through part cast to it)."""
    rot_numel = x.numel // head_dim * (rotary_dim or head_dim)
    rot = seg.op(f"{label}.rot", [x], rot_numel, x.dtype, view_of=x, passthrough_grad=True)
    rotated = rotary(seg, rot, cos, sin, label)
    rest = seg.op(
        f"{label}.pass", [x], x.numel - rot_numel, x.dtype, view_of=x, passthrough_grad=True
    )
    rest = cast(seg, rest, rotated.dtype, f"{label}.pass_cast")
    return seg.op(f"{label}.cat", [rotated, rest], x.numel, rotated.dtype, passthrough_grad=True)


def attention_core(
    seg: Segment,
    ctx: StepContext,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    label: str,
    kv_len: int | None = None,
    dropout_p: float = 0.0,
    softmax_fp32: bool = True,
    eager_only: bool = False,
    mask_dtype: DType | None = None,
    kv_broadcast: bool = False,
    heads_major_q: bool = False,
    sdpa_mask: bool = False,
) -> Tensor:
    """Scaled dot-product attention over (batch, heads, seq, head_dim) tensors.

    Returns the attention output laid out (batch, seq, heads, head_dim), ready for the output
    projection. ``eager_only`` for models whose scores need an explicit bias (ALiBi, T5).
    ``mask_dtype``: the dtype of the additive mask eager attention adds to the scores (None:
    the scores' own). ``kv_broadcast``: fewer key/value heads than query heads reach SDPA or
    matmul without repeat_kv or ``enable_gqa``, to be broadcast: the fused SDPA kernels need
    equal heads, so SDPA takes torch's math kernel.
    ``heads_major_q``: q is a contiguous (batch, heads, seq, dim) tensor, not a transposed view.
    ``sdpa_mask``: the caller passes SDPA a boolean causal mask instead of ``is_causal`` (as
    transformers does anyway when keys outnumber queries).
    """
    b, s = ctx.batch, ctx.seq_len
    kv_len = kv_len or s
    # CPU SDPA has no fused kernel with dropout and falls back to the math (eager-like) path.
    math_fallback = kv_broadcast or (dropout_p > 0 and ctx.device == "cpu")
    if math_fallback and ctx.attention is not Attention.EAGER and not eager_only:
        return _math_sdpa(
            seg,
            ctx,
            q,
            k,
            v,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            label=label,
            kv_len=kv_len,
            dropout_p=dropout_p,
            kv_broadcast=kv_broadcast,
        )
    if ctx.attention is Attention.EAGER or eager_only:
        return _eager_attention(
            seg,
            ctx,
            q,
            k,
            v,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            label=label,
            kv_len=kv_len,
            dropout_p=dropout_p,
            softmax_fp32=softmax_fp32,
            mask_dtype=q.dtype if mask_dtype is None else mask_dtype,
            kv_broadcast=kv_broadcast,
        )
    # Flash / memory-efficient SDPA (and flash-attn 2) save q, k, v, the output and the fp32
    # log-sum-exp per (batch, head, query); the output is already (b, s, heads, d) in memory.
    lse = seg.op(f"{label}.logsumexp", [], b * num_heads * s, DType.FP32, requires_grad=False)
    inputs = [q, k, v, lse]
    if sdpa_mask or kv_len != s:
        # A boolean mask instead of is_causal (always with a prefix): SDPA turns it into an
        # additive one in the query dtype, and the fused kernel saves that for backward.
        inputs.append(seg.op(f"{label}.mask", [], b * s * kv_len, q.dtype, requires_grad=False))
    # CUDA flash backward accumulates dQ in fp32 (dq_accum) before casting to q's dtype.
    workspace = q.numel * 4 if ctx.device == "cuda" else 0
    out = seg.op(
        f"{label}.sdpa",
        inputs,
        q.numel,
        q.dtype,
        saves=inputs,
        saves_output=True,
        bwd_workspace_bytes=workspace,
    )
    if heads_major_q and ctx.device == "cpu":
        # The CPU flash kernel lays its output out like q: transformers' transpose(1, 2)
        # .contiguous() then copies a heads-major one (CUDA's is (b, s, heads, d) already).
        out = seg.op(f"{label}.transpose", [out], out.numel, out.dtype, passthrough_grad=True)
    return out


def _math_sdpa(
    seg: Segment,
    ctx: StepContext,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    label: str,
    kv_len: int,
    dropout_p: float,
    kv_broadcast: bool,
) -> Tensor:
    """_scaled_dot_product_attention_math (the CPU path with dropout): 16-bit inputs are
    upcast to fp32; q and k are scaled by sqrt(scale) into copies kept for backward with v;
    softmax, dropout and the product run in fp32; the output is cast back. Key/value heads
    broadcast to several query heads are expanded by at::matmul (see ``_broadcast_copies``).
    """
    out_dtype = q.dtype
    views = [q, k, v]
    upcast = [
        cast(seg, t, DType.FP32, f"{label}.{n}_float") for t, n in ((q, "q"), (k, "k"), (v, "v"))
    ]
    q, k, v = upcast

    q = seg.op(f"{label}.q_scaled", [q], q.numel, DType.FP32)
    k = seg.op(f"{label}.k_scaled", [k], k.numel, DType.FP32)
    upcast += [q, k]
    full_kv = q.numel // ctx.seq_len * kv_len
    expand = kv_broadcast and num_kv_heads != num_heads and _broadcast_copies(ctx)
    if expand:
        k = seg.op(f"{label}.k_expand", [k], full_kv, DType.FP32)
    scores_numel = ctx.batch * num_heads * ctx.seq_len * kv_len
    scores = seg.op(f"{label}.qk", [q, k], scores_numel, DType.FP32, saves=_matmul_saves(q, k))
    probs = seg.op(f"{label}.softmax", [scores], scores_numel, DType.FP32, saves_output=True)
    probs = dropout(seg, ctx, probs, dropout_p, f"{label}.attn_dropout")
    if expand:
        v = seg.op(f"{label}.v_expand", [v], full_kv, DType.FP32)
    out = seg.op(f"{label}.pv", [probs, v], q.numel, DType.FP32, saves=_matmul_saves(probs, v))
    out = cast(seg, out, out_dtype, f"{label}.output_cast")
    # C++ locals live until the function returns, and the caller's q/k/v views until it does.
    seg.hold(*upcast, *views, label=f"{label}.locals")
    return out


def _eager_attention(
    seg: Segment,
    ctx: StepContext,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    label: str,
    kv_len: int,
    dropout_p: float,
    softmax_fp32: bool,
    mask_dtype: DType,
    kv_broadcast: bool,
) -> Tensor:
    """eager_attention_forward: repeat_kv, q @ k^T * scale, + mask, softmax, dropout, @ v,
    transpose."""
    b, s = ctx.batch, ctx.seq_len
    full_kv = q.numel // s * kv_len
    # repeat_kv (expand + reshape) materializes full heads; so does matmul's broadcast.
    if num_kv_heads != num_heads and (not kv_broadcast or _broadcast_copies(ctx)):
        k = seg.op(f"{label}.repeat_k", [k], full_kv, k.dtype)
        v = seg.op(f"{label}.repeat_v", [v], full_kv, v.dtype)
    q, k, v = (
        _matmul_operand(seg, ctx, t, f"{label}.{n}_copy") for t, n in ((q, "q"), (k, "k"), (v, "v"))
    )
    scores_numel = b * num_heads * s * kv_len
    scores = seg.op(f"{label}.qk", [q, k], scores_numel, q.dtype, saves=_matmul_saves(q, k))
    scaled = seg.op(f"{label}.scale", [scores], scores_numel, q.dtype)
    # 16-bit scores plus an fp32 mask promote to fp32 (add is not on autocast's lists).
    masked_dtype = _promote(q.dtype, mask_dtype)
    masked = seg.op(f"{label}.mask", [scaled], scores_numel, masked_dtype, passthrough_grad=True)
    probs_dtype = DType.FP32 if softmax_fp32 else masked_dtype
    # softmax(x, dtype=float32) first casts a 16-bit input to an fp32 copy.
    upcast = scores_numel * 4 if softmax_fp32 and masked_dtype is not DType.FP32 else 0
    probs = seg.op(
        f"{label}.softmax",
        [masked],
        scores_numel,
        probs_dtype,
        saves_output=True,
        fwd_workspace_bytes=upcast,
    )
    probs = cast(seg, probs, q.dtype, f"{label}.probs_cast")
    probs = dropout(seg, ctx, probs, dropout_p, f"{label}.attn_dropout")
    out = seg.op(f"{label}.pv", [probs, v], q.numel, q.dtype, saves=_matmul_saves(probs, v))
    return seg.op(f"{label}.transpose", [out], q.numel, q.dtype, passthrough_grad=True)


def _matmul_saves(a: Tensor, b: Tensor) -> list[Tensor | None]:
    """bmm saves each operand for the other's gradient: ``a`` only if ``b`` needs one, and
    ``b`` only if ``a`` does (keys with a trainable prefix next to frozen queries)."""
    return [a if b.requires_grad else None, b if a.requires_grad else None]


def _matmul_operand(seg: Segment, ctx: StepContext, x: Tensor, label: str) -> Tensor:
    """at::matmul folds (batch, heads) with reshape: heads viewed out of a fused projection's
    (batch, seq, heads, dim) output are copied (see ``_broadcast_copies``), and autograd saves
    the copy rather than the whole projection output."""
    if x.base is None or not _broadcast_copies(ctx):
        return x
    return seg.op(label, [x], x.numel, x.dtype, passthrough_grad=True)


def _broadcast_copies(ctx: StepContext) -> bool:
    """Whether at::matmul's reshape of (batch, heads, ...) into one batch dimension copies a
    tensor whose heads are strided (views into a fused output) or broadcast (stride 0): it
    does, unless the batch is one sequence, whose size-1 dimension folds into a view. A
    symbolic micro-batch cannot tell (sweeps predict such setups with numbers)."""
    if not isinstance(ctx.batch, int):
        raise NotSymbolicError("whether at::matmul copies depends on the micro-batch")
    return ctx.batch > 1


def layer_norm(
    seg: Segment, ctx: StepContext, x: Tensor, label: str, size: int, *, affine: bool = True
) -> Tensor:
    """F.layer_norm (native_layer_norm): saves its input and the fp32 mean and rstd per row.

    Under autocast layer_norm runs in fp32 (autocast's fp32 list), so a 16-bit input is cast.
    """
    rows = x.numel // size
    trainable = affine and ctx.trains_norm
    x_in = cast(seg, x, DType.FP32, f"{label}.autocast") if ctx.amp else x
    # CUDA keeps mean and rstd in fp32; the CPU kernel returns them in the input's dtype.
    stat = DType.FP32 if ctx.device == "cuda" else x_in.dtype
    mean = seg.op(f"{label}.mean", [], rows, stat, requires_grad=False)
    rstd = seg.op(f"{label}.rstd", [], rows, stat, requires_grad=False)
    grads = [_param_grad(ctx, f"{label}.weight", size, trainable)]
    grads.append(_param_grad(ctx, f"{label}.bias", size, trainable or (affine and ctx.trains_bias)))
    return seg.op(
        label,
        [x_in, mean, rstd],
        x_in.numel,
        x_in.dtype,
        saves=[x_in, mean, rstd],
        param_grads=grads,
    )


def dropout(seg: Segment, ctx: StepContext, x: Tensor, p: float, label: str) -> Tensor:
    """nn.Dropout in training: the output and a saved mask.

    On CUDA the fused native_dropout keeps a bool mask; elsewhere ATen's composite dropout
    multiplies by a scaled noise tensor of the input's dtype (``empty_like(x).bernoulli_()``).
    """
    if p <= 0:
        return x
    mask_dtype = DType.BOOL if ctx.device == "cuda" else x.dtype
    mask = seg.op(f"{label}.mask", [], x.numel, mask_dtype, requires_grad=False)
    return seg.op(label, [x, mask], x.numel, x.dtype, saves=[mask])


def activation(seg: Segment, x: Tensor, name: str, label: str) -> Tensor:
    """MLP activation as transformers' ACT2FN implements it.

    SiLU and F.gelu save their input; ReLU saves its output; NewGELUActivation (gelu_new, GPT-2)
    is Python arithmetic and saves x, x**3's input, tanh's output and the two factors.
    """
    if name in ("gelu_new", "gelu_fast", "gelu_accurate"):
        # 0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))), left to right: pow saves x, tanh its
        # output, the last mul both factors (0.5 * x and 1 + tanh); products with a scalar
        # and additions save nothing.
        half = seg.op(f"{label}.half", [x], x.numel, x.dtype)
        # pow backward: grad * 3 * x.pow(2) keeps two temporaries beside the result.
        cube = seg.op(
            f"{label}.pow", [x], x.numel, x.dtype, saves=[x], bwd_workspace_bytes=2 * x.nbytes
        )
        cube = seg.op(f"{label}.cube_scale", [cube], x.numel, x.dtype)
        inner = seg.op(f"{label}.inner", [x, cube], x.numel, x.dtype, passthrough_grad=True)
        scaled = seg.op(f"{label}.scale", [inner], x.numel, x.dtype)
        th = seg.op(f"{label}.tanh", [scaled], x.numel, x.dtype, saves_output=True)
        one_plus = seg.op(f"{label}.one_plus", [th], x.numel, x.dtype, passthrough_grad=True)
        return seg.op(label, [half, one_plus], x.numel, x.dtype, saves=[half, one_plus])
    if name == "relu":
        return seg.op(label, [x], x.numel, x.dtype, saves_output=True)
    return seg.op(label, [x], x.numel, x.dtype, saves=[x])

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
from memplan.analytic.symbolic import ceil_to, value_at
from memplan.dtypes import DType, Quantization, dtype_bytes
from memplan.specs.training import Attention, LinearRole
from memplan.trace import allocation_bytes


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
    layer_input = x
    # What the method's wrapper does to the input before the base layer runs (IA3).
    x = ctx.method.linear_input(seg, ctx, x, spec, quantized=quantized)
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
        # bnb Linear4bit.forward casts the input to the compute dtype; MatMul4Bit dequantizes
        # the whole weight (in QuantState.dtype, then .to(A.dtype)), matmuls, and keeps only
        # the packed weight for backward, where it dequantizes again (grad_input).
        xin = cast(seg, x, ctx.compute_dtype, f"{spec.label}.input_cast")
        four_bit = ctx.quant is not Quantization.INT8
        deq_dtype = ctx.quant_state_dtype if four_bit else ctx.compute_dtype
        deq = seg.op(f"{spec.label}.dequantize", [], numel_w, deq_dtype, requires_grad=False)
        deq = cast(seg, deq, ctx.compute_dtype, f"{spec.label}.dequantize_cast")
        needs_grad_input = xin.requires_grad
        deq_compute = numel_w * dtype_bytes(ctx.compute_dtype)
        deq_both = 0 if deq_dtype is ctx.compute_dtype else numel_w * dtype_bytes(deq_dtype)
        deq_both += deq_compute if deq_both else 0
        out = seg.op(
            spec.label,
            [xin, deq],
            rows * spec.out_features,
            out_dtype,
            # bitsandbytes < 0.43.2 also kept the input A in ctx.tensors (fixed in #1270).
            saves=[xin] if ctx.quant_matmul_saves_input else [],
            param_grads=grads,
            requires_grad=needs_grad_input or bias_trainable,
            # MatMul4Bit.backward: the weight dequantized in QuantState.dtype and its copy in
            # grad_output's dtype exist together; the first is freed before the matmul
            # allocates grad_input, the copy after it.
            bwd_pre_workspace_bytes=deq_both if needs_grad_input else 0,
            bwd_workspace_bytes=deq_compute if needs_grad_input else 0,
        )
        if four_bit:
            # Linear4bit.forward returns the product .to(inp_dtype) (fp32 under AMP: the
            # residual stream); its local x (the compute-dtype input) lives until it returns.
            out = cast(seg, out, x.dtype, f"{spec.label}.output_cast")
            seg.hold(xin, label=f"{spec.label}.input")
    elif ctx.amp:
        # torch.autocast casts the activation per op (never cached) and the fp32 weight once
        # (cached for leaf weights that require grad, until autocast exits).
        xin = cast(seg, x, ctx.compute_dtype, f"{spec.label}.input_cast")
        # The bias is cast first, the same way (addmm's operand); its gradient, a sum over rows
        # in the compute dtype, is cast back into the fp32 .grad after the weight's.
        bc = None
        if spec.bias:
            bc = seg.op(
                f"{spec.label}.bias_cast",
                [],
                spec.out_features * spec.copies,
                ctx.compute_dtype,
                requires_grad=bias_trainable,
                param_grads=grads[1:],
            )
            if bias_trainable and ctx.cached_weight_casts:
                seg.autocast_cached.append(bc)
        # The cast's backward turns the compute-dtype weight gradient into the fp32 .grad.
        wc = seg.op(
            f"{spec.label}.weight_cast",
            [],
            numel_w,
            ctx.compute_dtype,
            requires_grad=trainable,
            param_grads=grads[:1],
        )
        if trainable and ctx.cached_weight_casts:
            seg.autocast_cached.append(wc)
        operands = [xin, wc] + ([bc] if bc is not None else [])
        out = seg.op(
            spec.label,
            operands,
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
            saves_params=x.requires_grad,  # mm keeps the weight for the input's gradient
        )
    return ctx.method.linear(seg, ctx, layer_input, out, spec, quantized=quantized)


def grouped_linear(
    seg: Segment, ctx: StepContext, x: Tensor, offsets: Tensor, spec: LinearSpec
) -> Tensor:
    """transformers' ``_grouped_linear`` (integrations/moe.py): one ``torch._grouped_mm`` of
    rows sorted by expert with the experts' 3-D weight (``spec.copies`` experts).

    grouped_mm is not autocast: the input is cast to the weight dtype, and the product is in
    the weights' storage dtype (fp32 under AMP). Its backward keeps the input (for the weight
    gradient) and the offsets; no bitsandbytes or peft layer wraps the 3-D weight.
    """
    rows = x.numel // spec.in_features
    trainable = ctx.trains_linear if spec.trainable is None else spec.trainable
    numel_w = spec.in_features * spec.out_features * spec.copies
    grad = ctx.param_grad(spec.label, numel_w, trainable=trainable)
    xin = cast(seg, x, ctx.weight_dtype, f"{spec.label}.input_cast")
    return seg.op(
        spec.label,
        [xin, offsets],
        rows * spec.out_features,
        ctx.weight_dtype,
        saves=[xin if trainable else None, offsets],
        param_grads=[grad],
    )


def rms_norm(
    seg: Segment,
    ctx: StepContext,
    x: Tensor,
    label: str,
    size: int,
    *,
    gemma: bool = False,
    fp32_product: bool = False,
) -> Tensor:
    """LlamaRMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, times weight.

    Gemma2RMSNorm instead multiplies by (1 + weight) in fp32 and casts the product back;
    ``fp32_product``: the weight multiplies the fp32 normalized tensor, and the product is
    cast back (Olmo2RMSNorm's ``(weight * x).to(input_dtype)``).
    T5LayerNorm computes the same quantities as Llama's.
    """
    trainable = ctx.trains_norm_at(label)
    x32, rstd = rms_statistics(seg, x, label, size)
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
        # 1 + w.float(): an fp32 vector (the cast of a 16-bit weight is freed after the add),
        # kept by the product for the gradient of ``normed``.
        one_plus = seg.op(
            f"{label}.one_plus_weight",
            [],
            size,
            DType.FP32,
            param_grads=[grad],
            requires_grad=trainable,
            fwd_workspace_bytes=size * 4 if ctx.weight_dtype is not DType.FP32 else 0,
        )
        scaled = seg.op(
            label,
            [normed, one_plus],
            normed.numel,
            DType.FP32,
            saves=[normed if trainable else None, one_plus if normed.requires_grad else None],
            bwd_workspace_bytes=normed.nbytes if trainable else 0,
        )
        return cast(seg, scaled, x.dtype, f"{label}.downcast")
    if not fp32_product:
        normed = cast(seg, normed, x.dtype, f"{label}.downcast")
    out_dtype = promote(ctx.weight_dtype, normed.dtype)
    out = seg.op(
        label,
        [normed],
        normed.numel,
        out_dtype,
        saves=[normed if trainable else None],
        param_grads=[grad],
        # The weight's gradient (grad * normed).sum() materializes the product first.
        bwd_workspace_bytes=normed.numel * dtype_bytes(out_dtype) if trainable else 0,
        saves_params=normed.requires_grad,  # mul keeps the weight for the input's gradient
    )
    return cast(seg, out, x.dtype, f"{label}.downcast") if fp32_product else out


def rms_statistics(seg: Segment, x: Tensor, label: str, size: int) -> tuple[Tensor, Tensor]:
    """An RMS norm's fp32 statistics: (x.float(), rsqrt(x.float().pow(2).mean(-1) + eps))."""
    rows = x.numel // size
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
    return x32, rstd


def promote(a: DType, b: DType) -> DType:
    """The dtype torch's type promotion gives a binary op (or cat) of ``a`` and ``b``."""
    if a is b:
        return a
    return DType.FP32 if DType.FP32 in (a, b) else a


def residual_add(seg: Segment, a: Tensor, b: Tensor, label: str) -> Tensor:
    """``a + b``: a new tensor; the gradient passes to both inputs unchanged."""
    dtype = promote(a.dtype, b.dtype)
    return seg.op(label, [a, b], a.numel, dtype, passthrough_grad=True)


def rotary(
    seg: Segment, x: Tensor, cos: Tensor, sin: Tensor, label: str, *, cat: bool = False
) -> Tensor:
    """apply_rotary_pos_emb: (x * cos) + (rotate_half(x) * sin); saves only cos and sin.

    x arrives as a transposed view of the projection output, so its gradient is copied to a
    contiguous tensor (clone) before the projection's backward. ``cat``: the result is
    concatenated with the dimensions left unrotated (Phi-3), a copy.
    """
    dtype = promote(x.dtype, cos.dtype)
    xc = seg.op(f"{label}.mul_cos", [x], x.numel, dtype, saves=[cos], bwd_workspace_bytes=x.nbytes)
    neg = seg.op(f"{label}.neg", [x], x.numel // 2, x.dtype)
    # rotate_half backward: slice_backward zero-fills a full-width gradient per half.
    rot = seg.op(f"{label}.rotate_half", [x, neg], x.numel, x.dtype, bwd_workspace_bytes=x.nbytes)
    rs = seg.op(f"{label}.mul_sin", [rot], x.numel, dtype, saves=[sin])
    out = seg.op(label, [xc, rs], x.numel, dtype, passthrough_grad=True)
    if cat:
        out = seg.op(f"{label}.cat", [out], x.numel, dtype, passthrough_grad=True)
    return out


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
    softcap: bool = False,
    mask: bool = False,
    mask_dtype: DType | None = None,
    kv_broadcast: bool = False,
    head_major_q: bool = False,
    context_numel: int | None = None,
    causal: bool = False,
) -> Tensor:
    """Scaled dot-product attention over (batch, heads, seq, head_dim) tensors.

    Returns the attention output laid out (batch, seq, heads, head_dim), ready for the output
    projection. ``eager_only`` for models whose scores need an explicit bias (ALiBi, T5);
    ``softcap``: scores soft-capped with tanh before the mask (Gemma2; flash-attn does it in
    its kernel). ``mask``: SDPA gets transformers' boolean (batch, 1, seq, kv_len) mask
    instead of ``is_causal`` (as it does anyway when keys outnumber queries);
    scaled_dot_product_attention converts it to an additive mask in the query's dtype
    (convert_boolean_attn_mask), one per layer. ``mask_dtype``: the dtype of the additive mask
    eager attention adds to the scores (None: the scores' own). ``kv_broadcast``: fewer
    key/value heads than query heads reach SDPA or matmul without repeat_kv or ``enable_gqa``,
    to be broadcast: the fused SDPA kernels need equal heads, so SDPA takes torch's math
    kernel. ``head_major_q``: q is laid out (batch, heads, seq, head_dim) in memory (a rotary
    ``cat``), not a transposed view. ``context_numel``: the output's size when the values'
    heads are narrower than the queries' and keys' (MLA); CPU SDPA then has no fused kernel
    (check_head_dim_size_cpp) and runs the math path. ``causal``: a causal model's SDPA gets
    ``is_causal=True`` when it is handed no mask (sdpa_attention_forward).
    """
    b, s = ctx.batch, ctx.seq_len
    kv_len = kv_len or s
    sdpa = ctx.attention is not Attention.EAGER and not eager_only
    float_mask = None
    # A causal model's prefix keys need a mask (ctx.sdpa_mask); a bidirectional encoder without
    # padding gets none (create_bidirectional_mask), whatever the keys' length.
    if sdpa and mask:
        float_mask = seg.op(f"{label}.float_mask", [], b * s * kv_len, q.dtype, requires_grad=False)
    # CPU SDPA has no fused kernel with dropout and falls back to the math (eager-like) path.
    # ... and none for values narrower than the queries and keys (check_head_dim_size_cpp).
    narrow_v = context_numel is not None
    backend = (
        _cuda_sdpa_backend(ctx, q, num_heads, num_kv_heads, float_mask, narrow_v, kv_len)
        if sdpa
        else ""
    )
    math_fallback = (
        kv_broadcast
        or (ctx.device == "cpu" and (dropout_p > 0 or narrow_v))
        or (sdpa and backend == "math")
    )
    if math_fallback and sdpa:
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
            float_mask=float_mask,
            kv_broadcast=kv_broadcast,
            context_numel=context_numel,
            is_causal=causal and float_mask is None,
        )
    if not sdpa:
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
            softcap=softcap,
            mask_dtype=q.dtype if mask_dtype is None else mask_dtype,
            kv_broadcast=kv_broadcast,
            context_numel=context_numel,
        )
    # Flash / memory-efficient SDPA (and flash-attn 2) save q, k, v, the output and the fp32
    # log-sum-exp per (batch, head, query), and the mask they were given; the output is
    # already (b, s, heads, d) in memory.
    lse_len = s
    if backend == "efficient":  # logsumexp padded to whole 32-query blocks (kAlignLSE)
        lse_len = ceil_to(s, 32)
    lse = seg.op(f"{label}.logsumexp", [], b * num_heads * lse_len, DType.FP32, requires_grad=False)
    saved_rng: list[Tensor] = []
    if backend == "flash":
        # mha_fwd returns its RNG state (uint64 [2]) and an unused uint64 [] on the device as
        # philox seed and offset, saved for backward (flash_api.cpp).
        saved_rng = [
            seg.op(f"{label}.rng_state", [], 2, DType.INT64, requires_grad=False),
            seg.op(f"{label}.rng_unused", [], 1, DType.INT64, requires_grad=False),
        ]
    workspace = _fused_sdpa_backward_workspace_bytes(
        ctx, backend, q, num_heads, num_kv_heads, kv_len
    )
    inputs = [q, k, v, lse, *saved_rng] + ([float_mask] if float_mask else [])
    out = seg.op(
        f"{label}.sdpa",
        inputs,
        q.numel if context_numel is None else context_numel,
        q.dtype,
        saves=inputs,
        saves_output=True,
        bwd_workspace_bytes=workspace,
    )
    if head_major_q and ctx.device == "cpu":
        # The CPU flash kernel lays its output out like q: sdpa_attention_forward's
        # transpose(1, 2).contiguous() then copies a heads-major one (CUDA's is (b, s, heads,
        # d) already).
        out = seg.op(f"{label}.transpose", [out], out.numel, q.dtype, passthrough_grad=True)
    return out


def _cuda_sdpa_backend(
    ctx: StepContext,
    q: Tensor,
    num_heads: int,
    num_kv_heads: int,
    float_mask: Tensor | None,
    narrow_v: bool,
    kv_len: int,
) -> str:
    """The SDPA backend on CUDA (sdp_utils.cpp select_sdp_backend on sm80+, default priority;
    memplan.torchsim.cuda_kernels.sdpa_backend): flash for 16-bit inputs without a mask with
    equal head sizes up to 256, else memory-efficient for head sizes in whole 8 (16-bit) or 4
    (fp32) elements and equal heads, else math. flash-attn 2 is the flash kernel. '' on CPU."""
    if ctx.device != "cuda":
        return ""
    if ctx.attention is Attention.FLASH:
        return "flash"
    head_dim = _head_dim(ctx, q, num_heads)
    half = q.dtype in (DType.BF16, DType.FP16)
    if half and float_mask is None and not narrow_v and head_dim <= 256:
        return "flash"
    alignment = 8 if half else 4
    if head_dim % alignment == 0 and num_kv_heads == num_heads:
        return "efficient"
    return "math"


def _head_dim(ctx: StepContext, q: Tensor, num_heads: int) -> int:
    """Elements per head of the queries: the same for every shape, so one point of a symbolic
    size gives it."""
    tokens = value_at(q.numel, 1, 1) // num_heads
    return tokens // value_at(ctx.batch * ctx.seq_len, 1, 1)


def _fused_sdpa_backward_workspace_bytes(
    ctx: StepContext, backend: str, q: Tensor, num_heads: int, num_kv_heads: int, kv_len: int
) -> int:
    """Scratch a fused SDPA backward allocates beside the gradients, on CUDA.

    flash (flash_api.cpp mha_bwd): softmax_d fp32 [b, heads, round128(s)] and the dQ
    accumulator fp32 [b, round128(s), heads, round32(d)] (round64 above d = 128); with fewer
    key/value heads, dK and dV over every query head in q's dtype, summed afterwards.
    memory-efficient (kernel_backward.h kNeedsAccumGradQ): an fp32 dQ accumulator of q's size
    (its tile padding and key splits depend on the GPU and are not modelled).
    """
    b, s = ctx.batch, ctx.seq_len
    head_dim = _head_dim(ctx, q, num_heads)
    if backend == "efficient":
        return allocation_bytes(q.numel * 4)
    if backend != "flash":
        return 0
    s_rounded = ceil_to(s, 128)
    head_8 = -(-head_dim // 8) * 8
    head_rounded = -(-head_8 // (32 if head_8 <= 128 else 64)) * (32 if head_8 <= 128 else 64)
    total = allocation_bytes(b * num_heads * s_rounded * 4)
    total += allocation_bytes(b * s_rounded * num_heads * head_rounded * 4)
    if num_kv_heads != num_heads:
        expanded = b * kv_len * num_heads * head_dim * dtype_bytes(q.dtype)
        total += 2 * allocation_bytes(expanded)
    return total


def repeat_kv(seg: Segment, x: Tensor, groups: int, label: str) -> Tensor:
    """transformers' repeat_kv: expand + reshape copies each key/value head ``groups`` times."""
    return seg.op(label, [x], x.numel * groups, x.dtype)


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
    float_mask: Tensor | None = None,
    kv_broadcast: bool = False,
    context_numel: int | None = None,
    is_causal: bool = False,
) -> Tensor:
    """_scaled_dot_product_attention_math (the CPU path with dropout, or key/value heads to
    broadcast): 16-bit inputs are upcast to fp32 (locals until it returns); q is scaled by
    sqrt(scale) into a local (``query``), the transposed key into a temporary; softmax, dropout
    and the product run in fp32; the output is cast back, and so are the attention weights
    (returned with it, then dropped by scaled_dot_product_attention). at::matmul folds batch
    and heads with reshape, which copies an operand strided by a transposed view when the
    batch is more than one sequence (the bmm then saves the copy). An additive mask is added
    to the scores in place; key/value heads broadcast to several query heads are expanded by
    at::matmul (a copy unless the batch is one sequence). With ``is_causal`` it builds its own
    mask after scaling q: ``ones({L, S}, kBool).tril()`` turned into an additive one in the
    scaled query's dtype (convert_boolean_attn_mask), a local until it returns.
    """
    out_dtype = q.dtype
    views = [q, k, v]
    strided = [t.base is not None and ctx.batched for t in views]
    upcast = [
        cast(seg, t, DType.FP32, f"{label}.{n}_float") for t, n in ((q, "q"), (k, "k"), (v, "v"))
    ]
    q, k, v = upcast
    q = seg.op(f"{label}.q_scaled", [q], q.numel, DType.FP32)
    if is_causal:
        float_mask = _causal_mask(seg, ctx.seq_len * kv_len, label)
    k_scaled = k = seg.op(f"{label}.k_scaled", [k], k.numel, DType.FP32)
    upcast.append(q)
    full_kv = q.numel // ctx.seq_len * kv_len
    expand = kv_broadcast and num_kv_heads != num_heads and ctx.batched
    if expand:
        k = seg.op(f"{label}.k_expand", [k], full_kv, DType.FP32)
    elif strided[1]:
        k = seg.op(f"{label}.k_contiguous", [k], k.numel, DType.FP32, passthrough_grad=True)
    if strided[0]:
        q = seg.op(f"{label}.q_contiguous", [q], q.numel, DType.FP32, passthrough_grad=True)
    scores_numel = ctx.batch * num_heads * ctx.seq_len * kv_len
    scores = seg.op(f"{label}.qk", [q, k], scores_numel, DType.FP32, saves=_bmm_saves(q, k))
    seg.hold(k_scaled, label=f"{label}.k_scaled.end")  # a temporary of the matmul's expression
    probs = seg.op(f"{label}.softmax", [scores], scores_numel, DType.FP32, saves_output=True)
    probs = dropout(seg, ctx, probs, dropout_p, f"{label}.attn_dropout")
    weights = cast(seg, probs, out_dtype, f"{label}.weights_cast")
    if expand:
        v = seg.op(f"{label}.v_expand", [v], full_kv, DType.FP32)
    elif strided[2]:
        v = seg.op(f"{label}.v_contiguous", [v], v.numel, DType.FP32, passthrough_grad=True)
    # The context has the values' head width (MLA: v_head_dim below the q/k heads').
    out_numel = q.numel if context_numel is None else context_numel
    out = seg.op(f"{label}.pv", [probs, v], out_numel, DType.FP32, saves=_bmm_saves(probs, v))
    out = cast(seg, out, out_dtype, f"{label}.output_cast")
    # C++ locals live until the function returns, and the caller's q/k/v views until it does.
    held = [float_mask] if float_mask else []
    seg.hold(*upcast, weights, *views, *held, label=f"{label}.locals")
    # The output is (batch, heads, seq, head_dim) in memory: sdpa_attention_forward's
    # transpose(1, 2).contiguous() copies it.
    return seg.op(f"{label}.transpose", [out], out.numel, out.dtype, passthrough_grad=True)


def _causal_mask(seg: Segment, numel: int, label: str) -> Tensor:
    """_scaled_dot_product_attention_math's is_causal mask: a boolean (L, S) ``ones().tril()``
    and the fp32 additive mask ``where`` makes of it (one per call, not per sequence)."""
    ones = seg.op(f"{label}.causal_ones", [], numel, DType.BOOL, requires_grad=False)
    lower = seg.op(f"{label}.causal_tril", [ones], numel, DType.BOOL, requires_grad=False)
    return seg.op(f"{label}.causal_mask", [lower], numel, DType.FP32, requires_grad=False)


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
    softcap: bool = False,
    kv_broadcast: bool = False,
    context_numel: int | None = None,
) -> Tensor:
    """eager_attention_forward: repeat_kv, q @ k^T * scale, + mask, softmax, dropout, @ v,
    transpose."""
    b, s = ctx.batch, ctx.seq_len
    # repeat_kv (expand + reshape) materializes full heads; so does matmul's broadcast, unless
    # the batch is one sequence. One key/value head expands into a view (the reshape merges a
    # dimension of size one), which matmul folds into a copy only for a batch of sequences.
    broadcast = kv_broadcast or num_kv_heads == 1
    if num_kv_heads != num_heads and (not broadcast or ctx.batched):
        k = repeat_kv(seg, k, num_heads // num_kv_heads, f"{label}.repeat_k")
        v = repeat_kv(seg, v, num_heads // num_kv_heads, f"{label}.repeat_v")
    scores_numel = b * num_heads * s * kv_len
    q = _bmm_operand(seg, ctx, q, f"{label}.q_contiguous")
    k = _bmm_operand(seg, ctx, k, f"{label}.k_contiguous")
    scores = seg.op(f"{label}.qk", [q, k], scores_numel, q.dtype, saves=_bmm_saves(q, k))
    scaled = seg.op(f"{label}.scale", [scores], scores_numel, q.dtype)
    if softcap:  # Gemma2's eager_attention_forward: tanh(scores / cap) * cap, tanh saves its output
        capped = seg.op(f"{label}.softcap_div", [scaled], scores_numel, q.dtype)
        th = seg.op(f"{label}.softcap_tanh", [capped], scores_numel, q.dtype, saves_output=True)
        scaled = seg.op(f"{label}.softcap_mul", [th], scores_numel, q.dtype)
    # 16-bit scores plus an fp32 mask promote to fp32 (add is not on autocast's lists).
    masked_dtype = promote(q.dtype, mask_dtype)
    masked = seg.op(f"{label}.mask", [scaled], scores_numel, masked_dtype, passthrough_grad=True)
    # softmax(x, dtype=float32) first casts a 16-bit input to an fp32 copy (an autograd op: the
    # backward computes the scores' gradient in fp32 and casts it back).
    upcast = cast(seg, masked, DType.FP32, f"{label}.softmax_upcast") if softmax_fp32 else masked
    probs = seg.op(f"{label}.softmax", [upcast], scores_numel, upcast.dtype, saves_output=True)
    probs = cast(seg, probs, q.dtype, f"{label}.probs_cast")
    seg.hold(masked)  # `attn_weights` names the masked scores until the softmax replaces them
    probs = dropout(seg, ctx, probs, dropout_p, f"{label}.attn_dropout")
    v = _bmm_operand(seg, ctx, v, f"{label}.v_contiguous")
    out_numel = q.numel if context_numel is None else context_numel
    out = seg.op(f"{label}.pv", [probs, v], out_numel, q.dtype, saves=_bmm_saves(probs, v))
    return seg.op(f"{label}.transpose", [out], out_numel, q.dtype, passthrough_grad=True)


def _bmm_operand(seg: Segment, ctx: StepContext, x: Tensor, label: str) -> Tensor:
    """torch.matmul folds batch and heads into one dimension with reshape, which copies a
    strided view (a slice of a fused projection's output) when the batch is more than one
    sequence; the bmm then saves the copy (one sequence folds into a view of the slice)."""
    if x.base is None or not ctx.batched:
        return x
    return seg.op(label, [x], x.numel, x.dtype, passthrough_grad=True)


def _bmm_saves(a: Tensor, b: Tensor) -> list[Tensor | None]:
    """bmm saves each operand only for the other's gradient (derivatives.yaml): keys with a
    trainable prefix next to frozen queries."""
    return [a if b.requires_grad else None, b if a.requires_grad else None]


def layer_norm(
    seg: Segment, ctx: StepContext, x: Tensor, label: str, size: int, *, affine: bool = True
) -> Tensor:
    """F.layer_norm (native_layer_norm): saves its input and the fp32 mean and rstd per row.

    Under CUDA autocast layer_norm runs in fp32 (on its fp32 list), so a 16-bit input is cast;
    CPU autocast leaves layer_norm alone, and the kernel takes a 16-bit input with fp32 weights.
    """
    rows = x.numel // size
    trainable = affine and ctx.trains_norm_at(label)
    upcast = ctx.amp and ctx.device == "cuda"
    x_in = cast(seg, x, DType.FP32, f"{label}.autocast") if upcast else x
    # CUDA keeps mean and rstd in fp32; the CPU kernel returns them in the input's dtype, or
    # in fp32 when input and weights differ (layer_norm_cpu's mixed-type path).
    mixed = affine and x_in.dtype is not ctx.weight_dtype
    stat = DType.FP32 if ctx.device == "cuda" or mixed else x_in.dtype
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
        saves_kernel_outputs=True,  # mean and rstd are native_layer_norm's outputs
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


def activation(seg: Segment, x: Tensor, name: str, label: str, *, fp32_pow: bool = False) -> Tensor:
    """MLP activation as transformers' ACT2FN implements it.

    SiLU and F.gelu save their input; ReLU saves its output; NewGELUActivation (gelu_new, GPT-2)
    is Python arithmetic and saves x, x**3's input, tanh's output and the two factors.
    ``fp32_pow``: CUDA autocast (pow is on its fp32 list, autocast_mode.cpp) casts x to fp32
    for x**3, and the fp32 cube promotes everything after it to fp32.
    """
    if name in ("gelu_new", "gelu_fast", "gelu_accurate"):
        # 0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))), left to right: pow saves x, tanh its
        # output, the last mul both factors (0.5 * x and 1 + tanh); products with a scalar
        # and additions save nothing.
        half = seg.op(f"{label}.half", [x], x.numel, x.dtype)
        px = cast(seg, x, DType.FP32, f"{label}.pow_autocast") if fp32_pow else x
        wide = px.dtype
        # pow backward: grad * 3 * x.pow(2) keeps two temporaries beside the result.
        cube = seg.op(
            f"{label}.pow", [px], x.numel, wide, saves=[px], bwd_workspace_bytes=2 * px.nbytes
        )
        cube = seg.op(f"{label}.cube_scale", [cube], x.numel, wide)
        inner = seg.op(f"{label}.inner", [x, cube], x.numel, wide, passthrough_grad=True)
        scaled = seg.op(f"{label}.scale", [inner], x.numel, wide)
        th = seg.op(f"{label}.tanh", [scaled], x.numel, wide, saves_output=True)
        one_plus = seg.op(f"{label}.one_plus", [th], x.numel, wide, passthrough_grad=True)
        return seg.op(label, [half, one_plus], x.numel, wide, saves=[half, one_plus])
    if name == "relu":
        return seg.op(label, [x], x.numel, x.dtype, saves_output=True)
    return seg.op(label, [x], x.numel, x.dtype, saves=[x])

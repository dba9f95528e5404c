"""Losses that never hold the whole logits: what each keeps instead (``TrainingSetup.loss``).

- ``chunked``: torchtune's ``LinearCrossEntropyLoss`` (torchtune/modules/loss/
  cross_entropy_loss.py), eager: the hidden states of counted tokens are copied out
  (``mask_inputs``: ``index_select``), split into ``num_output_chunks`` chunks (``tensor_split``,
  slices) and each chunk runs the LM head, ``.float()`` and ``cross_entropy(reduction="sum")``.
  Autograd keeps every chunk's fp32 log-probabilities (log_softmax saves its output); what is
  never whole is the 16-bit logits, their fp32 upcast and, in backward, their gradients.
- ``fused-linear``: Liger's ``LigerFusedLinearCrossEntropyFunction``
  (liger_kernel/ops/fused_linear_cross_entropy.py): the forward computes the gradients chunk by
  chunk and saves them; backward only hands them on. Triton kernels: modelled from the source.
- ``cut``: Apple's ``cut_cross_entropy.linear_cross_entropy`` (cut_cross_entropy/cce.py):
  the forward keeps the inputs, the weight and the log-sum-exp of each counted token; backward
  recomputes logits block by block inside its kernel. Triton kernels: modelled from the source.

Every loss reads the labels shifted as transformers' ForCausalLMLoss shifts them: all tokens
but each sequence's last count.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.analytic.blocks import LinearSpec, cast
from memplan.analytic.context import StepContext
from memplan.analytic.graph import ParamGrad, Segment, Tensor
from memplan.dtypes import DType, dtype_bytes
from memplan.specs.model import ModelSpec
from memplan.specs.training import LossKind
from memplan.trace import Category

# liger_kernel/ops/fused_linear_cross_entropy.py: MAX_FUSED_SIZE (no effect on memory) aside,
# the chunk size is next_power_of_2(ceil(BT / ceil(V / H))).


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def liger_chunk_rows(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Rows of one logits chunk of Liger's fused linear cross-entropy.

    inc_factor = ceil(V / H); chunk_size = next_power_of_2(ceil(BT / inc_factor)), so a chunk
    of logits is about as large as the hidden states.

    >>> liger_chunk_rows(4 * 4096, 4096, 128256)
    512
    """
    inc_factor = -(-vocab_size // hidden_size)
    return min(num_tokens, _next_power_of_2(-(-num_tokens // inc_factor)))


def _counted(ctx: StepContext) -> int:
    """Tokens whose shifted label counts: all but each sequence's last."""
    return ctx.batch * (ctx.seq_len - 1)


def _chunk_rows(rows: int, chunks: int) -> list[int]:
    """``tensor_split(rows, chunks)``: the first ``rows % chunks`` chunks get one row more."""
    base, extra = divmod(rows, chunks)
    return [base + (1 if i < extra else 0) for i in range(chunks)]


def _head_spec(spec: ModelSpec, ctx: StepContext) -> LinearSpec:
    return LinearSpec(
        "lm_head",
        spec.hidden_size,
        spec.vocab_size // ctx.tensor_parallel_degree,
        None,
        bias=False,
        quantizable=False,
        trainable=ctx.trains_embedding,
        tied=spec.tie_word_embeddings,
    )


def _shifted_labels(ctx: StepContext, seg: Segment) -> Tensor:
    """ForCausalLMLoss's shift: the labels padded with the ignore index (int64), then
    ``[..., 1:].contiguous()``."""
    padded = seg.op(
        "labels.pad", [], ctx.batch * (ctx.seq_len + 1), DType.INT64, requires_grad=False
    )
    return seg.op("labels.shift", [padded], ctx.num_tokens, DType.INT64, requires_grad=False)


def _valid_positions(ctx: StepContext, seg: Segment, labels: Tensor, dims: int) -> Tensor:
    """``torch.where(labels != ignore_index)``: a bool mask, then nonzero's (count, dims) int64."""
    mask = seg.op("labels.ne", [labels], ctx.num_tokens, DType.BOOL, requires_grad=False)
    return seg.op("labels.nonzero", [mask], _counted(ctx) * dims, DType.INT64, requires_grad=False)


def _head_grads(ctx: StepContext, spec: ModelSpec, head: LinearSpec, uses: int) -> list[ParamGrad]:
    """The LM head weight's gradient contribution from each of ``uses`` matmuls, in forward
    order: backward runs them in reverse, the first to run buffers its contribution, the
    others are summed into it (out of place); after the last, the sum becomes .grad (a tied
    head's sum waits for the embedding's gradient instead)."""
    grad = ctx.param_grad(
        "lm_head.weight",
        head.in_features * head.out_features,
        trainable=bool(head.trainable),
        buffered_in=Category.LOGITS,
    )
    if not grad.grad_bytes:
        return [grad] * uses
    if uses == 1:
        return [replace(grad, tie="first" if head.tied else "")]
    last = "sum" if head.tied else "sum-last"
    return (
        [replace(grad, tie=last)]
        + [replace(grad, tie="sum")] * (uses - 2)
        + [replace(grad, tie="first")]
    )


def chunked_cross_entropy(
    spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
) -> tuple[Tensor, Tensor]:
    """torchtune LinearCrossEntropyLoss(num_output_chunks=ctx.loss_chunks), eager."""
    head = _head_spec(spec, ctx)
    h = spec.hidden_size
    labels = _shifted_labels(ctx, seg)
    # total_valid_tokens = torch.where(targets != ignore_index)[0].numel() (2-D targets).
    _valid_positions(ctx, seg, labels, 2)
    # mask_inputs: index_select of the counted rows (IndexSelectBackward keeps the indices).
    indices = _valid_positions(ctx, seg, labels, 1)
    rows = _counted(ctx)
    selected = seg.op("hidden.index_select", [x, indices], rows * h, x.dtype, saves=[indices])
    targets = seg.op("targets.index_select", [labels, indices], rows, DType.INT64)
    total = seg.op("total_loss", [], 1, DType.FP32, requires_grad=False)
    sizes = [n for n in _chunk_rows(rows, ctx.loss_chunks) if n]
    # tensor_split: slices; each SliceBackward zero-fills a gradient of the whole selection.
    chunks = [
        seg.op(f"hidden.chunk{i}", [selected], n * h, x.dtype, view_of=selected)
        for i, n in enumerate(sizes)
    ]
    grads = _head_grads(ctx, spec, head, len(chunks))
    cached: Tensor | None = None
    for i, (chunk, n) in enumerate(zip(chunks, sizes, strict=True)):
        target = seg.op(f"targets.chunk{i}", [targets], n, DType.INT64, view_of=targets)
        logits, cached = _head_matmul(seg, ctx, chunk, head, grads[i], cached)
        logits = ctx.method.linear(seg, ctx, chunk, logits, head, quantized=False)
        loss_in = cast(seg, logits, DType.FP32, f"logits{i}.float") if ctx.logits_fp32 else logits
        if not ctx.logits_fp32 and ctx.amp:  # cross_entropy is on autocast's fp32 list
            loss_in = cast(seg, loss_in, DType.FP32, f"logits{i}.autocast")
        logp = seg.op(f"log_softmax{i}", [loss_in], loss_in.numel, DType.FP32, saves_output=True)
        weight = seg.op(f"nll_loss{i}.total_weight", [], 1, DType.FP32, requires_grad=False)
        part = seg.op(f"nll_loss{i}", [logp, target, weight], 1, DType.FP32, saves=[target, weight])
        # compute_cross_entropy's local ``logits`` and the ``.float()`` argument live until it
        # returns.
        seg.hold(logits, loss_in, label=f"chunk{i}.locals")
        # total_loss += loss: in place (AddBackward hands the gradient on to both operands).
        total = seg.op(f"total_loss.add{i}", [total, part], 1, DType.FP32, view_of=total,
                       passthrough_grad=True)  # fmt: skip
    loss = seg.op("loss", [total], 1, DType.FP32)
    # The loss function's locals and the caller's (the hidden states, the shifted labels).
    seg.hold(x, labels, selected, total, label="loss.locals")
    return loss, loss


def _head_matmul(
    seg: Segment,
    ctx: StepContext,
    x: Tensor,
    head: LinearSpec,
    grad: ParamGrad,
    cached: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """One chunk through the LM head (blocks.linear's regimes, unquantized): under autocast a
    trainable weight is cast once and the cast cached for every chunk (its gradients summed
    into the cast's); otherwise each matmul contributes to the weight's gradient itself."""
    rows = x.numel // head.in_features
    numel_w = head.in_features * head.out_features
    trainable = bool(head.trainable)
    if ctx.amp:
        xin = cast(seg, x, ctx.compute_dtype, "lm_head.input_cast")
        if cached is None:
            cached = seg.op(
                "lm_head.weight_cast",
                [],
                numel_w,
                ctx.compute_dtype,
                requires_grad=trainable,
                param_grads=[replace(grad, tie="first" if head.tied else "")],
            )
            if trainable:
                seg.autocast_cached.append(cached)
        out = seg.op(
            "lm_head",
            [xin, cached],
            rows * head.out_features,
            ctx.compute_dtype,
            saves=[xin if trainable else None, cached if xin.requires_grad else None],
        )
        if not trainable:
            cached = None  # an untracked cast is not cached: cast again per chunk
        return out, cached
    out = seg.op(
        "lm_head",
        [x],
        rows * head.out_features,
        ctx.weight_dtype,
        saves=[x if trainable else None],
        param_grads=[grad],
        saves_params=x.requires_grad,
    )
    return out, None


def fused_linear_cross_entropy(
    spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
) -> tuple[Tensor, Tensor]:
    """Liger LigerForCausalLMLoss -> LigerFusedLinearCrossEntropyFunction (reduction="sum",
    divided by the counted tokens), modelled from liger_kernel/ops/fused_linear_cross_entropy.py.

    Forward: ``grad_input = zeros_like(_input)`` and ``grad_weight = zeros_like(weight)``
    (trainable head), ``loss_1d`` (fp32 per token) and the label mask; per chunk of
    ``liger_chunk_rows`` rows, the logits in the matmul's dtype, overwritten by their gradient,
    then ``grad_input[chunk] = grad_logits @ weight`` (a chunk-sized product) and
    ``grad_weight += mm(grad_logits.t(), input_chunk).float()`` (a weight-sized product and its
    fp32 copy). Rebinding ``logits_chunk`` allocates the next chunk before the previous dies.
    Backward hands the saved buffers on (scaled in place): the hidden states' gradient and
    .grad.
    """
    head = _head_spec(spec, ctx)
    n, h, v = ctx.num_tokens, spec.hidden_size, head.out_features
    labels = _shifted_labels(ctx, seg)
    trainable = bool(head.trainable)
    needs_grad = x.requires_grad or trainable
    grad_input = None
    if needs_grad:
        grad_input = seg.op("grad_input", [], n * h, x.dtype, requires_grad=False)
    grad = ctx.param_grad("lm_head.weight", h * v, trainable=trainable)
    precomputed = None
    if grad.grad_bytes:
        # zeros_like(weight): the weight's dtype (fp32 under AMP).
        precomputed = seg.op(
            "grad_weight", [], h * v, ctx.weight_dtype, requires_grad=False,
            category=Category.GRADIENTS,
        )  # fmt: skip
    loss_1d = seg.op("loss_1d", [], n, DType.FP32, requires_grad=False)
    mask = seg.op("target_mask", [labels], n, DType.BOOL, requires_grad=False)
    logits_dtype = ctx.compute_dtype if ctx.amp else ctx.weight_dtype
    chunk = liger_chunk_rows(n, h, v)
    logits_bytes = chunk * v * dtype_bytes(logits_dtype)
    # Two chunks of logits at the turnover; the grad_input product; under autocast the input
    # chunk's and (frozen head) the weight's casts; the weight-sized product and its fp32 copy.
    work = 2 * logits_bytes
    if needs_grad:
        step = chunk * h * dtype_bytes(logits_dtype)
        if ctx.amp:
            step += chunk * h * dtype_bytes(logits_dtype) + (0 if trainable else h * v * 2)
        if trainable and not (ctx.amp and ctx.device == "cuda"):
            # torch >= 2.8 on CUDA adds a 16-bit product into fp32 grad_weight directly
            # (addmm out_dtype); otherwise mm(...) then .float().
            step += h * v * dtype_bytes(logits_dtype)
            if logits_dtype is not DType.FP32:
                step += h * v * 4
        work += step
    if trainable and ctx.amp:  # autocast caches the trainable weight's cast until it exits
        cast_cache = seg.op("lm_head.weight_cast", [], h * v, ctx.compute_dtype,
                            requires_grad=False)  # fmt: skip
        seg.autocast_cached.append(cast_cache)
        seg.hold(cast_cache, label="lm_head.weight_cast")
    saved = [t for t in (grad_input, precomputed) if t is not None]
    param_grads = [replace(grad, precomputed=precomputed)] if precomputed is not None else []
    loss = seg.op(
        "fused_linear_cross_entropy",
        [x, labels, mask, loss_1d, *saved],
        1,
        DType.FP32,
        saves=saved,
        param_grads=param_grads,
        requires_grad=needs_grad,
        fwd_workspace_bytes=work,
    )
    # Backward returns the saved grad_input as the hidden states' gradient (no new tensor).
    seg.ops[-1].input_grad_from_saved = grad_input
    out = seg.op("loss", [loss], 1, DType.FP32)  # sum / num_items_in_batch
    seg.hold(x, labels, label="loss.locals")
    return out, out


def cut_cross_entropy(
    spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
) -> tuple[Tensor, Tensor]:
    """cut_cross_entropy.linear_cross_entropy(hidden, lm_head.weight, labels, shift=1) as its
    transformers patch calls it, modelled from cut_cross_entropy/cce.py.

    Forward: the counted positions (``_build_flat_valids``: int64), the log-sum-exp and the
    negated target logit per counted token (fp32), the average logit per vocabulary entry
    (``filter_eps="auto"``: fp32); it saves the inputs and the weight (their 16-bit casts under
    autocast), the log-sum-exp, the positions and the averages. Backward sorts the vocabulary
    by average logit (int32) and accumulates ``de = zeros_like(e)`` and ``dc = zeros_like(c)``
    (trainable weight) block by block, cast back to the parameters' dtypes.
    """
    head = _head_spec(spec, ctx)
    n, h, v = ctx.num_tokens, spec.hidden_size, head.out_features
    counted = _counted(ctx)
    trainable = bool(head.trainable)
    valids = seg.op("valids", [], counted, DType.INT64, requires_grad=False)
    saved = [x, valids]
    if ctx.amp:
        # Inside the autograd Function: e.to(autocast dtype), c.to(autocast dtype), saved.
        saved += [
            seg.op("hidden.autocast", [], n * h, ctx.compute_dtype, requires_grad=False),
            seg.op("lm_head.weight_cast", [], h * v, ctx.compute_dtype, requires_grad=False),
        ]
    e_dtype = ctx.compute_dtype if ctx.amp else x.dtype
    lse = seg.op("lse", [], counted, DType.FP32, requires_grad=False)
    logit_avg = seg.op("logit_avg", [], v, DType.FP32, requires_grad=False)
    neg_dot = seg.op("neg_dot", [lse], counted, DType.FP32, requires_grad=False)
    saved += [lse, logit_avg]
    grad = ctx.param_grad("lm_head.weight", h * v, trainable=trainable)
    # Backward: the vocabulary order (argsort: int64, then int32); dc in the weight's autocast
    # dtype, cast to the parameter's; de likewise (the cast's copy is the input's gradient).
    bwd = v * 8 + v * 4
    if trainable and ctx.amp:
        bwd += h * v * dtype_bytes(e_dtype)
    if x.requires_grad and ctx.amp:
        bwd += n * h * dtype_bytes(e_dtype)
    loss = seg.op(
        "linear_cross_entropy",
        [x, neg_dot, *saved[1:]],
        1,
        DType.FP32,
        saves=saved,
        param_grads=[grad],
        requires_grad=x.requires_grad or trainable,
        bwd_workspace_bytes=bwd,
    )
    seg.hold(x, label="loss.locals")
    return loss, loss


BUILDERS = {
    LossKind.CHUNKED: chunked_cross_entropy,
    LossKind.FUSED_LINEAR: fused_linear_cross_entropy,
    LossKind.CUT: cut_cross_entropy,
}

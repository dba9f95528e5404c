"""The ends of a model: token embeddings, the output head and its loss (shared builders).

Families compose these in their ``embedding`` and ``head``: what is specific to one family
(BERT's token types and MLM transform, T5's output scaling, Gemma2's logit soft-capping) lives
in its module.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.analytic.blocks import LinearSpec, cast, linear
from memplan.analytic.context import StepContext
from memplan.analytic.graph import ParamGrad, Segment, Tensor
from memplan.dtypes import DType
from memplan.specs.model import ModelSpec
from memplan.specs.training import LossKind
from memplan.trace import Category


def table_grad(
    ctx: StepContext,
    label: str,
    numel: int,
    *,
    trainable: bool,
    tie: str = "",
    vocab_parallel: bool = False,
) -> ParamGrad:
    """The gradient of an embedding table.

    embedding_dense_backward writes a dense gradient of the whole table: this rank's
    vocabulary shard under tensor parallelism, reduce-scattered like any other parameter's
    gradient under ZeRO-2/3 and FSDP.
    """
    if vocab_parallel:
        numel = -(-numel // ctx.tensor_parallel_degree)
    return ctx.param_grad(label, numel, trainable=trainable, tie=tie)


def token_embedding(
    spec: ModelSpec,
    ctx: StepContext,
    seg: Segment,
    *,
    output_requires_grad: bool,
    tie: str | None = None,
    buffered_in: Category | None = None,
) -> Tensor:
    """The token lookup (``inputs_embeds``), in the weight dtype (embeddings are not autocast).

    One AccumulateGrad serves every use of a shared table: a tied LM head computes its
    gradient first (``tie="last"`` here: the lookup's gradient is added to it), and its
    contribution waits in the loss's category (``buffered_in``: where it waits when this
    lookup's gradient arrives). ``inputs_embeds`` is a local of the model's forward: it stays
    allocated until the forward returns.
    """
    trainable = ctx.trains_embedding
    n, h = ctx.input_tokens, spec.hidden_size
    if tie is None:
        tie = "last" if spec.tie_word_embeddings else ""
    buffered = buffered_in or (
        Category.LOGITS if spec.tie_word_embeddings else Category.TEMPORARIES
    )
    grad = table_grad(
        ctx,
        "embed_tokens.weight",
        spec.vocab_size * h,
        trainable=trainable,
        tie=tie,
        vocab_parallel=True,
    )
    grad = replace(grad, buffered_in=buffered)
    x = seg.op(
        "embed_tokens",
        [],
        n * h,
        ctx.weight_dtype,
        param_grads=[grad],
        requires_grad=output_requires_grad or trainable,
    )
    seg.model_locals.append(x)
    return x


def learned_positions(
    ctx: StepContext, seg: Segment, x: Tensor, *, rows: int, table_rows: int, hidden: int
) -> Tensor:
    """``x`` plus a learned position lookup of ``rows`` x hidden (a local of the forward).

    The table's gradient is as large as the table (``table_rows`` x hidden).
    """
    grad = table_grad(ctx, "wpe.weight", table_rows * hidden, trainable=ctx.trains_embedding)
    pos = seg.op(
        "embed_positions",
        [],
        rows * hidden,
        ctx.weight_dtype,
        param_grads=[grad],
        requires_grad=ctx.trains_embedding,
    )
    seg.model_locals.append(pos)
    return seg.op("add_positions", [x, pos], x.numel, x.dtype, passthrough_grad=True)


def lm_head(
    spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, bias: bool = False
) -> Tensor:
    """The LM head's logits (kept 16-bit under quantization; tied to the embedding or not)."""
    head = LinearSpec(
        "lm_head",
        spec.hidden_size,
        spec.vocab_size // ctx.tensor_parallel_degree,
        None,
        bias=bias,
        quantizable=False,
        trainable=ctx.trains_embedding,
        tied=spec.tie_word_embeddings,
    )
    return linear(seg, ctx, x, head)


def cross_entropy(
    ctx: StepContext, seg: Segment, logits: Tensor, x: Tensor, *, shifted_fp32: bool
) -> Tensor:
    """The loss of ``logits``; ``x`` (the head's input) stays referenced until it returns.

    ``shifted_fp32``: transformers' ForCausalLMLoss, which casts the logits to fp32, pads the
    labels by one and shifts them (int64), then log_softmax (saved) and nll_loss. Otherwise
    CrossEntropyLoss with unshifted labels, on the logits in their own dtype, or in fp32 under
    autocast (CPU casts cross_entropy_loss's input, CUDA runs log_softmax in fp32: on their
    fp32 lists).
    """
    n = ctx.num_tokens
    padded = None
    if shifted_fp32:
        loss_in = cast(seg, logits, DType.FP32, "logits.float")
        padded = seg.op(
            "labels.pad", [], ctx.batch * (ctx.seq_len + 1), DType.INT64, requires_grad=False
        )
        labels = seg.op("labels.shift", [padded], n, DType.INT64, requires_grad=False)
    else:
        loss_in = cast(seg, logits, DType.FP32, "logits.autocast") if ctx.amp else logits
        # labels.view(-1): a view of the batch's labels, allocated with the batch.
        labels = seg.input(n, DType.INT64, "labels", requires_grad=False, persistent=True)
        seg.batch_labels = labels
    logp = seg.op("log_softmax", [loss_in], loss_in.numel, loss_in.dtype, saves_output=True)
    # nll_loss returns the loss and the total weight (saved).
    weight = seg.op("nll_loss.total_weight", [], 1, DType.FP32, requires_grad=False)
    loss = seg.op("nll_loss", [logp, labels, weight], 1, DType.FP32, saves=[labels, weight])
    # The final hidden state stays referenced (the model's output object) until the forward
    # returns, and so do the padded labels (a local of the loss function).
    seg.hold(x, *([padded] if padded is not None else []), label="loss.locals")
    return loss


def causal_lm_loss(
    spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
) -> tuple[Tensor, Tensor]:
    """LM head and ForCausalLMLoss (logits upcast to fp32 unless the setup says otherwise),
    or a loss that never holds the whole logits (:mod:`memplan.analytic.losses`), or trl's
    fused log-prob head (:mod:`memplan.analytic.preference`)."""
    if ctx.fused_logprobs:
        from memplan.analytic.preference import fused_logprob_head

        return fused_logprob_head(spec, ctx, x, seg)
    if ctx.loss is not LossKind.FULL:
        from memplan.analytic.losses import BUILDERS

        return BUILDERS[ctx.loss](spec, ctx, x, seg)
    logits = lm_head(spec, ctx, x, seg)
    return cross_entropy(ctx, seg, logits, x, shifted_fp32=ctx.logits_fp32), logits


def loss_segment() -> Segment:
    return Segment("loss", saved_category=Category.LOGITS, temp_category=Category.LOGITS)

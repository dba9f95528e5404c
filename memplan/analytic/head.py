"""The ends of a model: embeddings, final norms, the output head and its loss, per family."""

from __future__ import annotations

from dataclasses import replace

from memplan.analytic.blocks import (
    LinearSpec,
    activation,
    cast,
    dropout,
    layer_norm,
    linear,
    residual_add,
    rms_norm,
)
from memplan.analytic.context import StepContext
from memplan.analytic.graph import ParamGrad, Segment, Tensor
from memplan.analytic.layers import LLAMA_FAMILIES
from memplan.dtypes import DType
from memplan.specs.model import ModelSpec
from memplan.trace import Category


def _table_grad(
    ctx: StepContext,
    label: str,
    numel: int,
    *,
    trainable: bool,
    tie: str = "",
    vocab_parallel: bool = False,
) -> ParamGrad:
    # embedding_dense_backward writes a dense gradient of the whole table: this rank's
    # vocabulary shard under tensor parallelism, reduce-scattered like any other parameter's
    # gradient under ZeRO-2/3 and FSDP.
    if vocab_parallel:
        numel = -(-numel // ctx.tensor_parallel_degree)
    return ctx.param_grad(label, numel, trainable=trainable, tie=tie)


def embedding(
    spec: ModelSpec, ctx: StepContext, *, output_requires_grad: bool, label: str = "embeddings"
) -> tuple[Segment, Tensor]:
    """Token (+ position / token-type) embeddings, as each family's model forward combines them.

    Lookups return the weight dtype (embeddings are not autocast). A tied LM head computed its
    gradient first, so the token table's gradient adds into that ``.grad``.
    """
    seg = Segment(label)
    trainable = ctx.trains_embedding()
    n, h = ctx.num_tokens, spec.hidden_size
    rg = output_requires_grad or trainable
    # One AccumulateGrad serves every use of a shared table: the LM head's contribution
    # arrives first (when tied), T5's decoder embedding in the middle, the encoder's last.
    if spec.is_encoder_decoder:
        tie = (
            ("middle" if spec.tie_word_embeddings else "first")
            if label.startswith("decoder")
            else "last"
        )
    else:
        tie = "last" if spec.tie_word_embeddings else ""
    # The first contribution waits in the loss's category (LM head) or, for an untied T5
    # head, in the decoder embedding's (temporaries).
    buffered = Category.LOGITS if spec.tie_word_embeddings else Category.TEMPORARIES
    grad = _table_grad(
        ctx,
        "embed_tokens.weight",
        spec.vocab_size * h,
        trainable=trainable,
        tie=tie,
        vocab_parallel=True,
    )
    grad = replace(grad, buffered_in=buffered)
    x = seg.op("embed_tokens", [], n * h, ctx.weight_dtype, param_grads=[grad], requires_grad=rg)
    # `inputs_embeds` (and GPT-2/OPT's `position_embeds`) are locals of the model's forward:
    # they stay allocated until it returns.
    seg.model_locals.append(x)
    if spec.family == "gemma2":  # inputs_embeds * sqrt(hidden_size)
        x = seg.op("embed_scale", [x], x.numel, x.dtype)
    if spec.position_embedding == "learned" and spec.family != "bert":
        # GPT-2 looks positions up for (1, seq); OPT derives them per sequence (batch, seq).
        rows = ctx.seq_len if spec.family == "gpt2" else n
        # The gradient is as large as the table: OPT's has position_offset (2) extra rows.
        offset = int(spec.layout.get("position_offset", 2)) if spec.family == "opt" else 0
        pos_grad = _table_grad(
            ctx, "wpe.weight", (spec.max_position_embeddings + offset) * h, trainable=trainable
        )
        pos = seg.op(
            "embed_positions",
            [],
            rows * h,
            ctx.weight_dtype,
            param_grads=[pos_grad],
            requires_grad=trainable,
        )
        seg.model_locals.append(pos)
        x = seg.op("add_positions", [x, pos], n * h, x.dtype, passthrough_grad=True)
    if spec.family == "bert":
        type_rows = int(spec.layout.get("type_vocab_size", 2))
        types = seg.op(
            "token_type_embeddings",
            [],
            n * h,
            ctx.weight_dtype,
            param_grads=[_table_grad(ctx, "token_type", type_rows * h, trainable=trainable)],
            requires_grad=trainable,
        )
        x = residual_add(seg, x, types, "add_token_types")
        pos = seg.op(
            "position_embeddings",
            [],
            ctx.seq_len * h,
            ctx.weight_dtype,
            param_grads=[
                _table_grad(ctx, "position", spec.max_position_embeddings * h, trainable=trainable)
            ],
            requires_grad=trainable,
        )
        x = residual_add(seg, x, pos, "add_positions")
        x = layer_norm(seg, ctx, x, "LayerNorm", h)
        seg.model_locals.clear()  # BertEmbeddings' locals end with it
    if spec.family == "bloom":
        x = layer_norm(seg, ctx, x, "word_embeddings_layernorm", h)
    x = dropout(
        seg,
        ctx,
        x,
        spec.hidden_dropout if spec.family in ("gpt2", "opt", "bert", "t5") else 0.0,
        "embed_dropout",
    )
    if spec.family == "bert":
        seg.model_locals.append(x)  # BertModel's `embedding_output`
    return seg, x


def final_norm(spec: ModelSpec, ctx: StepContext, x: Tensor, *, seg: Segment) -> Tensor | None:
    """The norm after the last layer (None for post-norm BERT)."""
    h = spec.hidden_size
    if spec.family in LLAMA_FAMILIES:
        return rms_norm(seg, ctx, x, "norm", h, gemma=spec.family == "gemma2")
    if spec.family == "t5":
        return dropout(
            seg,
            ctx,
            rms_norm(seg, ctx, x, "final_layer_norm", h),
            spec.hidden_dropout,
            "final_dropout",
        )
    if spec.family == "opt" and not spec.layout.get("final_layer_norm", True):
        return None
    if spec.family == "bert":
        return None
    return layer_norm(seg, ctx, x, "ln_f", h)


def lm_loss(spec: ModelSpec, ctx: StepContext, x: Tensor, *, seg: Segment) -> tuple[Tensor, Tensor]:
    """Output head and loss; returns the loss and the logits the model output object holds.

    Causal LMs use transformers' ForCausalLMLoss: logits.float(), shifted int64 labels,
    log_softmax (saved), nll_loss. T5 and BERT's MLM head apply CrossEntropyLoss to the
    logits in their own dtype.
    """
    n, vocab = ctx.num_tokens, spec.vocab_size // ctx.tensor_parallel_degree
    if spec.family == "bert" and "Classification" in str(spec.layout.get("architecture", "")):
        return _classification_loss(spec, ctx, x, seg=seg)
    head_in = x
    if spec.family == "t5" and spec.layout.get("scale_decoder_outputs"):
        head_in = seg.op("scale_decoder_outputs", [x], x.numel, x.dtype)  # * d_model**-0.5
    if spec.family == "bert":  # BertLMPredictionHead: dense, gelu, LayerNorm, decoder
        t = linear(
            seg,
            ctx,
            head_in,
            LinearSpec(
                "cls.predictions.transform.dense",
                spec.hidden_size,
                spec.hidden_size,
                None,
                bias=True,
                quantizable=False,
            ),
        )
        t = activation(seg, t, spec.hidden_act, "cls.predictions.transform.act")
        head_in = layer_norm(seg, ctx, t, "cls.predictions.transform.LayerNorm", spec.hidden_size)
    head = LinearSpec(
        "lm_head",
        spec.hidden_size,
        vocab,
        None,
        bias=spec.family == "bert",
        quantizable=False,
        trainable=ctx.trains_embedding(),
        tied=spec.tie_word_embeddings,
    )
    logits = linear(seg, ctx, head_in, head)
    if spec.layout.get("final_logit_softcapping"):  # Gemma2: tanh(logits / cap) * cap
        scaled = seg.op("logits.softcap_div", [logits], logits.numel, logits.dtype)
        th = seg.op("logits.softcap_tanh", [scaled], logits.numel, logits.dtype, saves_output=True)
        logits = seg.op("logits.softcap_mul", [th], logits.numel, logits.dtype)
    padded = None
    if spec.family in ("t5", "bert") or not ctx.logits_fp32:
        loss_in = logits
        labels = seg.op("labels", [], n, DType.INT64, requires_grad=False)
    else:
        loss_in = cast(seg, logits, DType.FP32, "logits.float")
        padded = seg.op(
            "labels.pad", [], ctx.batch * (ctx.seq_len + 1), DType.INT64, requires_grad=False
        )
        labels = seg.op("labels.shift", [padded], n, DType.INT64, requires_grad=False)
    logp = seg.op("log_softmax", [loss_in], loss_in.numel, loss_in.dtype, saves_output=True)
    # nll_loss returns the loss and the total weight (saved); the padded labels stay referenced
    # by the loss function's local variable until it returns.
    weight = seg.op("nll_loss.total_weight", [], 1, DType.FP32, requires_grad=False)
    loss = seg.op("nll_loss", [logp, labels, weight], 1, DType.FP32, saves=[labels, weight])
    # The final hidden state stays referenced (the model's output object) until the forward
    # returns, and so do the padded labels (a local of the loss function).
    seg.hold(x, *([padded] if padded is not None else []), label="loss.locals")
    return loss, logits


def _classification_loss(
    spec: ModelSpec, ctx: StepContext, x: Tensor, *, seg: Segment
) -> tuple[Tensor, Tensor]:
    """BertForSequenceClassification: pooler (dense + tanh on [CLS]), dropout, classifier."""
    h, b = spec.hidden_size, ctx.batch
    labels = int(spec.layout.get("num_labels", 2))
    cls = seg.op("pooler.first_token", [x], b * h, x.dtype, passthrough_grad=False)
    pooled = linear(
        seg,
        ctx,
        cls,
        LinearSpec(
            "pooler.dense",
            h,
            h,
            None,
            bias=True,
            quantizable=False,
            trainable=ctx.trains_embedding(),
        ),
    )
    pooled = seg.op("pooler.tanh", [pooled], pooled.numel, pooled.dtype, saves_output=True)
    pooled = dropout(seg, ctx, pooled, spec.hidden_dropout, "dropout")
    logits = linear(
        seg,
        ctx,
        pooled,
        LinearSpec("classifier", h, labels, None, bias=True, quantizable=False, trainable=True),
    )
    logp = seg.op("log_softmax", [logits], logits.numel, logits.dtype, saves_output=True)
    return seg.op("nll_loss", [logp], 1, DType.FP32), logits


def loss_segment() -> Segment:
    return Segment("loss", saved_category=Category.LOGITS, temp_category=Category.LOGITS)

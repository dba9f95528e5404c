"""trl's DPO step on the analytical model: its fused log-prob head and the reference forward.

The head is ``add_fused_lm_head``'s forward on CUDA (trl/trainer/utils.py) and
``ChunkedLogProbFunction`` (trl/kernels/chunked_logprob.py); the words are in
:mod:`memplan.preference`. Per call:

- the counted positions: ``mask = labels[:, 1:] != -100`` (bool), then
  ``hidden_states[:, :-1][mask]`` (an int64 ``nonzero`` inside the index; IndexBackward saves
  the mask) and ``labels[mask]``;
- forward: seven fp32 per-token statistics, one ``(min(N, 4096), 32768)`` tile buffer in the
  compute dtype, the hidden states' token chunk and the head's vocabulary chunk cast to the
  compute dtype when they are stored in another; log-sum-exp, log-probabilities, entropy,
  mean logit and top-1 per token; it saves the selected hidden states, the targets, the
  log-sum-exp and the entropy;
- each per-token output scattered back to ``(rows, seq - 1)`` (``new_zeros().masked_scatter``:
  MaskedScatterBackward saves the mask);
- backward: fp32 zeros for the hidden states' and (a trainable head) the weight's gradient, the
  tile buffer again, the same chunk casts; the fp32 sums are cast back to the inputs' dtypes.

The Triton folds and CUDA's fp32-output ``addmm`` allocate nothing. The sigmoid loss works on
per-sequence sums (a few bytes); the metrics' per-token products are not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Final

from memplan.analytic.context import StepContext
from memplan.analytic.graph import Segment, Tensor
from memplan.analytic.losses import _head_spec
from memplan.analytic.model_graph import ModelGraph, build_model_graph
from memplan.analytic.step import StepComposer
from memplan.analytic.weights import ModelState, model_state
from memplan.architecture import architecture
from memplan.dtypes import DType, dtype_bytes
from memplan.loop import TrainingLoop
from memplan.preference import TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE, num_counted_tokens
from memplan.specs.model import ModelSpec
from memplan.specs.training import Objective, RefModel, TrainingSetup
from memplan.trace import Category, Event, Phase, Repeat, TraceItem, allocation_bytes

_ACT: Final = Category.ACTIVATIONS
_TMP: Final = Category.TEMPORARIES

_STATISTICS = (
    "running_max",
    "sum_exp",
    "x_sum_exp",
    "sq_sum_exp",
    "z_sum",
    "max_before_target",
    "target_logit",
)


def _chunk_cast_bytes(rows: int, width: int, stored: DType, compute: DType) -> int:
    """``tensor[a:b].to(compute)``: a copy of ``rows`` x ``width`` when the dtypes differ."""
    return 0 if stored is compute else rows * width * dtype_bytes(compute)


def fused_logprob_head(
    spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
) -> tuple[Tensor, Tensor]:
    """``model(..., labels=labels, fused_lm_head=True)`` then DPO's per-sequence sums:
    (the step's loss, the per-token log-probabilities)."""
    head = _head_spec(spec, ctx)
    h, v = spec.hidden_size, head.out_features
    rows = ctx.batch * (ctx.seq_len - 1)
    n = num_counted_tokens(ctx.batch, ctx.seq_len)
    # ChunkedLogProbFunction: the autocast dtype under autocast, else the hidden states'.
    compute = ctx.compute_dtype if ctx.amp else x.dtype
    # last_hidden_state[:, :-1]: a view; SliceBackward zero-fills a gradient of the whole.
    shifted = seg.op("hidden.shift", [x], rows * h, x.dtype, view_of=x)
    labels = seg.input(
        ctx.batch * ctx.seq_len, DType.INT64, "labels", requires_grad=False, persistent=True
    )
    mask = seg.op("labels.ne", [labels], rows, DType.BOOL, requires_grad=False)
    # hidden_states[mask]: index expands the bool mask with nonzero (n x 2 int64); its
    # backward (index_put_ with accumulate) expands it again.
    where = seg.op("mask.nonzero", [mask], n * 2, DType.INT64, requires_grad=False)
    selected = seg.op(
        "hidden[mask]",
        [shifted, where],
        n * h,
        x.dtype,
        saves=[mask],
        bwd_workspace_bytes=n * 2 * 8,
    )
    where = seg.op("mask.nonzero", [mask], n * 2, DType.INT64, requires_grad=False)
    targets = seg.op("labels[mask]", [labels, where], n, DType.INT64, requires_grad=False)
    stats = [seg.op(s, [], n, DType.FP32, requires_grad=False) for s in _STATISTICS]
    tile_rows = min(n, TOKEN_CHUNK_SIZE)
    mm_buf = seg.op("mm_buf", [], tile_rows * VOCAB_CHUNK_SIZE, compute, requires_grad=False)
    hidden_chunk = _chunk_cast_bytes(tile_rows, h, x.dtype, compute)
    head_dtype = ctx.weight_dtype
    weight_chunk = _chunk_cast_bytes(min(v, VOCAB_CHUNK_SIZE), h, head_dtype, compute)
    more_tokens, more_vocab = n > TOKEN_CHUNK_SIZE, v > VOCAB_CHUNK_SIZE
    # Forward: ``hidden_chunk`` rebinds (two at the turn), the weight chunk dies after its mm.
    fwd_tiles = max(hidden_chunk + weight_chunk, 2 * hidden_chunk if more_tokens else 0)
    seg.op(
        "tiles",
        [mm_buf, *stats],
        0,
        DType.UINT8,
        requires_grad=False,
        fwd_workspace_bytes=fwd_tiles,
    )
    log_sum = seg.op("log(sum_exp)", [stats[1]], n, DType.FP32, requires_grad=False)
    log_z = seg.op("log_z", [stats[0], log_sum], n, DType.FP32, requires_grad=False)
    # Backward: fp32 accumulators (the returned gradient itself when its dtype is fp32), the
    # tile buffer, and both chunk casts bound at once (either rebinding adds one more).
    trainable = bool(head.trainable)
    grad = ctx.param_grad("lm_head.weight", h * v, trainable=trainable)
    if grad.grad_bytes and head.tied:
        grad = replace(grad, tie="first")
    bwd = tile_rows * VOCAB_CHUNK_SIZE * dtype_bytes(compute)
    bwd += hidden_chunk + weight_chunk
    bwd += max(hidden_chunk if more_tokens else 0, weight_chunk if more_vocab else 0)
    if selected.requires_grad and x.dtype is not DType.FP32:
        bwd += n * h * 4
    if grad.grad_bytes and head_dtype is not DType.FP32:
        bwd += h * v * 4
    logprobs = seg.op(
        "log_probs",
        [selected, targets, stats[6], log_z],
        n,
        DType.FP32,
        requires_grad=selected.requires_grad or bool(grad.grad_bytes),
        saves=[selected, targets, log_z],
        param_grads=[grad],
        bwd_workspace_bytes=bwd,
    )
    ratio = seg.op("x_sum_exp/sum_exp", [stats[2], stats[1]], n, DType.FP32, requires_grad=False)
    entropy = seg.op("entropy", [log_z, ratio], n, DType.FP32, requires_grad=False)
    if logprobs.requires_grad:  # saved by the Function with the others
        function = next(op for op in seg.ops if op.output is logprobs)
        function.saved += (entropy,)
    mean = seg.op("mean_logits", [stats[4]], n, DType.FP32, requires_grad=False)
    above = seg.op("target>=max", [stats[6], stats[0]], n, DType.BOOL, requires_grad=False)
    first = seg.op("target>max_before", [stats[6], stats[5]], n, DType.BOOL, requires_grad=False)
    top1 = seg.op("is_top1", [above, first], n, DType.BOOL, requires_grad=False)
    # The statistics and the tile buffer are locals of the Function's forward.
    seg.hold(mm_buf, *stats, label="chunked_logprob.locals")
    outputs = []
    for name, per_token in (
        ("log_probs", logprobs),
        ("entropy", entropy),
        ("mean_logits", mean),
        ("is_top1", top1),
    ):
        zeros = seg.op(f"{name}.new_zeros", [], rows, per_token.dtype, requires_grad=False)
        outputs.append(
            seg.op(
                f"{name}.masked_scatter",
                [zeros, mask, per_token],
                rows,
                per_token.dtype,
                saves=[mask],
            )
        )
    # DPO: per_token_logps.sum(dim=1) per sequence, then the sigmoid loss on the pairs.
    logps = seg.op("logps", [outputs[0]], ctx.batch, DType.FP32)
    loss = seg.op("dpo_loss", [logps], 1, DType.FP32)
    # FusedCausalLMOutput keeps every per-token field and the mask until the loss returns.
    seg.hold(*outputs, mask, x, label="outputs")
    return loss, outputs[0]


@dataclass
class Reference:
    """DPO's step around the policy's: the batch trl's collator makes, the labels, and the
    reference model's weights and forward (:mod:`memplan.preference`)."""

    ctx: StepContext
    dpo: bool = False
    graph: ModelGraph | None = None  # the reference forward (None: none runs in the step)
    weights: ModelState | None = None  # a reference copy's own weights

    @classmethod
    def of(
        cls, spec: ModelSpec, setup: TrainingSetup, ctx: StepContext, *, symbolic: bool = False
    ) -> Reference:
        if setup.objective is not Objective.DPO:
            return cls(ctx)
        kind = setup.reference
        if kind is None:
            return cls(ctx, dpo=True)
        # A copy's parameters require grad (create_model_from_path; trl never freezes them):
        # under AMP autocast caches their casts, as it does a trainable model's. The policy
        # with its adapters disabled runs its frozen base layers only.
        method = "full" if kind is RefModel.COPY else "frozen"
        ref_setup = setup.model_copy(update={"method": method, "grad_ckpt": False})
        ref_ctx = StepContext.build(spec, ref_setup)
        if symbolic:
            ref_ctx = dataclasses.replace(ref_ctx, batch=ctx.batch, seq_len=ctx.seq_len)
        graph = build_model_graph(
            spec, ref_ctx, grad_ckpt=False, ckpt_every=1, autograd=False, input_grads_hook=False
        )
        weights = None
        if kind is RefModel.COPY:
            weights = model_state(architecture(spec), ref_setup, ref_ctx)
        return cls(ctx, dpo=True, graph=graph, weights=weights)

    def load_items(self) -> list[TraceItem]:
        """The reference copy's weights: frozen (no gradient, no optimizer state)."""
        if self.weights is None:
            return []
        items: list[TraceItem] = []
        for g in self.weights.groups:
            size = allocation_bytes(g.nbytes)
            if size:
                label = f"reference {g.label}"
                event = Event(size, Category.FROZEN_WEIGHTS, Phase.LOAD, 0, label)
                items.append(event if g.count == 1 else Repeat((event,), g.count, label))
        return items

    def micro_batch(
        self, composer: StepComposer, loop: TrainingLoop, *, accumulate: bool
    ) -> list[TraceItem]:
        """DataCollatorForPreference's batch (input_ids, attention_mask, completion_mask:
        int64), ``labels = input_ids.masked_fill(completion_mask == 0, -100)``, the policy's
        forward and fused head, the reference's forward and fused head under no_grad, the
        sigmoid loss; ``_compute_loss`` returns (its labels die), then backward."""
        ctx = self.ctx
        ids_bytes = allocation_bytes(ctx.input_tokens * 8)
        ids_category = _ACT if loop.trains and ctx.trains_embedding else _TMP
        fwd = Phase.FORWARD
        batch = [("attention_mask", _TMP), ("completion_mask", _TMP)]
        items: list[TraceItem] = [Event(ids_bytes, ids_category, fwd, 0, "input_ids")]
        items += [Event(ids_bytes, cat, fwd, 0, label) for label, cat in batch]
        is_prompt = allocation_bytes(ctx.input_tokens)  # completion_mask == 0 (bool)
        items += [
            Event(is_prompt, _TMP, fwd, 0, "completion_mask == 0"),
            Event(ids_bytes, _TMP, fwd, 0, "labels"),
            Event(-is_prompt, _TMP, fwd, 0, "completion_mask == 0"),
        ]
        forward, deferred = composer.forward_items(0)
        items += forward
        items += composer.loss_items(0, deferred)
        if self.graph is not None:
            reference = StepComposer(self.graph)
            forward, deferred = reference.forward_items(0)
            items += forward
            items += reference.loss_items(0, deferred)
        items.append(Event(-ids_bytes, _TMP, Phase.LOSS, 0, "labels"))
        end = Phase.LOSS
        if loop.trains:
            items += composer.backward_items(0, accumulate=accumulate)
            end = Phase.BACKWARD
        items += [Event(-ids_bytes, cat, end, 0, label) for label, cat in reversed(batch)]
        items.append(Event(-ids_bytes, ids_category, end, 0, "input_ids"))
        return items

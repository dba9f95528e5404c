"""The analytical prediction: a memory trace of training steps on one GPU, torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memplan.analytic.context import StepContext
from memplan.analytic.model_graph import build_model_graph
from memplan.analytic.optimizer import OptimizerBytes, optimizer_bytes
from memplan.analytic.preference import Reference
from memplan.analytic.sharding import (
    FSDP2Units,
    Sharded,
    effective_setup,
    fsdp_storage_dtype,
)
from memplan.analytic.step import StepComposer
from memplan.analytic.symbolic import BATCH, SEQ_LEN, Count
from memplan.analytic.weights import ModelState, model_state
from memplan.architecture import architecture, is_bias
from memplan.distributed import ShardPlan, shard_plan
from memplan.dtypes import DType
from memplan.errors import MemplanError
from memplan.families import families, family
from memplan.loop import STEPS, TrainingLoop
from memplan.preference import dpo_refusal
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import LossKind, Objective, TrainingSetup
from memplan.trace import Category, Event, Phase, Repeat, Trace, TraceItem, allocation_bytes


@dataclass
class Prediction:
    """The analytical trace of one GPU and the model-state facts behind it."""

    trace: Trace
    state: ModelState
    optimizer: OptimizerBytes
    shard: ShardPlan
    cpu_bytes: int  # host memory for offloaded state
    paged_bytes: int  # bnb paged optimizer state (unified memory, may be evicted to the host)
    master_bytes: int  # fp32 master weights on the GPU
    requested_amp: bool = False  # an AMP request a sharded run executes as 16-bit + masters


def _mirror_frees(
    items: list[TraceItem], category: Category, phase: Phase, step: int, label: str
) -> list[TraceItem]:
    """Frees of every allocation of ``category`` in ``items``, keeping their Repeat structure."""
    out: list[TraceItem] = []
    for item in items:
        if isinstance(item, Event):
            if item.category is category and item.delta_bytes > 0:
                out.append(Event(-item.delta_bytes, category, phase, step, label))
        else:
            inner = _mirror_frees(list(item.items), category, phase, step, label)
            if inner:
                out.append(Repeat(tuple(inner), item.times, label))
    return out


def _symbolic(ctx: StepContext, seq_len: Count, *, sequences: int = 1) -> StepContext:
    """``ctx`` with a symbolic micro-batch and the given (symbolic or fixed) length;
    ``sequences``: sequences per micro-batch element (DPO's chosen and rejected: 2)."""
    batch = BATCH * sequences if sequences > 1 else BATCH
    return dataclasses.replace(ctx, batch=batch, seq_len=seq_len + ctx.virtual_tokens)


def _decoder_context(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    shard: ShardPlan,
    storage_dtype: DType | None,
    *,
    symbolic: bool,
) -> StepContext:
    ctx = StepContext.build(
        spec,
        setup,
        seq_len=setup.decoder_seq_len,
        tensor_parallel_degree=parallel.tensor_parallel_degree,
        grad_divisor=shard.grad_divisor,
        grad_shard_dtype=storage_dtype,
    )
    if not symbolic:
        return ctx
    # Without a target length the decoder runs as many tokens as the encoder.
    return _symbolic(ctx, setup.target_seq_len or SEQ_LEN)


def check_applicable(spec: ModelSpec, setup: TrainingSetup) -> None:
    """Raise MemplanError when the method (or the family) cannot run this setup."""
    fam = family(spec.family)
    if fam.traced_only:
        raise MemplanError(
            f"{spec.name}: no model family describes {_model_type(spec)} (memplan models: "
            f"{', '.join(families())}); `memplan simulate` traces it with transformers"
        )
    reason = setup.tuning.unsupported(spec, setup) or fam.unsupported(spec, setup.method)
    if reason:
        raise MemplanError(reason)
    own_loss = fam.loss_refusal(spec)
    if setup.objective is Objective.DPO and (refusal := dpo_refusal(spec, own_loss)):
        raise MemplanError(refusal)
    if setup.loss is not LossKind.FULL and own_loss:
        raise MemplanError(
            f"loss={setup.loss.value} is modelled for causal LM heads; {spec.name} ({fam.name}) "
            f"has {own_loss}: use loss=full"
        )


def check_parallel(setup: TrainingSetup, parallel: ParallelSetup) -> None:
    """Raise MemplanError for setups memplan does not model on this parallel layout."""
    if setup.optimizer_in_backward and (
        parallel.num_gpus > 1 or parallel.zero_stage or parallel.fsdp_strategy is not None
    ):
        raise MemplanError(
            "optimizer_in_backward is modelled on one GPU (torchtune's single-device recipe); "
            "with data parallelism or ZeRO/FSDP sharding it is not"
        )
    if setup.objective is Objective.DPO and (
        parallel.zero_stage
        or parallel.fsdp_strategy is not None
        or parallel.tensor_parallel_degree > 1
    ):
        raise MemplanError(
            "objective=dpo is modelled on one GPU or data parallel replicas; with ZeRO, FSDP or "
            "tensor parallelism (trl shards the reference model too) it is not"
        )


def check_traceable(spec: ModelSpec, setup: TrainingSetup) -> None:
    """Raise MemplanError when the tracer cannot run this setup (a traced-only model runs the
    methods its family lists; any other model what the analytical model runs)."""
    fam = family(spec.family)
    if not fam.traced_only:
        check_applicable(spec, setup)
        return
    if setup.loss is not LossKind.FULL:
        raise MemplanError(f"{spec.name} is traced only: loss=full (its own loss)")
    from memplan.specs.training import ALL_LINEAR

    reason = fam.unsupported(spec, setup.method)
    if (
        reason is None
        and setup.lora_targets is not None
        and set(setup.lora_targets) < set(ALL_LINEAR)
    ):
        reason = (
            f"{spec.name} is traced only: LoRA targets all linear layers (all-linear) or "
            "peft's defaults for its type"
        )
    if reason:
        raise MemplanError(reason)


def _model_type(spec: ModelSpec) -> str:
    config = getattr(spec.layout, "config", {})
    return f"model_type {config.get('model_type')!r}"


def predict(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup | None = None,
    *,
    steps: int = STEPS,
    symbolic: bool = False,
) -> Prediction:
    """Trace ``steps`` optimizer steps of ``setup`` on one GPU of ``parallel`` analytically.

    ``symbolic``: sizes stay polynomials in the micro-batch and sequence length
    (:mod:`memplan.analytic.symbolic`), the setup's own values ignored (a fixed
    ``target_seq_len`` stays a number); raises NotSymbolicError where the model needs numbers.
    """
    parallel = parallel or ParallelSetup()
    check_applicable(spec, setup)
    check_parallel(setup, parallel)
    requested = setup
    setup = effective_setup(setup, parallel)
    storage_dtype = fsdp_storage_dtype(requested, parallel)
    shard = shard_plan(spec, setup, parallel)
    ctx = StepContext.build(
        spec,
        setup,
        tensor_parallel_degree=parallel.tensor_parallel_degree,
        grad_divisor=shard.grad_divisor,
        grad_shard_dtype=storage_dtype,
    )
    if symbolic:
        ctx = _symbolic(
            ctx, SEQ_LEN, sequences=setup.sequences_per_forward // setup.micro_batch_size
        )
    sharded = Sharded(shard, parallel, ctx)
    loop = TrainingLoop.of(setup)
    state = model_state(
        architecture(spec),
        setup,
        ctx,
        weight_divisor=shard.weight_divisor,
        storage_dtype=storage_dtype,
    )
    groups = sharded.optimizer_groups(state)
    opt = optimizer_bytes(groups, setup.optimizer, setup.optimizer_impl, device=setup.device)
    load, cpu_bytes = sharded.load_items(state, groups, opt, trains=loop.trains)
    reference = Reference.of(spec, setup, ctx, symbolic=symbolic)
    trace = Trace("analytical", [*load, *reference.load_items()])

    graph = build_model_graph(
        spec,
        _compute_context(ctx, shard, storage_dtype),
        grad_ckpt=setup.grad_ckpt,
        ckpt_every=setup.grad_ckpt_every,
        autograd=loop.trains,
        input_grads_hook=loop.input_embeddings_require_grad,
        decoder_ctx=_decoder_context(spec, setup, parallel, shard, storage_dtype, symbolic=symbolic)
        if spec.is_encoder_decoder
        else None,
    )
    units = fsdp2_units(spec, state, ctx)
    buffers = sharded.fsdp2_buffers(units)
    held = shard.keep_unsharded_until_backward
    composer = StepComposer(
        graph,
        gather_bytes=sharded.gather_bytes(state),
        prefetch_bytes=sharded.prefetch_bytes(state),
        tail_gather_bytes=buffers.tail_bytes,
        reduce_buffer_bytes=buffers.reduce_bytes,
        tail_reduce_bytes=buffers.tail_reduce_bytes,
        tail_gathered_from_start=units.tied,
        layer_gather_bytes=buffers.layer_gather_bytes,
        held_gathered=held,
        embed_gather_bytes=buffers.embed_bytes if held else 0,
        last_prefetch_bytes=0 if held else buffers.embed_bytes,
    )
    micro = [
        sharded.around_micro_batch(
            _micro_batch(composer, ctx, loop, accumulate=accumulate, reference=reference),
            trains=loop.trains,
        )
        for accumulate in loop.distinct_micro_batches
    ]
    # An optimizer stepping inside backward creates its state in the first step's backward.
    steady = (
        [_micro_batch(composer, ctx, loop, accumulate=False, first_step=False)]
        if setup.optimizer_in_backward
        else micro
    )
    for step in range(steps):
        items = _step_items(
            micro if step == 0 else steady,
            loop,
            opt,
            sharded,
            state,
            first=step == 0,
            in_backward=setup.optimizer_in_backward,
        )
        trace.add(Repeat(tuple(items), 1, f"step {step}", step=step))
    on_device = sharded.optimizer_on_device
    return Prediction(
        trace,
        state,
        opt,
        shard,
        cpu_bytes,
        opt.paged_bytes if on_device else 0,
        sharded.master_bytes(groups) if on_device else 0,
        requested_amp=requested.precision.is_amp and setup is not requested,
    )


def _compute_context(
    ctx: StepContext, shard: ShardPlan, storage_dtype: DType | None
) -> StepContext:
    """The step as it computes: under FSDP2 MixedPrecisionPolicy every parameter, adapters
    included, is all-gathered in the compute dtype (``param_dtype``), so peft casts nothing
    to the adapters' fp32 storage dtype (_fsdp_param.py ``all_gather_inputs``); each unit's
    gradients are reduce-scattered by its post-backward."""
    if not shard.fsdp2:
        return ctx
    ctx = dataclasses.replace(ctx, grads_reduced_per_unit=True)
    if storage_dtype is None:
        return ctx
    return dataclasses.replace(ctx, adapter_dtype=ctx.compute_dtype)


def fsdp2_units(spec: ModelSpec, state: ModelState, ctx: StepContext) -> FSDP2Units:
    """Parameters of accelerate's FSDP2 units: the tail (final norm and LM head; with tied
    embeddings, the final norm and the embedding), one decoder layer, and the trainable
    parameters of one decoder layer (what its reduce-scatter carries: adapters included)."""
    arch = architecture(spec)
    names = {b.name for b in arch.blocks}
    tied = "lm_head" not in names
    tail_blocks = ("final_norm", "embeddings") if tied else ("final_norm", "lm_head")
    tail = sum(t.numel for b in arch.blocks if b.name in tail_blocks for t in b.params)
    layer = sum(t.numel for b in arch.blocks if b.name == "decoder_layer" for t in b.params)
    embed = (
        0 if tied else sum(t.numel for b in arch.blocks if b.name == "embeddings" for t in b.params)
    )
    outside = sum(
        t.numel * b.repeat
        for b in arch.blocks
        if b.name != "decoder_layer"
        for t in b.params
        if ctx.method.trains(t.kind, bias=is_bias(t))
    )
    per_layer = (state.num_trainable_params - outside) // max(spec.num_decoder_layers, 1)
    tail_trainable = sum(
        t.numel
        for b in arch.blocks
        if b.name in tail_blocks
        for t in b.params
        if ctx.method.trains(t.kind, bias=is_bias(t))
    )
    return FSDP2Units(tail, layer, per_layer, embed, tied, tail_trainable)


def _micro_batch(
    composer: StepComposer,
    ctx: StepContext,
    loop: TrainingLoop,
    *,
    accumulate: bool,
    first_step: bool = True,
    reference: Reference | None = None,
) -> list[TraceItem]:
    """One micro-batch: token ids and labels, forward, loss, backward (the first creates
    .grad, later ones accumulate into it); every step reuses these events. ``reference``:
    DPO's labels and reference forward (:class:`memplan.analytic.preference.Reference`)."""
    if reference is not None and reference.dpo:
        return reference.micro_batch(composer, loop, accumulate=accumulate)
    # int64 input_ids (saved by a trainable embedding for its backward) and labels.
    ids_bytes = allocation_bytes(ctx.input_tokens * 8)
    ids_category = (
        Category.ACTIVATIONS if loop.trains and ctx.trains_embedding else Category.TEMPORARIES
    )
    # Labels the loss reads unshifted are saved by nll_loss for backward.
    saved_labels = loop.trains and composer.saves_batch_labels
    labels_category = Category.ACTIVATIONS if saved_labels else Category.TEMPORARIES
    items: list[TraceItem] = [
        Event(ids_bytes, ids_category, Phase.FORWARD, 0, "input_ids"),
        Event(ids_bytes, labels_category, Phase.FORWARD, 0, "labels"),
    ]
    fwd, deferred = composer.forward_items(0)
    items += fwd
    items += composer.loss_items(0, deferred)
    if loop.trains:
        items += composer.backward_items(0, accumulate=accumulate, first_step=first_step)
    end_phase = Phase.BACKWARD if loop.trains else Phase.LOSS
    items.append(Event(-ids_bytes, labels_category, end_phase, 0, "labels"))
    items.append(Event(-ids_bytes, ids_category, end_phase, 0, "input_ids"))
    return items


def _step_items(
    micro: list[list[TraceItem]],
    loop: TrainingLoop,
    opt: OptimizerBytes,
    sharded: Sharded,
    state: ModelState,
    *,
    first: bool,
    in_backward: bool = False,
) -> list[TraceItem]:
    """One optimizer step: its micro-batches, the optimizer (state created on the first
    step, the step's workspace) and zero_grad; ``in_backward``: the optimizer stepped each
    parameter inside backward and freed its gradient there (nothing is left to do)."""
    items = list(micro[0])
    held = sharded.accumulation_bytes(state)
    no_sync = "unsharded gradients (no_sync)"
    if held:
        items.append(Event(held, Category.GRADIENTS, Phase.BACKWARD, 0, no_sync))
    if loop.micro_batches > 1:
        items.append(Repeat(tuple(micro[1]), loop.micro_batches - 1, "micro-batches"))
    if held:
        items.append(Event(-held, Category.GRADIENTS, Phase.BACKWARD, 0, no_sync))
    if not loop.trains or in_backward:
        return items
    if sharded.optimizer_on_device:
        if first and opt.state_bytes:
            state_label = "optimizer state (created on first step)"
            items.append(
                Event(opt.state_bytes, Category.OPTIMIZER_STATE, Phase.OPTIMIZER, 0, state_label)
            )
        if temp := opt.step_temp_bytes:
            label = "optimizer step workspace"
            items.append(Event(temp, Category.TEMPORARIES, Phase.OPTIMIZER, 0, label))
            items.append(Event(-temp, Category.TEMPORARIES, Phase.OPTIMIZER, 0, label))
    zero_grad = "zero_grad(set_to_none=True)"
    return items + _mirror_frees(micro[0], Category.GRADIENTS, Phase.ZERO_GRAD, 0, zero_grad)

"""The analytical prediction: a memory trace of training steps on one GPU, torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memplan.analytic.context import StepContext
from memplan.analytic.model_graph import build_model_graph
from memplan.analytic.optimizer import OptimizerBytes, optimizer_bytes
from memplan.analytic.step import StepComposer
from memplan.analytic.symbolic import BATCH, SEQ_LEN, Count
from memplan.analytic.weights import ModelState, TensorGroup, model_state
from memplan.architecture import architecture
from memplan.distributed import ShardPlan, shard_plan
from memplan.dtypes import DType, dtype_bytes
from memplan.errors import MemplanError
from memplan.families import family
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import Precision, TrainingSetup
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


def _optimizer_groups(state: ModelState, shard: ShardPlan) -> list[TensorGroup]:
    """Trainable tensors as the optimizer sees them: its shard, in fp32 with master weights."""
    # ``state`` already holds this GPU's parameter shard under ZeRO-3 / FULL_SHARD
    # (weight_divisor), so only the remaining factor of the optimizer's sharding applies.
    divisor = shard.optimizer_divisor // shard.weight_divisor
    groups = []
    for g in state.trainable:
        dtype = DType.FP32 if shard.master_weights else g.dtype
        groups.append(TensorGroup(g.label, -(-g.numel // divisor), dtype, g.count, shape=g.shape))
    return groups


_HALF = {Precision.BF16_AMP: Precision.BF16, Precision.FP16_AMP: Precision.FP16}


def effective_setup(setup: TrainingSetup, parallel: ParallelSetup) -> TrainingSetup:
    """The regime a sharded run really uses for an AMP precision request.

    DeepSpeed's bf16/fp16 modes convert the model to 16-bit and step fp32 master weights;
    FSDP's MixedPrecision gathers 16-bit copies of fp32 shards. Neither runs torch.autocast
    over fp32 weights, so neither keeps per-op weight casts: both become 16-bit weights with
    fp32 master weights (for FSDP this counts the 16-bit copy as a shard, 2 bytes/param/N).
    """
    sharded = parallel.uses_deepspeed or (
        parallel.sharding.value == "fsdp" and parallel.zero_stage >= 2
    )
    if not (sharded and setup.precision in _HALF):
        return setup
    master = True if setup.master_weights is None else setup.master_weights
    return setup.model_copy(update={"precision": _HALF[setup.precision], "master_weights": master})


def _symbolic(ctx: StepContext, seq_len: Count) -> StepContext:
    """``ctx`` with a symbolic micro-batch and the given (symbolic or fixed) length."""
    return dataclasses.replace(ctx, batch=BATCH, seq_len=seq_len)


def _decoder_context(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    shard: ShardPlan,
    *,
    symbolic: bool,
) -> StepContext:
    ctx = StepContext.build(
        spec,
        setup,
        seq_len=setup.decoder_seq_len,
        tensor_parallel_degree=parallel.tensor_parallel_degree,
        grad_divisor=shard.grad_divisor,
    )
    if not symbolic:
        return ctx
    # Without a target length the decoder runs as many tokens as the encoder.
    return _symbolic(ctx, setup.target_seq_len or SEQ_LEN)


def check_applicable(spec: ModelSpec, setup: TrainingSetup) -> None:
    """Raise MemplanError when the method (or the family) cannot run this setup."""
    reason = setup.tuning.unsupported(spec, setup) or family(spec.family).unsupported(
        spec, setup.method
    )
    if reason:
        raise MemplanError(reason)


def predict(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup | None = None,
    *,
    steps: int = 2,
    symbolic: bool = False,
) -> Prediction:
    """Trace ``steps`` optimizer steps of ``setup`` on one GPU of ``parallel`` analytically.

    ``symbolic``: sizes stay polynomials in the micro-batch and sequence length
    (:mod:`memplan.analytic.symbolic`), the setup's own values ignored (a fixed
    ``target_seq_len`` stays a number); raises NotSymbolicError where the model needs numbers.
    """
    parallel = parallel or ParallelSetup()
    check_applicable(spec, setup)
    requested = setup
    setup = effective_setup(setup, parallel)
    shard = shard_plan(spec, setup, parallel)
    arch = architecture(spec)
    ctx = StepContext.build(
        spec,
        setup,
        tensor_parallel_degree=parallel.tensor_parallel_degree,
        grad_divisor=shard.grad_divisor,
    )
    if symbolic:
        ctx = _symbolic(ctx, SEQ_LEN)
    state = model_state(arch, setup, ctx, weight_divisor=shard.weight_divisor)
    trace = Trace("analytical")
    autograd = setup.trains_weights
    cpu_bytes = 0
    if shard.offload_params:  # parameters live in host memory and are gathered per layer
        cpu_bytes += sum(g.allocated_bytes for g in state.groups)
    else:
        trace.extend(state.load_items())

    opt_groups = _optimizer_groups(state, shard)
    master_bytes = sum(g.allocated_bytes for g in opt_groups) if shard.master_weights else 0
    opt = optimizer_bytes(opt_groups, setup.optimizer, setup.optimizer_impl, device=setup.device)
    if shard.offload_optimizer:  # ZeRO-Offload: fp32 master, states and gradients on the host
        cpu_bytes += master_bytes + opt.state_bytes + opt.paged_bytes
        cpu_bytes += sum(allocation_bytes(g.numel * 4) * g.count for g in opt_groups)
    elif master_bytes:
        trace.add(
            Event(master_bytes, Category.MASTER_WEIGHTS, Phase.LOAD, 0, "fp32 master weights")
        )
    if shard.reduce_bucket_elements and autograd:
        # DeepSpeed's flat gradient buffer, in the dtype gradients are reduced in.
        bucket = allocation_bytes(shard.reduce_bucket_elements * dtype_bytes(ctx.weight_dtype))
        trace.add(Event(bucket, Category.TEMPORARIES, Phase.LOAD, 0, "DeepSpeed reduce bucket"))

    graph = build_model_graph(
        spec,
        ctx,
        grad_ckpt=setup.grad_ckpt,
        ckpt_every=setup.grad_ckpt_every,
        autograd=autograd,
        # enable_input_require_grads: transformers turns it on with activation checkpointing.
        input_grads_hook=setup.grad_ckpt and autograd,
        decoder_ctx=_decoder_context(spec, setup, parallel, shard, symbolic=symbolic)
        if spec.is_encoder_decoder
        else None,
    )
    gather = shard.gather_layers * state.layer_params * dtype_bytes(ctx.compute_dtype)
    gather //= parallel.tensor_parallel_degree
    composer = StepComposer(graph, gather_bytes=gather)
    # int64 input_ids (saved by a trainable embedding for its backward) and labels.
    ids_bytes = allocation_bytes(ctx.num_tokens * 8)
    ids_category = (
        Category.ACTIVATIONS if autograd and ctx.trains_embedding else Category.TEMPORARIES
    )
    # One micro-batch's events (the first one creates .grad, later ones accumulate into it);
    # every step reuses them, marked with its step number.
    micro: list[list[TraceItem]] = []
    for accumulate in (False, True)[: min(setup.grad_accum_steps, 2)]:
        items: list[TraceItem] = [
            Event(ids_bytes, ids_category, Phase.FORWARD, 0, "input_ids"),
            Event(ids_bytes, Category.TEMPORARIES, Phase.FORWARD, 0, "labels"),
        ]
        fwd, deferred = composer.forward_items(0)
        items += fwd
        items += composer.loss_items(0, deferred)
        if autograd:
            items += composer.backward_items(0, accumulate=accumulate)
        end_phase = Phase.BACKWARD if autograd else Phase.LOSS
        items.append(Event(-ids_bytes, Category.TEMPORARIES, end_phase, 0, "labels"))
        items.append(Event(-ids_bytes, ids_category, end_phase, 0, "input_ids"))
        micro.append(items)
    resident = allocation_bytes(
        shard.resident_gathered_params
        * dtype_bytes(ctx.compute_dtype)
        // parallel.tensor_parallel_degree
    )
    if resident:  # DeepSpeed ZeRO-3 keeps up to max_live_parameters gathered around the turn
        end = Phase.BACKWARD if autograd else Phase.LOSS
        live = "ZeRO-3 live gathered parameters"
        micro = [
            [
                Event(resident, Category.TEMPORARIES, Phase.FORWARD, 0, live),
                *items,
                Event(-resident, Category.TEMPORARIES, end, 0, live),
            ]
            for items in micro
        ]
    zero_grad = _mirror_frees(
        micro[0], Category.GRADIENTS, Phase.ZERO_GRAD, 0, "zero_grad(set_to_none=True)"
    )
    # FSDP no_sync(): the non-final micro-batches accumulate unsharded gradients of every unit.
    held = state.num_params * dtype_bytes(ctx.weight_dtype) // parallel.tensor_parallel_degree
    held = allocation_bytes(held) if shard.unsharded_accumulation else 0
    on_gpu_state = 0 if shard.offload_optimizer else opt.state_bytes
    for step in range(steps):
        items = list(micro[0])
        if held:
            items.append(
                Event(held, Category.GRADIENTS, Phase.BACKWARD, 0, "unsharded gradients (no_sync)")
            )
        if setup.grad_accum_steps > 1:
            items.append(Repeat(tuple(micro[1]), setup.grad_accum_steps - 1, "micro-batches"))
        if held:
            items.append(
                Event(-held, Category.GRADIENTS, Phase.BACKWARD, 0, "unsharded gradients (no_sync)")
            )
        if autograd:
            if step == 0 and on_gpu_state:
                items.append(
                    Event(
                        on_gpu_state,
                        Category.OPTIMIZER_STATE,
                        Phase.OPTIMIZER,
                        0,
                        "optimizer state (created on first step)",
                    )
                )
            if opt.step_temp_bytes and not shard.offload_optimizer:
                items.append(
                    Event(
                        opt.step_temp_bytes,
                        Category.TEMPORARIES,
                        Phase.OPTIMIZER,
                        0,
                        "optimizer step workspace",
                    )
                )
                items.append(
                    Event(
                        -opt.step_temp_bytes,
                        Category.TEMPORARIES,
                        Phase.OPTIMIZER,
                        0,
                        "optimizer step workspace",
                    )
                )
            items += zero_grad
        trace.add(Repeat(tuple(items), 1, f"step {step}", step=step))
    paged = 0 if shard.offload_optimizer else opt.paged_bytes
    return Prediction(
        trace,
        state,
        opt,
        shard,
        cpu_bytes,
        paged,
        0 if shard.offload_optimizer else master_bytes,
        requested_amp=requested.precision.is_amp and setup is not requested,
    )

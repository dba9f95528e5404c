"""Sharding as a transform of one GPU's step: what ZeRO, FSDP, offload and TP change.

The single-GPU step (:mod:`memplan.analytic.step`) knows nothing of data parallelism. This
module takes a :class:`memplan.distributed.ShardPlan` and turns it into trace items around that
step:

- at load: this rank's parameter shard (or nothing, when parameters are offloaded), the fp32
  master weights, DeepSpeed's flat gradient reduce bucket; host bytes for what is offloaded;
- around each micro-batch: DeepSpeed ZeRO-3's live gathered parameters;
- under gradient accumulation: FSDP ``no_sync()``'s unsharded gradients;
- the optimizer: on the device or not (ZeRO-Offload steps on the host).

Per-layer all-gather buffers are a size handed to the step composer (``gather_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from memplan.analytic.context import StepContext
from memplan.analytic.optimizer import OptimizerBytes
from memplan.analytic.weights import ModelState, TensorGroup
from memplan.distributed import ShardPlan
from memplan.dtypes import DType, dtype_bytes
from memplan.specs.parallel import ParallelSetup, Sharding
from memplan.specs.training import Precision, TrainingSetup
from memplan.trace import Category, Event, Phase, TraceItem, allocation_bytes

_HALF = {Precision.BF16_AMP: Precision.BF16, Precision.FP16_AMP: Precision.FP16}


def effective_setup(setup: TrainingSetup, parallel: ParallelSetup) -> TrainingSetup:
    """The regime a sharded run really uses for an AMP precision request.

    Neither DeepSpeed nor FSDP runs torch.autocast over fp32 weights, so neither keeps per-op
    weight casts: the step computes with 16-bit weights. DeepSpeed's bf16/fp16 modes convert
    the model to 16-bit and step fp32 master weights (16-bit weights + fp32 masters); FSDP's
    MixedPrecision keeps the loaded fp32 FlatParameter, which the optimizer steps directly (no
    master copy), and all-gathers 16-bit copies of it (:func:`fsdp_storage_dtype`).
    """
    fsdp = parallel.sharding is Sharding.FSDP
    if not ((parallel.uses_deepspeed or fsdp) and setup.precision in _HALF):
        return setup
    default_master = not fsdp  # FSDP: the fp32 FlatParameter is what the optimizer updates
    master = default_master if setup.master_weights is None else setup.master_weights
    return setup.model_copy(update={"precision": _HALF[setup.precision], "master_weights": master})


def fsdp_storage_dtype(requested: TrainingSetup, parallel: ParallelSetup) -> DType | None:
    """The dtype FSDP keeps parameters and gradient shards in when it is not the compute dtype.

    FSDP MixedPrecision(param_dtype=16-bit) over a model loaded in fp32 (an AMP request:
    accelerate's fsdp mixed_precision) keeps each FlatParameter and its gradient shard in fp32
    and casts to 16-bit only for the all-gather and the reduce-scatter
    (torch/distributed/fsdp/_flat_param.py, _runtime_utils.py _cast_grad_to_param_dtype).
    """
    if parallel.sharding is Sharding.FSDP and requested.precision in _HALF:
        return requested.precision.weight_dtype
    return None


class FSDP2Units(NamedTuple):
    """Parameter counts of the units accelerate's FSDP2 path makes (one rank, unsharded)."""

    tail_params: int  # final norm and LM head (with a tied embedding: final norm, embedding)
    layer_params: int  # one decoder layer
    layer_trainable_params: int  # one decoder layer's trainable parameters
    embed_params: int  # the input embedding's own unit (0 when tied into the tail)
    tied: bool  # the embedding is the LM head: it joins the tail unit
    tail_trainable_params: int = 0  # what the tail unit's reduce-scatter carries


class FSDP2Buffers(NamedTuple):
    """Bytes of FSDP2's communication buffers, in the compute dtype."""

    tail_bytes: int  # the tail unit's unsharded parameters
    reduce_bytes: int  # one layer's reduce-scatter input
    layer_gather_bytes: int  # one layer's flat all-gather output
    embed_bytes: int  # the input embedding's unit (untied)
    tail_reduce_bytes: int = 0  # the tail unit's reduce-scatter input


@dataclass(frozen=True)
class Sharded:
    """A ShardPlan applied to one rank's model state and step."""

    shard: ShardPlan
    parallel: ParallelSetup
    ctx: StepContext

    def optimizer_groups(self, state: ModelState) -> list[TensorGroup]:
        """Trainable tensors as the optimizer sees them: its shard, in fp32 with masters.

        A tensor that gets no gradient (a vision tower under text-only batches) has no state
        in torch.optim (state is made for parameters whose .grad is set); DeepSpeed's ZeRO
        optimizer flattens every parameter that requires grad into its fp32 partitions at
        initialization (stage_1_and_2.py, stage3.py), used or not.
        """
        # ``state`` already holds this GPU's parameter shard under ZeRO-3 / FULL_SHARD
        # (weight_divisor), so only the remaining factor of the optimizer's sharding applies.
        divisor = self.shard.optimizer_divisor // self.shard.weight_divisor
        dtype_of = (lambda _: DType.FP32) if self.shard.master_weights else (lambda g: g.dtype)
        every = self.parallel.uses_deepspeed
        return [
            TensorGroup(g.label, -(-g.numel // divisor), dtype_of(g), g.count, shape=g.shape)
            for g in state.trainable
            if g.gets_grad or every
        ]

    def master_bytes(self, groups: list[TensorGroup]) -> int:
        """fp32 master weights of the optimizer's shard (none without mixed-precision masters)."""
        return sum(g.allocated_bytes for g in groups) if self.shard.master_weights else 0

    def load_items(
        self, state: ModelState, groups: list[TensorGroup], opt: OptimizerBytes, *, trains: bool
    ) -> tuple[list[TraceItem], int]:
        """Allocations before the first step, and the host bytes of what is offloaded."""
        items: list[TraceItem] = []
        cpu_bytes = 0
        if self.shard.offload_params:  # parameters live in host memory, gathered per layer
            cpu_bytes += sum(g.allocated_bytes for g in state.groups)
        else:
            items += state.load_items()
        master = self.master_bytes(groups)
        if self.shard.offload_optimizer:  # ZeRO-Offload: fp32 master, states, grads on the host
            cpu_bytes += master + opt.state_bytes + opt.paged_bytes
            cpu_bytes += sum(allocation_bytes(g.numel * 4) * g.count for g in groups)
        elif master:
            items.append(
                Event(master, Category.MASTER_WEIGHTS, Phase.LOAD, 0, "fp32 master weights")
            )
        if self.shard.reduce_bucket_elements and trains:
            # DeepSpeed's flat gradient buffer, in the dtype gradients are reduced in.
            nbytes = self.shard.reduce_bucket_elements * dtype_bytes(self.ctx.weight_dtype)
            items.append(
                Event(
                    allocation_bytes(nbytes),
                    Category.TEMPORARIES,
                    Phase.LOAD,
                    0,
                    "DeepSpeed reduce bucket",
                )
            )
        return items, cpu_bytes

    def gather_bytes(self, state: ModelState) -> int:
        """ZeRO-3 / FULL_SHARD: each layer's parameters all-gathered (current + prefetched)."""
        gather = self.shard.gather_layers * state.layer_params * dtype_bytes(self.ctx.compute_dtype)
        return gather // self.parallel.tensor_parallel_degree

    def prefetch_bytes(self, state: ModelState) -> int:
        """The prefetched next layer's share of :meth:`gather_bytes`."""
        if self.shard.gather_layers < 2:
            return 0
        return self.gather_bytes(state) // self.shard.gather_layers

    def around_micro_batch(self, items: list[TraceItem], *, trains: bool) -> list[TraceItem]:
        """DeepSpeed ZeRO-3 keeps up to max_live_parameters gathered around the turn from
        forward to backward."""
        resident = allocation_bytes(
            self.shard.resident_gathered_params
            * dtype_bytes(self.ctx.compute_dtype)
            // self.parallel.tensor_parallel_degree
        )
        if not resident:
            return items
        end = Phase.BACKWARD if trains else Phase.LOSS
        live = "ZeRO-3 live gathered parameters"
        return [
            Event(resident, Category.TEMPORARIES, Phase.FORWARD, 0, live),
            *items,
            Event(-resident, Category.TEMPORARIES, end, 0, live),
        ]

    def accumulation_bytes(self, state: ModelState) -> int:
        """FSDP no_sync(): the non-final micro-batches accumulate unsharded gradients of every
        FlatParameter that requires grad (0 when no_sync does not run). A unit that mixes
        frozen and trainable parameters (``fsdp_mixed_units``, use_orig_params=True) has one
        gradient for its whole flat parameter, frozen part included; units of trainable
        modules alone (peft's fsdp_auto_wrap_policy) hold the trainable parameters' only."""
        if not self.shard.unsharded_accumulation:
            return 0
        numel = state.num_params if self.parallel.fsdp_mixed_units else state.num_trainable_params
        nbytes = numel * dtype_bytes(self.ctx.weight_dtype)
        return allocation_bytes(nbytes // self.parallel.tensor_parallel_degree)

    def fsdp2_buffers(self, units: FSDP2Units) -> FSDP2Buffers:
        """FSDP2 communication buffers beyond one layer's gather.

        tail: accelerate's last unit (final norm and LM head, ``reshard_after_forward=False``,
        accelerate/utils/fsdp_utils.py fsdp2_prepare_model) all-gathered at the end of the
        forward; its unsharded parameters live until its backward and its flat all-gather
        output until the next all-gather (``comm_ctx.all_gather_state``,
        _fsdp_param_group.py wait_for_unshard), both in the compute dtype.
        reduce: the reduce-scatter input of a layer's gradients (world size x padded shard, in
        the 16-bit reduce dtype), kept until the next unit's post-backward
        (``reduce_scatter_states``, ``reduce_scatter_max_input_buffers`` = 1); the tail
        unit's (its trainable parameters) is the first, kept through the last layer's
        backward.
        layer gather: one decoder layer's flat all-gather output (world size x padded shard).
        embed: the untied input embedding's unit, all-gathered for the forward and prefetched
        by the first layer's backward (``_backward_prefetch`` follows the forward order back
        to it, trainable or not).
        """
        if not self.shard.fsdp2:
            return FSDP2Buffers(0, 0, 0, 0, 0)
        itemsize = dtype_bytes(self.ctx.compute_dtype)
        return FSDP2Buffers(
            units.tail_params * itemsize,
            units.layer_trainable_params * itemsize,
            units.layer_params * itemsize,
            units.embed_params * itemsize,
            units.tail_trainable_params * itemsize,
        )

    @property
    def optimizer_on_device(self) -> bool:
        """False under ZeRO-Offload: the optimizer steps on the host."""
        return not self.shard.offload_optimizer

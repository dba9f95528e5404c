"""Model state put on the device before the first step: weights, quantization state, adapters.

Every parameter is its own allocation (rounded by the caching allocator); a quantized linear
is a packed weight plus its QuantState tensors. Tensor parallelism splits linear layers and
embeddings across ranks; ZeRO-3 / FULL_SHARD partitions every parameter across data-parallel
ranks. The trainable tensors are returned too: gradients and optimizer state follow from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.analytic.context import StepContext
from memplan.architecture import (
    ROW_PARALLEL_ROLES,
    Architecture,
    Block,
    ParamKind,
    ParamTensor,
    is_bias,
)
from memplan.dtypes import DType, Quantization, dtype_bytes, quantized_weight_bytes
from memplan.families import family
from memplan.specs.training import TrainingSetup
from memplan.trace import Category, Event, Phase, Repeat, TraceItem, allocation_bytes

# Kinds that tensor parallelism splits across ranks (Megatron column/row-parallel linears and
# vocab-parallel embeddings); norms, biases of row-parallel layers and routers are replicated.
_TP_SPLIT = (ParamKind.LINEAR, ParamKind.EMBEDDING)


@dataclass(frozen=True, slots=True)
class TensorGroup:
    """``count`` identical tensors of ``numel`` elements each (this GPU's share), as ``dtype``."""

    label: str
    numel: int
    dtype: DType
    count: int
    category: Category = Category.TRAINABLE_WEIGHTS
    shape: tuple[int, ...] = ()  # the full tensor's shape (factored optimizer states)
    # False: no op of the step reads it (ParamTensor.in_step): a trainable tensor that gets
    # no .grad, so torch.optim makes no state for it (AdamW._init_group skips grad None).
    gets_grad: bool = True

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)

    @property
    def allocated_bytes(self) -> int:
        return allocation_bytes(self.nbytes) * self.count


@dataclass
class ModelState:
    """This GPU's parameter tensors by category, and the ones the optimizer updates."""

    groups: list[TensorGroup] = field(default_factory=list)
    num_params: int = 0  # base model parameters (whole model)
    num_trainable_params: int = 0  # whole model, adapters included
    layer_params: int = 0  # parameters of the largest block (gathered whole under ZeRO-3)

    @property
    def trainable(self) -> list[TensorGroup]:
        return [g for g in self.groups if g.category is Category.TRAINABLE_WEIGHTS]

    def bytes_by_category(self) -> dict[Category, int]:
        out: dict[Category, int] = {}
        for g in self.groups:
            out[g.category] = out.get(g.category, 0) + g.allocated_bytes
        return out

    def load_items(self) -> list[TraceItem]:
        """One allocation per tensor, grouped as Repeats."""
        items: list[TraceItem] = []
        for g in self.groups:
            size = allocation_bytes(g.nbytes)
            if size:
                event = Event(size, g.category, Phase.LOAD, 0, g.label)
                items.append(event if g.count == 1 else Repeat((event,), g.count, g.label))
        return items


def _quantized(tensor: ParamTensor, setup: TrainingSetup) -> bool:
    # replace_with_bnb_linear swaps every nn.Linear except the LM head (transformers keeps the
    # output embedding in 16-bit: get_keys_to_not_convert), heads' linears (BERT's MLM
    # transform, OPT's projections) included. MoE routers and the 3-D expert tensors
    # (copies > 1) are parameters of other modules: they stay in 16-bit
    # (transformers integrations/bitsandbytes.py, quantizers/quantizer_bnb_4bit.py); so do
    # the modules a model keeps in fp32 (_keep_in_fp32_modules).
    return (
        setup.quant is not Quantization.NONE
        and tensor.kind in (ParamKind.LINEAR, ParamKind.HEAD_LINEAR)
        and tensor.copies == 1
        and tensor.quantizable
    )


def _share(tensor: ParamTensor, numel: int, *, tp: int, shards: int, vocab: int) -> int:
    """This GPU's elements of ``tensor``: split by tensor parallelism, then by sharding."""
    column_bias = tensor.kind is ParamKind.BIAS and (
        (tensor.role is not None and tensor.role not in ROW_PARALLEL_ROLES)
        or tensor.shape == (vocab,)  # the vocab-parallel LM head's output bias (BERT MLM)
    )
    if tensor.tp_split and (tensor.kind in _TP_SPLIT or column_bias):
        numel = -(-numel // tp)
    return -(-numel // shards)


def model_state(
    arch: Architecture,
    setup: TrainingSetup,
    ctx: StepContext,
    *,
    weight_divisor: int = 1,
    storage_dtype: DType | None = None,
) -> ModelState:
    """Every parameter, quantization state and adapter this GPU holds; ``storage_dtype``:
    the dtype parameters are kept in when it is not the one they compute in (FSDP
    MixedPrecision keeps the loaded fp32 FlatParameter and gathers 16-bit copies)."""
    state = ModelState(num_params=arch.num_params)
    state.layer_params = max((sum(t.numel for t in b.params) for b in arch.blocks), default=0)
    for block in arch.blocks:
        for tensor in block.params:
            _add_base_tensor(state, block, tensor, setup, ctx, weight_divisor, storage_dtype)
    for added in ctx.method.added_params(arch, setup, ctx):
        share = -(-added.numel // weight_divisor)
        category = Category.TRAINABLE_WEIGHTS if added.trainable else Category.FROZEN_WEIGHTS
        state.groups.append(
            TensorGroup(
                added.label,
                share,
                added.dtype,
                added.count,
                category,
                added.shape,
                gets_grad=added.in_step,
            )
        )
        state.num_trainable_params += added.full_numel * added.count * added.trainable
    quantized = any(_quantized(t, setup) for block in arch.blocks for t in block.params)
    if quantized and setup.double_quant:
        # Double quantization's 8-bit code book, made once on the device and shared by every
        # weight (bitsandbytes' module-level name2qmap["dynamic"], 256 fp32 values).
        state.groups.append(
            TensorGroup("quant_state.dynamic_code", 256, DType.FP32, 1, Category.QUANT_STATE)
        )
    fam = family(arch.spec.family)
    for name, numel, dtype in fam.buffers(arch.spec):
        state.groups.append(TensorGroup(name, numel, dtype, 1, Category.FROZEN_WEIGHTS))
    if rotary := fam.rotary_dim(arch.spec):
        # The rotary embedding module's inv_freq and original_inv_freq buffers (fp32).
        pairs = fam.rotary_tables(arch.spec)
        state.groups.append(
            TensorGroup(
                "rotary_emb.inv_freq", rotary // 2, DType.FP32, 2 * pairs, Category.FROZEN_WEIGHTS
            )
        )
    return state


def _add_base_tensor(
    state: ModelState,
    block: Block,
    tensor: ParamTensor,
    setup: TrainingSetup,
    ctx: StepContext,
    shards: int,
    storage_dtype: DType | None,
) -> None:
    # MoE experts are one 3-D parameter of every expert's matrix (transformers >= 5).
    count = block.repeat
    numel = tensor.numel
    label = f"{block.name}.{tensor.name}"
    tp = ctx.tensor_parallel_degree
    if _quantized(tensor, setup):
        q = quantized_weight_bytes(
            _share(tensor, numel, tp=tp, shards=shards, vocab=ctx.vocab_size),
            setup.quant,
            double_quant=setup.double_quant,
            out_features=tensor.out_features,
        )
        state.groups.append(
            TensorGroup(label, q.packed_bytes, DType.UINT8, count, Category.FROZEN_WEIGHTS)
        )
        for i, nbytes in enumerate(q.state_tensor_bytes):
            state.groups.append(
                TensorGroup(
                    f"{label}.quant_state.{i}", nbytes, DType.UINT8, count, Category.QUANT_STATE
                )
            )
        return
    trainable = ctx.method.trains(tensor.kind, bias=is_bias(tensor))
    category = Category.TRAINABLE_WEIGHTS if trainable else Category.FROZEN_WEIGHTS
    share = _share(tensor, numel, tp=tp, shards=shards, vocab=ctx.vocab_size)
    shape = tensor.shape if tensor.copies == 1 else (tensor.copies, *tensor.shape)
    dtype = DType.FP32 if tensor.keep_fp32 else (storage_dtype or ctx.weight_dtype)
    state.groups.append(
        TensorGroup(label, share, dtype, count, category, shape, gets_grad=tensor.in_step)
    )
    if trainable:
        state.num_trainable_params += numel * count

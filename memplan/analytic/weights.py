"""Model state put on the device before the first step: weights, quantization state, adapters.

Every parameter is one allocation (rounded by the caching allocator); a quantized linear is a
packed weight plus its QuantState tensors. The trainable tensors are returned too, because
their gradients and optimizer states follow from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.analytic.context import StepContext
from memplan.architecture import Architecture, Block, ParamKind, ParamTensor
from memplan.dtypes import DType, Quantization, dtype_bytes, quantized_weight_bytes
from memplan.specs.training import Method, TrainingSetup
from memplan.trace import Category, allocation_bytes


@dataclass(frozen=True, slots=True)
class TensorGroup:
    """``count`` identical tensors of ``numel`` elements each, stored as ``dtype``."""

    label: str
    numel: int
    dtype: DType
    count: int

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)

    @property
    def allocated_bytes(self) -> int:
        return allocation_bytes(self.nbytes) * self.count


@dataclass
class ModelState:
    """Device bytes of the model by category, and the tensors the optimizer will update."""

    bytes_by_category: dict[Category, int] = field(default_factory=dict)
    trainable: list[TensorGroup] = field(default_factory=list)
    num_params: int = 0  # base model parameters
    num_adapter_params: int = 0  # parameters added by the method (LoRA, adapters, prefixes)

    def add(self, category: Category, nbytes: int) -> None:
        self.bytes_by_category[category] = self.bytes_by_category.get(category, 0) + nbytes

    @property
    def num_trainable_params(self) -> int:
        return sum(g.numel * g.count for g in self.trainable)


def _trainable_base(tensor: ParamTensor, method: Method) -> bool:
    if method is Method.FULL:
        return True
    # BitFit trains the bias terms only (Ben Zaken et al. 2021).
    return method is Method.BITFIT and tensor.kind is ParamKind.BIAS


def _quantized(tensor: ParamTensor, setup: TrainingSetup) -> bool:
    # bnb replaces every nn.Linear except the LM head (transformers keeps the output embedding
    # in 16-bit: get_keys_to_not_convert); memplan also keeps MoE routers in 16-bit.
    return setup.quant is not Quantization.NONE and tensor.kind is ParamKind.LINEAR


def model_state(arch: Architecture, setup: TrainingSetup, ctx: StepContext) -> ModelState:
    """Bytes of every parameter, quantization state and adapter, by category."""
    state = ModelState(num_params=arch.num_params)
    for block in arch.blocks:
        for tensor in block.params:
            _add_base_tensor(state, block, tensor, setup, ctx)
            if ctx.has_lora(tensor.role) and tensor.kind is ParamKind.LINEAR and tensor.copies == 1:
                _add_lora(state, block, tensor, ctx)
    _add_method_params(state, arch, setup, ctx)
    return state


def _add_base_tensor(
    state: ModelState, block: Block, tensor: ParamTensor, setup: TrainingSetup, ctx: StepContext
) -> None:
    count = block.repeat * tensor.copies
    numel = tensor.numel // tensor.copies
    if _quantized(tensor, setup):
        q = quantized_weight_bytes(
            numel, setup.quant, double_quant=setup.double_quant, out_features=tensor.out_features
        )
        state.add(Category.FROZEN_WEIGHTS, allocation_bytes(q.packed_bytes) * count)
        state_bytes = sum(allocation_bytes(b) for b in q.state_tensor_bytes)
        state.add(Category.QUANT_STATE, state_bytes * count)
        return
    group = TensorGroup(f"{block.name}.{tensor.name}", numel, ctx.weight_dtype, count)
    if _trainable_base(tensor, setup.method):
        state.add(Category.TRAINABLE_WEIGHTS, group.allocated_bytes)
        state.trainable.append(group)
    else:
        state.add(Category.FROZEN_WEIGHTS, group.allocated_bytes)


def _add_lora(state: ModelState, block: Block, tensor: ParamTensor, ctx: StepContext) -> None:
    """peft LoRA: lora_A (r x in) and lora_B (out x r) per targeted linear."""
    r = ctx.lora_r
    for part, numel in (("lora_A", r * tensor.in_features), ("lora_B", r * tensor.out_features)):
        group = TensorGroup(
            f"{block.name}.{tensor.name}.{part}", numel, ctx.adapter_dtype, block.repeat
        )
        state.add(Category.TRAINABLE_WEIGHTS, group.allocated_bytes)
        state.trainable.append(group)
        state.num_adapter_params += numel * block.repeat


def _add_method_params(
    state: ModelState, arch: Architecture, setup: TrainingSetup, ctx: StepContext
) -> None:
    spec = arch.spec
    layers = spec.num_layers
    groups: list[TensorGroup] = []
    if setup.method is Method.ADAPTER:
        # Houlsby adapters after attention and after the MLP: down (h x m + m), up (m x h + h).
        h, m = spec.hidden_size, setup.adapter_size
        for name, numel in (
            ("down.weight", h * m),
            ("down.bias", m),
            ("up.weight", m * h),
            ("up.bias", h),
        ):
            groups.append(TensorGroup(f"adapter.{name}", numel, ctx.adapter_dtype, 2 * layers))
    elif setup.method is Method.PREFIX:
        # peft PrefixTuning (no projection): an embedding of prefix_len x (layers * 2 * kv width).
        kv_width = spec.num_key_value_heads * spec.head_dim
        numel = setup.prefix_len * layers * 2 * kv_width
        groups.append(TensorGroup("prefix_encoder.embedding", numel, ctx.adapter_dtype, 1))
    for group in groups:
        state.add(Category.TRAINABLE_WEIGHTS, group.allocated_bytes)
        state.trainable.append(group)
        state.num_adapter_params += group.numel * group.count

"""Prefix tuning (Li & Liang 2021) as peft's ``PrefixTuningConfig`` runs it.

A prompt encoder (an embedding of ``prefix_len`` x (layers * 2 * kv width), no projection)
gives every layer trainable keys and values for ``prefix_len`` virtual tokens, passed to the
model as ``past_key_values`` and concatenated in front of each layer's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.dtypes import dtype_bytes
from memplan.methods.base import AddedParam, TuningMethod

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


def _table_numel(spec: ModelSpec, prefix_len: int) -> int:
    # peft PrefixEncoder: prefix_len x (num_layers * 2 * kv width).
    return prefix_len * spec.num_layers * 2 * spec.num_key_value_heads * spec.head_dim


class Prefix(TuningMethod):
    name = "prefix"
    summary = "trainable key/value prefixes in every layer (Li & Liang 2021, peft)"
    rank = 40
    setting_fields = ("prefix_len", "adapter_dtype")

    def check_setup(self, setup: TrainingSetup) -> None:
        if setup.grad_ckpt:
            # transformers turns the cache off under gradient checkpointing ("Caching is
            # incompatible with gradient checkpointing"), dropping the prefix keys and values.
            raise ValueError(
                "method=prefix cannot use grad_ckpt: transformers drops the prefix cache "
                "(past_key_values) under gradient checkpointing"
            )
        super().check_setup(setup)

    def kv_prefix_len(self, setup: TrainingSetup) -> int:
        return setup.prefix_len

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        numel = _table_numel(arch.spec, setup.prefix_len)
        return [AddedParam("prefix_encoder.embedding.weight", numel, 1, numel, ctx.adapter_dtype)]

    def attention_kv(
        self, seg: Segment, ctx: StepContext, k: Tensor, v: Tensor, kv_width: int
    ) -> tuple[Tensor, Tensor]:
        """Each layer's keys and values are the prefix concatenated in front of its own."""
        extra = ctx.batch * ctx.prefix_len * kv_width
        pk = seg.input(extra, k.dtype, "prefix.key", requires_grad=True, persistent=True)
        pv = seg.input(extra, v.dtype, "prefix.value", requires_grad=True, persistent=True)
        k = seg.op("prefix_cat_k", [pk, k], k.numel + extra, k.dtype, passthrough_grad=True)
        v = seg.op("prefix_cat_v", [pv, v], v.numel + extra, v.dtype, passthrough_grad=True)
        return k, v

    def tail(self, spec: ModelSpec, ctx: StepContext) -> tuple[int, list[ParamGrad]]:
        """The prompt encoder's keys/values for every layer (looked up for every sequence of
        the batch), held from forward to backward; its table's gradient at the end."""
        table = _table_numel(spec, ctx.prefix_len)
        held = ctx.batch * table * dtype_bytes(ctx.adapter_dtype)
        grad = ctx.param_grad(
            "prefix_encoder.embedding.weight", table, trainable=True, dtype=ctx.adapter_dtype
        )
        return held, [grad]

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        from peft import PrefixTuningConfig, get_peft_model

        from memplan.errors import MemplanError
        from memplan.torchsim.models import peft_task_type

        if not built.is_hf:
            raise MemplanError(
                "prefix tuning needs a transformers model (peft feeds past_key_values)"
            )
        built.model.requires_grad_(False)
        config = PrefixTuningConfig(
            task_type=peft_task_type(built), num_virtual_tokens=setup.prefix_len
        )
        return get_peft_model(built.model, config)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return [
            f"prefix tuning: {setup.prefix_len} virtual key/value tokens prepended in every layer"
        ]


METHOD = Prefix()

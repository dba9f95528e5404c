"""Prefix tuning (Li & Liang 2021) as peft's ``PrefixTuningConfig`` runs it.

A prompt encoder (an embedding of ``prefix_len`` x (layers * 2 * kv width), no projection)
gives every layer trainable keys and values for ``prefix_len`` virtual tokens, passed to the
model as ``past_key_values`` and concatenated in front of each layer's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memplan.dtypes import dtype_bytes
from memplan.methods.base import AddedParam, Step, TuningMethod

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


def _peft_layers(spec: ModelSpec) -> int:
    """The layers peft makes prefixes for: config.num_hidden_layers, an encoder-decoder's
    encoder depth (T5's num_layers), whose prefixes go to the decoder's self-attention."""
    return spec.num_encoder_layers if spec.is_encoder_decoder else spec.num_layers


def _table_numel(spec: ModelSpec, prefix_len: int) -> int:
    # peft PrefixEncoder: prefix_len x (num_layers * 2 * kv width).
    return prefix_len * _peft_layers(spec) * 2 * spec.num_key_value_heads * spec.head_dim


def _cache_numel(spec: ModelSpec, ctx: StepContext) -> int:
    """Elements of one layer's cached prefix keys (or values) on this tensor-parallel rank."""
    kv_width = spec.num_key_value_heads // ctx.tensor_parallel_degree * spec.head_dim
    return ctx.batch * ctx.prefix_len * kv_width


class Prefix(TuningMethod):
    name = "prefix"
    needs_transformers = True
    peft = True
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
        """DynamicLayer.update: the layer's keys and values concatenated after the cached
        prefix (``torch.cat``), which they replace in the cache; the cache holds the results
        until the model's output is dropped (cache_utils.py)."""
        from memplan.analytic.blocks import promote

        prefix = ctx.batch * ctx.prefix_len * kv_width
        out = []
        for t, name in ((k, "key"), (v, "value")):
            # The cache holds the prefix in the model's dtype; cat promotes (fp32 under AMP).
            cached = seg.input(prefix, ctx.weight_dtype, f"prefix.{name}", requires_grad=True)
            dtype = promote(cached.dtype, t.dtype)
            joined = seg.op(
                f"prefix_cat_{name}", [cached, t], t.numel + prefix, dtype, passthrough_grad=True
            )
            seg.cache_held.append(joined)
            out.append(joined)
        return out[0], out[1]

    def outside_forward(self, spec: ModelSpec, ctx: StepContext) -> list[Step]:
        """peft ``get_prompt``: the prompt encoder's rows for every sequence, cast to the
        model's dtype, viewed as each layer's keys and values and copied into a DynamicCache
        (``torch.cat`` onto an empty cache).

        An encoder-decoder (num_transformer_submodules=2) concatenates the prompt with itself
        into self- and cross-attention halves for an EncoderDecoderCache, then replaces its
        cross-attention cache by an empty one (releasing those copies): only the decoder's
        self-attention gets prefixes."""
        enc_dec = spec.is_encoder_decoder
        looked_up = ctx.batch * _table_numel(spec, ctx.prefix_len)
        rows = looked_up * dtype_bytes(ctx.adapter_dtype)
        steps: list[Step] = [(rows, "prompt_encoder")]
        if ctx.adapter_dtype is not ctx.weight_dtype:
            cast = looked_up * dtype_bytes(ctx.weight_dtype)
            steps += [(cast, "prompt to model dtype"), (-rows, "prompt_encoder")]
            rows = cast
        if enc_dec:  # torch.cat([past_key_values, past_key_values], dim=2)
            steps += [(2 * rows, "prompt for self- and cross-attention"), (-rows, "prompt")]
            rows *= 2
        per_layer = _cache_numel(spec, ctx) * dtype_bytes(ctx.weight_dtype)
        layers = 2 * _peft_layers(spec)
        steps += [(per_layer, "prefix cache key/value")] * (layers * (2 if enc_dec else 1))
        steps.append((-rows, "prompt released"))
        if enc_dec:
            steps += [(-per_layer, "cross-attention cache replaced")] * layers
        return steps

    def outside_backward(
        self, spec: ModelSpec, ctx: StepContext, held: Sequence[Sequence[int]]
    ) -> tuple[list[Step], list[Step]]:
        """The prompt encoder's backward runs after every layer's (its nodes were recorded
        first, and autograd runs the latest first): each layer's key and value gradients,
        held until then (``held``: their bytes per layer), are stacked (UnbindBackward) and
        sliced back (SliceBackward); the layers' are concatenated (SplitBackward), made
        contiguous (ViewBackward), cast back to the table's dtype, and the embedding's
        backward writes the table's gradient. An encoder-decoder's layer gradients are first
        padded to its four (self and cross) key/value slots, and the two halves of the
        duplicated prompt summed (CatBackward)."""
        looked_up = 2 * _peft_layers(spec) * _cache_numel(spec, ctx)
        model_bytes = looked_up * dtype_bytes(ctx.weight_dtype)
        layer_bytes = 2 * _cache_numel(spec, ctx) * dtype_bytes(ctx.weight_dtype)
        steps: list[Step] = []
        for layer in held:
            steps.append((layer_bytes, "UnbindBackward"))
            steps += [(-nbytes, "prefix key/value grad") for nbytes in layer]
            steps += [(layer_bytes, "SliceBackward"), (-layer_bytes, "UnbindBackward")]
        chunk, split = layer_bytes, model_bytes
        if spec.is_encoder_decoder:
            for _ in held:
                steps += [(2 * layer_bytes, "SliceBackward"), (-layer_bytes, "SliceBackward")]
            chunk, split = 2 * layer_bytes, 2 * model_bytes
        steps.append((split, "SplitBackward"))
        steps += [(-chunk, "SliceBackward")] * len(held)
        if spec.is_encoder_decoder:
            steps += [(model_bytes, "CatBackward"), (-split, "SplitBackward")]
            split = model_bytes
        steps += [(model_bytes, "ViewBackward"), (-split, "SplitBackward")]
        last = (model_bytes, "ViewBackward")
        if ctx.adapter_dtype is not ctx.weight_dtype:
            last = (looked_up * dtype_bytes(ctx.adapter_dtype), "ToCopyBackward")
            steps += [last, (-model_bytes, "ViewBackward")]
        return steps, [(-last[0], last[1])]

    def tail_grads(self, spec: ModelSpec, ctx: StepContext) -> list[ParamGrad]:
        """The prompt encoder table's gradient (embedding backward)."""
        table = _table_numel(spec, ctx.prefix_len)
        return [
            ctx.param_grad(
                "prefix_encoder.embedding.weight", table, trainable=True, dtype=ctx.adapter_dtype
            )
        ]

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        from peft import PrefixTuningConfig, get_peft_model

        from memplan.errors import MemplanError
        from memplan.torchsim.models import peft_task_type

        if not built.is_hf:
            raise MemplanError(
                "prefix tuning needs a transformers model (peft feeds past_key_values)"
            )
        built.model.requires_grad_(False)
        # Prompt learning needs a task type; peft has none for masked LMs, whose model its
        # feature-extraction wrapper calls with the prefix cache and the other arguments
        # (labels included) as they are.
        task_type = peft_task_type(built) or "FEATURE_EXTRACTION"
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=setup.prefix_len)
        return get_peft_model(built.model, config)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return [
            f"prefix tuning: {setup.prefix_len} virtual key/value tokens prepended in every layer"
        ]


METHOD = Prefix()

"""A model as segments: per stack an embedding, its layers and a final norm; then the loss."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from memplan.analytic.context import StepContext
from memplan.analytic.graph import ParamGrad, Segment, Tensor
from memplan.analytic.head import loss_segment
from memplan.analytic.layers import LayerGraph
from memplan.dtypes import dtype_bytes
from memplan.families import family
from memplan.methods.base import Step
from memplan.specs.model import ModelSpec
from memplan.specs.training import Attention

LayerBuilder = Callable[..., LayerGraph]
"""(spec, ctx, *, input_requires_grad, **kwargs) -> one layer's graph."""
OutsideBackward = Callable[[Sequence[Sequence[int]]], tuple[list[Step], list[Step]]]
"""(bytes of the gradients each layer left the method) -> its backward steps (TuningMethod)."""


@dataclass
class LayerPlan:
    graph: LayerGraph
    checkpointed: bool


@dataclass
class Stack:
    """Embedding -> layers -> final norm (an encoder, a decoder, or a decoder-only model)."""

    embed: Segment
    embed_out: Tensor
    layers: list[LayerPlan]
    norm: Segment
    norm_in: Tensor
    norm_out: Tensor  # equals norm_in when the family has no final norm
    cross_input: Tensor | None = None  # encoder output read by every layer (T5 decoder)
    mask_bytes: int = 0  # the causal mask the model's forward builds once for every layer
    num_masks: int = 1  # such masks (Gemma2's eager path: the full and the sliding-window one)
    # Other tensors the stack's forward makes once and every layer reads, never saved:
    # (label, bytes) (T5's position biases, made by its first layer and passed on).
    shared_tensors: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class ModelGraph:
    stacks: list[Stack]
    loss: Segment
    loss_in: Tensor
    loss_out: Tensor
    logits: Tensor
    autograd: bool  # False for forward-only runs (torch.no_grad)
    cross_links: list[tuple[int, int]] = field(default_factory=list)  # (encoder, decoder) stack
    # Gradients of parameters used outside the layer graphs, written when backward ends: the
    # prefix encoder's table, T5's relative position bias tables.
    tail_grads: list[ParamGrad] = field(default_factory=list)
    # What the method runs outside the layers (TuningMethod.outside_forward/_backward).
    outside_forward: list[Step] = field(default_factory=list)
    forward_end: list[Step] = field(default_factory=list)
    outside_backward: OutsideBackward | None = None


class Stacks(NamedTuple):
    """A model's layer stacks, which stack reads which, and the context of the head."""

    stacks: list[Stack]
    links: list[tuple[int, int]]  # (encoder, decoder) stack indices
    head_ctx: StepContext


@dataclass(frozen=True)
class StackBuilder:
    """Builds the stacks of one forward for a family (flags common to every stack)."""

    grad_ckpt: bool
    ckpt_every: int
    autograd: bool
    input_grads_hook: bool
    decoder_ctx: StepContext | None = None  # encoder-decoder models: the decoder's lengths

    def single(self, spec: ModelSpec, ctx: StepContext, layer: LayerBuilder, count: int) -> Stacks:
        """One stack of ``count`` layers (decoder-only and encoder-only models)."""
        return Stacks([self.stack(spec, ctx, label="model", layer=layer, count=count)], [], ctx)

    def stack(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        *,
        label: str,
        layer: LayerBuilder,
        count: int,
        **kwargs: object,
    ) -> Stack:
        """Embedding -> ``count`` layers -> final norm."""
        fam = family(spec.family)
        embed = Segment(f"{label}.embeddings")
        embed_out = fam.embedding(
            spec, ctx, embed, output_requires_grad=self.input_grads_hook, stack=label
        )
        layers = self._layers(layer, spec, ctx, embed_out.requires_grad, count, **kwargs)
        last_rg = layers[-1].graph.output.requires_grad if layers else embed_out.requires_grad
        norm = Segment(f"{label}.final_norm")
        norm_in = norm.input(
            ctx.num_tokens * spec.hidden_size,
            ctx.activation_dtype,
            f"{label}.final_norm.input",
            requires_grad=last_rg,
        )
        norm_out = fam.final_norm(spec, ctx, norm_in, norm, stack=label)
        stack = Stack(embed, embed_out, layers, norm, norm_in, norm_out)
        kv_len = ctx.seq_len + ctx.prefix_len
        if ctx.attention is Attention.EAGER and fam.causal:
            # create_causal_mask: an additive float mask in the embeddings' dtype for eager
            # attention (SDPA and flash attention run is_causal=True without one).
            stack.mask_bytes = ctx.batch * ctx.seq_len * kv_len * dtype_bytes(ctx.activation_dtype)
            stack.num_masks = fam.num_eager_masks
        elif ctx.sdpa_mask:
            # masking_utils.sdpa_mask: one boolean (1, 1, seq, kv_len) mask, expanded (a view)
            # over the batch.
            stack.mask_bytes = ctx.seq_len * kv_len
        return stack

    def _layers(
        self,
        build: LayerBuilder,
        spec: ModelSpec,
        ctx: StepContext,
        first_rg: bool,
        count: int,
        **kwargs: object,
    ) -> list[LayerPlan]:
        """Layer plans sharing one graph per distinct input-requires-grad state."""
        first = build(spec, ctx, input_requires_grad=first_rg, **kwargs)
        rest = first
        if first.output.requires_grad != first_rg:
            rest = build(spec, ctx, input_requires_grad=first.output.requires_grad, **kwargs)
        ckpt = self.grad_ckpt and self.autograd
        return [
            LayerPlan(first if i == 0 else rest, ckpt and i % self.ckpt_every == 0)
            for i in range(count)
        ]


def build_model_graph(
    spec: ModelSpec,
    ctx: StepContext,
    *,
    grad_ckpt: bool,
    ckpt_every: int,
    autograd: bool,
    input_grads_hook: bool,
    decoder_ctx: StepContext | None = None,
) -> ModelGraph:
    """Segments of every stack and the loss, for one micro-batch."""
    fam = family(spec.family)
    builder = StackBuilder(grad_ckpt, ckpt_every, autograd, input_grads_hook, decoder_ctx)
    stacks, links, head_ctx = fam.stacks(spec, ctx, builder)
    last = stacks[-1]
    loss = loss_segment()
    loss_in = loss.input(
        last.norm_out.numel,
        last.norm_out.dtype,
        "lm_head.input",
        requires_grad=last.norm_out.requires_grad,
    )
    loss_out, logits = fam.head(spec, head_ctx, loss_in, loss)
    graph = ModelGraph(stacks, loss, loss_in, loss_out, logits, autograd, links)
    graph.outside_forward = ctx.method.outside_forward(spec, ctx)
    graph.forward_end = ctx.method.forward_end(spec, ctx)
    graph.outside_backward = functools.partial(ctx.method.outside_backward, spec, ctx)
    graph.tail_grads += ctx.method.tail_grads(spec, ctx)
    graph.tail_grads += fam.tail_grads(spec, ctx)
    return graph

"""A model as segments: per stack an embedding, its layers and a final norm; then the loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memplan.analytic.context import StepContext
from memplan.analytic.graph import ParamGrad, Segment, Tensor
from memplan.analytic.head import embedding, final_norm, lm_loss, loss_segment
from memplan.analytic.layers import (
    LLAMA_FAMILIES,
    LayerGraph,
    bert_layer,
    gpt_layer,
    llama_layer,
    t5_layer,
)
from memplan.dtypes import dtype_bytes
from memplan.specs.model import ModelSpec
from memplan.specs.training import Attention

_CAUSAL_MASK_FAMILIES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt_neox",
    "falcon",
    "opt",
)

_LAYER_BUILDERS = {
    **dict.fromkeys(LLAMA_FAMILIES, llama_layer),
    "gpt2": gpt_layer,
    "gpt_neox": gpt_layer,
    "falcon": gpt_layer,
    "bloom": gpt_layer,
    "opt": gpt_layer,
    "bert": bert_layer,
}


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
    mask_bytes: int = 0  # eager attention's (batch, 1, seq, seq) causal mask, built once


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
    # Prefix tuning: the prompt encoder's keys/values for every layer, held forward to backward.
    prefix_bytes: int = 0


def _layers(
    builder: object,
    spec: ModelSpec,
    ctx: StepContext,
    first_rg: bool,
    count: int,
    *,
    grad_ckpt: bool,
    ckpt_every: int,
    autograd: bool,
    **kwargs: object,
) -> list[LayerPlan]:
    """Layer plans sharing one graph per distinct input-requires-grad state."""
    build = builder  # a layer builder: (spec, ctx, *, input_requires_grad, **kwargs) -> LayerGraph
    first = build(spec, ctx, input_requires_grad=first_rg, **kwargs)  # type: ignore[operator]
    rest = first
    if first.output.requires_grad != first_rg:
        rest = build(spec, ctx, input_requires_grad=first.output.requires_grad, **kwargs)  # type: ignore[operator]
    return [
        LayerPlan(first if i == 0 else rest, grad_ckpt and autograd and i % ckpt_every == 0)
        for i in range(count)
    ]


def _stack(
    spec: ModelSpec,
    ctx: StepContext,
    *,
    label: str,
    layer_count: int,
    builder: object,
    grad_ckpt: bool,
    ckpt_every: int,
    autograd: bool,
    input_grads_hook: bool,
    **kwargs: object,
) -> Stack:
    embed, embed_out = embedding(
        spec, ctx, output_requires_grad=input_grads_hook, label=f"{label}.embeddings"
    )
    layers = _layers(
        builder,
        spec,
        ctx,
        embed_out.requires_grad,
        layer_count,
        grad_ckpt=grad_ckpt,
        ckpt_every=ckpt_every,
        autograd=autograd,
        **kwargs,
    )
    last_rg = layers[-1].graph.output.requires_grad if layers else embed_out.requires_grad
    norm = Segment(f"{label}.final_norm")
    norm_in = norm.input(
        ctx.num_tokens * spec.hidden_size,
        ctx.activation_dtype,
        f"{label}.final_norm.input",
        requires_grad=last_rg,
    )
    norm_out = final_norm(spec, ctx, norm_in, seg=norm) or norm_in
    stack = Stack(embed, embed_out, layers, norm, norm_in, norm_out)
    if ctx.attention is Attention.EAGER and spec.family in _CAUSAL_MASK_FAMILIES:
        # create_causal_mask: an additive float mask in the embeddings' dtype for eager attention
        # (SDPA and flash attention run is_causal=True without one).
        stack.mask_bytes = ctx.batch * ctx.seq_len * ctx.seq_len * dtype_bytes(ctx.activation_dtype)
    return stack


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
    common: dict[str, Any] = {
        "grad_ckpt": grad_ckpt,
        "ckpt_every": ckpt_every,
        "autograd": autograd,
        "input_grads_hook": input_grads_hook,
    }
    stacks: list[Stack] = []
    links: list[tuple[int, int]] = []
    if spec.family == "t5":
        dctx = decoder_ctx or ctx
        enc = _stack(
            spec,
            ctx,
            label="encoder",
            layer_count=spec.num_encoder_layers,
            builder=t5_layer,
            decoder=False,
            encoder_len=ctx.seq_len,
            **common,
        )
        dec = _stack(
            spec,
            dctx,
            label="decoder",
            layer_count=spec.num_decoder_layers,
            builder=t5_layer,
            decoder=True,
            encoder_len=ctx.seq_len,
            encoder_out=enc.norm_out,
            **common,
        )
        cross = dec.layers[0].graph.shared if dec.layers else ()
        dec.cross_input = cross[0] if cross else None
        stacks, links = [enc, dec], [(0, 1)]
        head_ctx = dctx
    else:
        builder = _LAYER_BUILDERS[spec.family]
        count = spec.num_layers
        stacks = [_stack(spec, ctx, label="model", layer_count=count, builder=builder, **common)]
        head_ctx = ctx
    last = stacks[-1]
    loss = loss_segment()
    loss_in = loss.input(
        last.norm_out.numel,
        last.norm_out.dtype,
        "lm_head.input",
        requires_grad=last.norm_out.requires_grad,
    )
    loss_out, logits = lm_loss(spec, head_ctx, loss_in, seg=loss)
    graph = ModelGraph(stacks, loss, loss_in, loss_out, logits, autograd, links)
    _add_tail_state(graph, spec, ctx)
    return graph


def _add_tail_state(graph: ModelGraph, spec: ModelSpec, ctx: StepContext) -> None:
    if ctx.prefix_len:
        # peft PrefixEncoder: an embedding of prefix_len x (layers * 2 * kv width), looked up
        # for every sequence of the batch.
        kv_width = spec.num_key_value_heads * spec.head_dim
        table = ctx.prefix_len * spec.num_layers * 2 * kv_width
        graph.prefix_bytes = ctx.batch * table * dtype_bytes(ctx.adapter_dtype)
        graph.tail_grads.append(
            ctx.param_grad(
                "prefix_encoder.embedding.weight", table, trainable=True, dtype=ctx.adapter_dtype
            )
        )
    buckets = int(spec.layout.get("relative_attention_num_buckets", 0))
    if buckets and ctx.trains_embedding():
        for stack in ("encoder", "decoder"):  # one relative_attention_bias table per stack
            graph.tail_grads.append(
                ctx.param_grad(
                    f"{stack}.relative_attention_bias.weight",
                    buckets * spec.num_attention_heads,
                    trainable=True,
                )
            )

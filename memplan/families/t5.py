"""T5 and mT5 (transformers ``modeling_t5``): an encoder and a decoder stack sharing one
embedding, relative position biases, pre-RMSNorm blocks with dropout after every branch.

transformers >= 5 ties the LM head to the shared embedding for T5 and mT5 (T5Config forces
tie_word_embeddings=True; False only turns off the d_model**-0.5 output scaling of T5 v1.1,
Flan-T5 and mT5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config, Layout, ModelFamily

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.analytic.layers import LayerGraph
    from memplan.analytic.model_graph import LayerBuilder, Stack, StackBuilder, Stacks
    from memplan.architecture import Block, Params
    from memplan.dtypes import DType
    from memplan.specs.model import ModelSpec

# T5 classes by config.json 'architectures' name -> whether the decoder stack exists.
# T5WithLMHeadModel is the pre-2020 name of T5ForConditionalGeneration (t5-small ... t5-11b).
T5_ARCHITECTURES: Final[dict[str, bool]] = {
    "T5ForConditionalGeneration": True,
    "T5WithLMHeadModel": True,
    "T5Model": True,
    "T5EncoderModel": False,
    "MT5ForConditionalGeneration": True,
    "MT5Model": True,
    "MT5EncoderModel": False,
}
# Class names transformers no longer has, by their current name.
_RENAMED: Final = {"T5WithLMHeadModel": "T5ForConditionalGeneration"}


class T5Layout(Layout):
    architecture: str = Field(
        default="T5ForConditionalGeneration",
        description="transformers class laid out, from config.json 'architectures'.",
    )
    relative_attention_num_buckets: PositiveInt = Field(
        default=32,
        description="Rows of the relative position bias, one table per stack (registered in "
        "layer 0, shared by all layers).",
    )
    scale_decoder_outputs: bool = Field(
        default=True,
        description="Decoder outputs are scaled by d_model**-0.5 before the tied LM head "
        "(config tie_word_embeddings not false: original T5).",
    )


class T5(ModelFamily):
    name = "t5"
    own_loss = "an encoder-decoder head (scaled decoder output, unshifted labels)"
    model_types = ("t5", "mt5")
    tiny_model = "tiny-t5"
    layout_type = T5Layout
    lora_roles = ("q", "v")  # q, v (t5 and mt5)
    causal = False  # the relative position bias carries the decoder's causal mask

    def layout(self, spec: ModelSpec) -> T5Layout:
        assert isinstance(spec.layout, T5Layout)
        return spec.layout

    # -- config.json -------------------------------------------------------------------------
    def read_config(self, config: Config) -> dict[str, Any]:
        """T5Config / MT5Config: feed_forward_proj '[gated-]act', d_kv independent of d_model."""
        mt5 = config["model_type"] == "mt5"
        default_class = "MT5ForConditionalGeneration" if mt5 else "T5ForConditionalGeneration"
        architecture = cfg.architecture_name(config, default_class)
        if architecture not in T5_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r} "
                f"(supported: {', '.join(T5_ARCHITECTURES)})"
            )
        proj = cfg.text(config, "feed_forward_proj", "gated-gelu" if mt5 else "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}")
        encoder_layers = cfg.integer(config, ("num_layers", "num_hidden_layers"))
        decoder_layers = (
            cfg.integer(config, "num_decoder_layers", encoder_layers)
            if T5_ARCHITECTURES[architecture]
            else 0
        )
        heads = cfg.integer(config, ("num_heads", "num_attention_heads"))
        dropout = cfg.fraction(config, "dropout_rate", 0.1)
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": cfg.integer(config, ("d_model", "hidden_size")),
            "num_encoder_layers": encoder_layers,
            "num_decoder_layers": decoder_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": cfg.integer(config, ("d_kv", "head_dim")),
            "intermediate_size": cfg.integer(config, "d_ff"),
            "gated_mlp": parts[0] == "gated" and len(parts) == 2,
            # T5Config: 'gated-gelu' runs gelu_new (backwards compatibility).
            "hidden_act": "gelu_new" if proj == "gated-gelu" else parts[-1],
            "norm_type": "rmsnorm",  # T5LayerNorm: scale only, no mean subtraction
            "tie_word_embeddings": True,
            "position_embedding": "relative",
            "max_position_embeddings": cfg.integer(config, "n_positions", 512),
            "hidden_dropout": dropout,
            "attention_dropout": dropout,
            "layout": {
                "architecture": architecture,
                "relative_attention_num_buckets": cfg.integer(
                    config, "relative_attention_num_buckets", 32
                ),
                "scale_decoder_outputs": config.get("tie_word_embeddings") is not False,
            },
        }

    def hf_class(self, config: Config) -> str:
        default = (
            "MT5ForConditionalGeneration"
            if config["model_type"] == "mt5"
            else ("T5ForConditionalGeneration")
        )
        name = str((config.get("architectures") or [default])[0])
        return _RENAMED.get(name, name)

    # -- parameters ---------------------------------------------------------------------------
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        """Shared embedding, encoder and decoder stacks; lm_head tied (transformers >= 5)."""
        from memplan.architecture import Block, lm_head_blocks, token_embedding_param

        blocks: tuple[Block, ...] = (Block("embeddings", (token_embedding_param("shared", spec),)),)
        blocks += self._stack_blocks(spec, "encoder", spec.num_encoder_layers)
        if spec.num_decoder_layers:
            blocks += self._stack_blocks(spec, "decoder", spec.num_decoder_layers)
        return blocks + lm_head_blocks(spec)

    def _mlp_params(self, spec: ModelSpec, prefix: str) -> Params:
        """T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0 gate, wi_1 up, wo).

        ``wo`` is in _keep_in_fp32_modules: bitsandbytes leaves it unquantized.
        """
        from dataclasses import replace

        from memplan.architecture import gated_mlp_params, mlp_params

        if spec.gated_mlp:
            params = gated_mlp_params(spec, f"{prefix}.DenseReluDense.", ("wi_0", "wi_1", "wo"))
        else:
            params = mlp_params(spec, f"{prefix}.DenseReluDense.wi", f"{prefix}.DenseReluDense.wo")
        return [replace(t, quantizable=".wo." not in t.name) for t in params]

    def _stack_blocks(self, spec: ModelSpec, stack: str, num_layers: int) -> tuple[Block, ...]:
        """One stack: relative bias (in block 0, shared), layers, final RMS norm."""
        from memplan.architecture import Block, attention_params, norm_params, table_param

        h = spec.hidden_size
        qkvo = ("q", "k", "v", "o")
        layer = [
            *attention_params(spec, "layer.0.SelfAttention", qkvo),
            *norm_params("layer.0.layer_norm", h, with_bias=False),
        ]
        if stack == "decoder":
            layer += [
                *attention_params(spec, "layer.1.EncDecAttention", qkvo),
                *norm_params("layer.1.layer_norm", h, with_bias=False),
            ]
        ff = "layer.2" if stack == "decoder" else "layer.1"
        layer += [*self._mlp_params(spec, ff), *norm_params(f"{ff}.layer_norm", h, with_bias=False)]
        # T5Attention(has_relative_attention_bias=(i == 0)): buckets x heads, used by every layer.
        bias = table_param(
            "block.0.layer.0.SelfAttention.relative_attention_bias",
            self.layout(spec).relative_attention_num_buckets,
            spec.num_attention_heads,
        )
        return (
            Block(f"{stack}_relative_attention_bias", (bias,)),
            Block(f"{stack}_layer", tuple(layer), repeat=num_layers),
            Block(
                f"{stack}_final_norm", tuple(norm_params("final_layer_norm", h, with_bias=False))
            ),
        )

    # -- the step ------------------------------------------------------------------------------
    def stacks(self, spec: ModelSpec, ctx: StepContext, build: StackBuilder) -> Stacks:
        from dataclasses import replace

        from memplan.analytic.model_graph import Stacks
        from memplan.dtypes import dtype_bytes
        from memplan.specs.training import Attention

        # T5Stack passes no cache to the encoder: peft's prefixes reach the decoder only.
        ectx = replace(ctx, prefix_len=0)
        if not spec.num_decoder_layers:  # T5EncoderModel
            single = build.single(spec, ectx, self._encoder_layer, spec.num_encoder_layers)
            _first_layer(single.stacks[0], spec, ectx, self._encoder_layer)
            return single
        dctx = build.decoder_ctx or ctx
        enc = build.stack(
            spec, ectx, label="encoder", layer=self._encoder_layer, count=spec.num_encoder_layers
        )
        _first_layer(enc, spec, ectx, self._encoder_layer)
        cross_kwargs: dict[str, Any] = {"encoder_len": ectx.seq_len, "encoder_out": enc.norm_out}
        dec = build.stack(
            spec,
            dctx,
            label="decoder",
            layer=self._decoder_layer,
            count=spec.num_decoder_layers,
            **cross_kwargs,
        )
        # Checkpointing sets T5Attention.gradient_checkpointing: the cross-attention's zero
        # bias is made a leaf that requires grad.
        zeros_grad = build.grad_ckpt and build.autograd
        _first_layer(dec, spec, dctx, self._decoder_layer, zeros_grad=zeros_grad, **cross_kwargs)
        cross = dec.layers[0].graph.shared if dec.layers else ()
        dec.cross_input = cross[0] if cross else None
        if dctx.attention is Attention.EAGER:
            # create_causal_mask's additive (batch, 1, q, kv) mask in the embeddings' dtype
            # (SDPA gets none: create_position_bias_mask builds one per layer).
            kv = dctx.seq_len + dctx.prefix_len
            mask = dctx.batch * dctx.seq_len * kv * dtype_bytes(dctx.activation_dtype)
            dec.shared_tensors = [("causal mask", mask)]
        return Stacks([enc, dec], [(0, 1)], dctx)

    def _encoder_layer(
        self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool, first: bool = False
    ) -> LayerGraph:
        return _t5_layer(
            spec,
            ctx,
            input_requires_grad=input_requires_grad,
            decoder=False,
            encoder_len=ctx.seq_len,
            first=first,
        )

    def _decoder_layer(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        *,
        input_requires_grad: bool,
        encoder_len: int,
        encoder_out: Tensor,
        first: bool = False,
        zeros_grad: bool = False,
    ) -> LayerGraph:
        return _t5_layer(
            spec,
            ctx,
            input_requires_grad=input_requires_grad,
            decoder=True,
            encoder_len=encoder_len,
            encoder_out=encoder_out,
            first=first,
            zeros_grad=zeros_grad,
        )

    def embedding(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        seg: Segment,
        *,
        output_requires_grad: bool,
        stack: str = "model",
    ) -> Tensor:
        """The shared table's lookup, then dropout.

        One AccumulateGrad serves the table: the (tied) LM head's gradient arrives first, the
        decoder lookup's in the middle (their sum then waits in the temporaries), the
        encoder's last; an untied head leaves the decoder's first, waiting in the temporaries.
        """
        from memplan.analytic.blocks import dropout
        from memplan.analytic.head import token_embedding
        from memplan.trace import Category

        buffered = None
        if not spec.is_encoder_decoder:
            tie = "last" if spec.tie_word_embeddings else ""
        elif stack == "decoder":
            tie = "middle" if spec.tie_word_embeddings else "first"
        else:
            tie, buffered = "last", Category.TEMPORARIES
        x = token_embedding(
            spec,
            ctx,
            seg,
            output_requires_grad=output_requires_grad,
            tie=tie,
            buffered_in=buffered,
        )
        return dropout(seg, ctx, x, spec.hidden_dropout, "embed_dropout")

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        from memplan.analytic.blocks import dropout

        normed = _t5_norm(seg, ctx, x, "final_layer_norm", spec.hidden_size)
        return dropout(seg, ctx, normed, spec.hidden_dropout, "final_dropout")

    def head(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
    ) -> tuple[Tensor, Tensor]:
        """The tied LM head and CrossEntropyLoss on the logits."""
        from memplan.analytic.blocks import cast
        from memplan.analytic.head import cross_entropy, lm_head
        from memplan.dtypes import DType

        head_in = x
        if self.layout(spec).scale_decoder_outputs:  # * d_model**-0.5
            head_in = seg.op("scale_decoder_outputs", [x], x.numel, x.dtype)
        logits = lm_head(spec, ctx, head_in, seg)
        # CrossEntropyLoss under autocast: log_softmax is on autocast's fp32 list.
        loss_in = cast(seg, logits, DType.FP32, "logits.autocast") if ctx.amp else logits
        return cross_entropy(ctx, seg, loss_in, x, shifted_fp32=False), logits

    def tail_grads(self, spec: ModelSpec, ctx: StepContext) -> list[ParamGrad]:
        """The relative position bias tables (one per stack), used by every layer."""
        if not ctx.trains_embedding:
            return []
        buckets = self.layout(spec).relative_attention_num_buckets
        stacks = ("encoder", "decoder") if spec.is_encoder_decoder else ("encoder",)
        return [
            ctx.param_grad(
                f"{stack}.relative_attention_bias.weight",
                buckets * spec.num_attention_heads,
                trainable=True,
            )
            for stack in stacks
        ]


def _first_layer(
    stack: Stack, spec: ModelSpec, ctx: StepContext, build: LayerBuilder, **kwargs: Any
) -> None:
    """T5Stack's first block computes the position biases every later block is handed."""
    from memplan.analytic.model_graph import LayerPlan

    if not stack.layers:
        return
    plan = stack.layers[0]
    rg = plan.graph.input.requires_grad
    graph = build(spec, ctx, input_requires_grad=rg, first=True, **kwargs)
    stack.layers[0] = LayerPlan(graph, plan.checkpointed)


@dataclass(frozen=True, slots=True)
class _Bias:
    """The additive position bias one attention reads (made once per stack, in layer 0).

    Self-attention: T5Attention.compute_bias looks the relative bias table up, (1, heads, q,
    kv) in the table's dtype, a gradient flowing to it when the table trains. Cross-attention:
    torch.zeros((1, heads, q, kv), dtype=query.dtype), no gradient.
    """

    dtype: DType
    requires_grad: bool
    causal: bool  # the decoder's self-attention: a causal mask joins the bias
    permuted: bool  # compute_bias's permute: not contiguous (SDPA's mask is a copy)
    made: Tensor | None = None  # made by this layer (the stack's first), else handed to it


def _bmm_copy(seg: Segment, ctx: StepContext, x: Tensor, label: str) -> Tensor:
    """torch.matmul folds (batch, heads) of a transposed (batch, seq, heads, d) view into one
    dimension with reshape: a copy unless the batch is one sequence (the copy is saved)."""
    if not ctx.batched:
        return x
    return seg.op(label, [x], x.numel, x.dtype, passthrough_grad=True)


def _bmm_saves(a: Tensor, b: Tensor) -> list[Tensor | None]:
    """bmm saves each operand only for the other's gradient."""
    return [a if b.requires_grad else None, b if a.requires_grad else None]


def _t5_attention(
    seg: Segment,
    ctx: StepContext,
    qkv: tuple[Tensor, Tensor, Tensor],
    *,
    heads: int,
    kv_len: int,
    bias: _Bias,
    dropout_p: float,
    label: str,
    cached_kv: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """T5Attention's core as transformers runs it: (output, eager attn_weights).

    eager_attention_forward: matmul(q, k^T) * 1.0, + position_bias (16-bit scores plus an fp32
    bias promote to fp32), + the causal mask, softmax in that dtype, dropout, matmul with v
    (autocast casts the weights back to the compute dtype), transpose().contiguous(). The
    dropped-out weights are returned up to T5Block (``attn_weights``).
    sdpa_attention_forward: create_position_bias_mask folds the bias (and causality) into a
    float mask, contiguous; on the CPU with dropout SDPA runs its math path.
    ``cached_kv``: keys and values come out of a cache, contiguous (batch, heads, kv, d)
    tensors that matmul folds without a copy.
    """
    from memplan.analytic.blocks import attention_core, cast, dropout, promote
    from memplan.dtypes import dtype_bytes
    from memplan.specs.training import Attention

    q, k, v = qkv
    if ctx.amp:  # autocast casts matmul's and SDPA's fp32 operands (4-bit linears' outputs)
        q, k, v = (
            cast(seg, t, ctx.compute_dtype, f"{label}.{n}_autocast")
            for t, n in zip((q, k, v), "qkv", strict=True)
        )
    scores_numel = ctx.batch * heads * ctx.seq_len * kv_len
    sdpa = ctx.attention is not Attention.EAGER
    if not sdpa:
        qc = _bmm_copy(seg, ctx, q, f"{label}.q_contiguous")
        kc = k if cached_kv else _bmm_copy(seg, ctx, k, f"{label}.k_contiguous")
        scores = seg.op(f"{label}.qk", [qc, kc], scores_numel, q.dtype, saves=_bmm_saves(qc, kc))
        scaled = seg.op(f"{label}.scale", [scores], scores_numel, q.dtype)  # * scaling (1.0)
        dtype = promote(q.dtype, bias.dtype)
        # The bias's gradient sums the scores' gradient over the batch (1, heads, q, kv).
        reduce = scores_numel * dtype_bytes(dtype) if bias.requires_grad else 0
        x = seg.op(
            f"{label}.position_bias",
            [scaled, *([bias.made] if bias.made is not None else [])],
            scores_numel,
            dtype,
            passthrough_grad=True,
            bwd_workspace_bytes=reduce,
        )
        if bias.causal:  # create_causal_mask's additive mask, in the embeddings' dtype
            dtype = promote(dtype, ctx.activation_dtype)
            x = seg.op(f"{label}.causal_mask", [x], scores_numel, dtype, passthrough_grad=True)
        probs = seg.op(f"{label}.softmax", [x], scores_numel, dtype, saves_output=True)
        dropped = dropout(seg, ctx, probs, dropout_p, f"{label}.attn_dropout")
        pc = cast(seg, dropped, q.dtype, f"{label}.probs_cast")  # autocast's matmul operand
        vc = v if cached_kv else _bmm_copy(seg, ctx, v, f"{label}.v_contiguous")
        out = seg.op(f"{label}.pv", [pc, vc], q.numel, q.dtype, saves=_bmm_saves(pc, vc))
        out = seg.op(f"{label}.transpose", [out], q.numel, q.dtype, passthrough_grad=True)
        return out, dropped
    if dropout_p <= 0 or ctx.device != "cpu":
        # Fused SDPA kernels take the float mask (and its gradient) as attn_mask.
        return (
            attention_core(
                seg,
                ctx,
                q,
                k,
                v,
                num_heads=heads,
                num_kv_heads=heads,
                label=label,
                kv_len=kv_len,
                mask=True,
            ),
            None,
        )
    out = _t5_math_sdpa(
        seg,
        ctx,
        (q, k, v),
        heads=heads,
        kv_len=kv_len,
        bias=bias,
        dropout_p=dropout_p,
        label=label,
        cached_kv=cached_kv,
    )
    return out, None


def _t5_math_sdpa(
    seg: Segment,
    ctx: StepContext,
    qkv: tuple[Tensor, Tensor, Tensor],
    *,
    heads: int,
    kv_len: int,
    bias: _Bias,
    dropout_p: float,
    label: str,
    cached_kv: bool = False,
) -> Tensor:
    """sdpa_attention_forward with T5's position bias, SDPA on its math path (CPU, dropout).

    create_position_bias_mask: a causal decoder writes torch.where(causal, bias, min) (the
    boolean condition saved when the bias needs a gradient); ``.contiguous()`` copies a
    permuted bias. Autocast casts the float mask to the compute dtype. The math kernel upcasts
    q, k, v to fp32, scales q and k^T into copies (matmul's reshape copies them again for a
    batch of several sequences, and those copies are saved), adds the mask out of place,
    softmax, dropout, matmul with v, and casts the output back; the attention weights are
    returned in the input dtype. Its locals live until it returns.
    """
    from memplan.analytic.blocks import cast, dropout
    from memplan.dtypes import DType

    q, k, v = qkv
    b, s = ctx.batch, ctx.seq_len
    scores_numel = b * heads * s * kv_len
    bias_numel = heads * s * kv_len
    mask = bias.made or seg.input(
        bias_numel, bias.dtype, f"{label}.bias", requires_grad=bias.requires_grad, persistent=True
    )
    held: list[Tensor] = []
    if bias.causal:
        cond = seg.op(f"{label}.causal", [], s * kv_len, DType.BOOL, requires_grad=False)
        mask = seg.op(f"{label}.where", [mask, cond], bias_numel, bias.dtype, saves=[cond])
    if bias.causal or bias.permuted:
        mask = seg.op(f"{label}.contiguous", [mask], bias_numel, bias.dtype, passthrough_grad=True)
        held.append(mask)
    if ctx.amp:
        mask = cast(seg, mask, ctx.compute_dtype, f"{label}.mask_autocast")
        held.append(mask)
    views = [q, k, v]
    q32, k32, v32 = (
        cast(seg, t, DType.FP32, f"{label}.{n}_float")
        for t, n in zip((q, k, v), "qkv", strict=True)
    )
    qs = seg.op(f"{label}.q_scaled", [q32], q32.numel, DType.FP32)
    ks = seg.op(f"{label}.k_scaled", [k32], k32.numel, DType.FP32)
    qc = _bmm_copy(seg, ctx, qs, f"{label}.q_contiguous")
    kc = ks if cached_kv else _bmm_copy(seg, ctx, ks, f"{label}.k_contiguous")
    scores = seg.op(f"{label}.qk", [qc, kc], scores_numel, DType.FP32, saves=_bmm_saves(qc, kc))
    reduce = scores_numel * 4 if mask.requires_grad else 0
    x = seg.op(
        f"{label}.add_mask",
        [scores, mask],
        scores_numel,
        DType.FP32,
        passthrough_grad=True,
        bwd_workspace_bytes=reduce,
    )
    probs = seg.op(f"{label}.softmax", [x], scores_numel, DType.FP32, saves_output=True)
    dropped = dropout(seg, ctx, probs, dropout_p, f"{label}.attn_dropout")
    weights = cast(seg, dropped, q.dtype, f"{label}.weights_cast")
    vc = v32 if cached_kv else _bmm_copy(seg, ctx, v32, f"{label}.v_contiguous")
    out = seg.op(f"{label}.pv", [dropped, vc], q.numel, DType.FP32, saves=_bmm_saves(dropped, vc))
    out = cast(seg, out, q.dtype, f"{label}.output_cast")
    seg.hold(*held, q32, k32, v32, qs, weights, *views, label=f"{label}.locals")
    return seg.op(f"{label}.transpose", [out], q.numel, q.dtype, passthrough_grad=True)


def _t5_norm(seg: Segment, ctx: StepContext, x: Tensor, label: str, size: int) -> Tensor:
    """T5LayerNorm: the variance of an fp32 copy, then ``x * rsqrt(variance + eps)`` on the
    input itself (16-bit times fp32 promotes to fp32: mul saves x and the rsqrt), cast to a
    16-bit weight's dtype, times the weight.
    """
    from memplan.analytic.blocks import cast, promote, rms_statistics
    from memplan.dtypes import DType, dtype_bytes

    trainable = ctx.trains_norm_at(label)
    _, rstd = rms_statistics(seg, x, label, size)
    normed_dtype = promote(x.dtype, DType.FP32)
    # mul backward for rstd: (grad * x).sum(-1) materializes grad * x before the reduction.
    normed = seg.op(
        f"{label}.mul_rstd",
        [x, rstd],
        x.numel,
        normed_dtype,
        saves=[x, rstd],
        bwd_workspace_bytes=x.numel * dtype_bytes(normed_dtype),
    )
    if ctx.weight_dtype is not DType.FP32:  # hidden_states.to(self.weight.dtype)
        normed = cast(seg, normed, ctx.weight_dtype, f"{label}.downcast")
    grad = ctx.param_grad(f"{label}.weight", size, trainable=trainable)
    out_dtype = promote(ctx.weight_dtype, normed.dtype)
    return seg.op(
        label,
        [normed],
        normed.numel,
        out_dtype,
        saves=[normed if trainable else None],
        param_grads=[grad],
        # The weight's gradient (grad * normed).sum() materializes the product first.
        bwd_workspace_bytes=normed.numel * dtype_bytes(out_dtype) if trainable else 0,
        saves_params=normed.requires_grad,  # mul keeps the weight for the input's gradient
    )


def _t5_layer(
    spec: ModelSpec,
    ctx: StepContext,
    *,
    input_requires_grad: bool,
    decoder: bool,
    encoder_len: int,
    encoder_out: Tensor | None = None,
    first: bool = False,
    zeros_grad: bool = False,
) -> LayerGraph:
    """T5Block: pre-RMSNorm self-attention (+ cross-attention in the decoder) and MLP.

    Each sublayer (T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF) keeps its norm's
    output and its branch's output in locals until it returns; dropout follows every branch.
    The ``first`` block makes the position biases (1, heads, q, kv) every block reads:
    compute_bias's lookup of the relative bias table (in its dtype) and, in the decoder, the
    cross-attention's torch.zeros in the queries' dtype (``zeros_grad``: a leaf requiring
    grad); they outlive it (a checkpoint's recomputation makes them again).
    """
    from memplan.analytic.blocks import LinearSpec, dropout, linear, residual_add
    from memplan.analytic.graph import Segment
    from memplan.analytic.layers import LayerGraph, qkv_projections

    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads = spec.num_attention_heads // tp
    inner = heads * spec.head_dim
    p = spec.hidden_dropout
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    hn = _t5_norm(seg, ctx, x, "layer.0.layer_norm", h)
    q, k, v = qkv_projections(
        seg, ctx, spec, hn, names=("SelfAttention.q", "SelfAttention.k", "SelfAttention.v")
    )
    if decoder:  # the decoder's cache (peft's prefix) joins the keys and values
        k, v = ctx.method.attention_kv(seg, ctx, k, v, inner)
    kv_len = ctx.seq_len + ctx.prefix_len
    made = None
    if first:  # the relative bias table is an embedding: its lookup is in the weights' dtype
        made = seg.op(
            "SelfAttention.compute_bias", [], heads * ctx.seq_len * kv_len, ctx.weight_dtype
        )
        seg.stack_held.append(made)
    self_bias = _Bias(
        ctx.weight_dtype, ctx.trains_embedding, causal=decoder, permuted=True, made=made
    )
    attn, weights = _t5_attention(
        seg,
        ctx,
        (q, k, v),
        heads=heads,
        kv_len=kv_len,
        bias=self_bias,
        dropout_p=spec.attention_dropout,
        label="SelfAttention",
        cached_kv=decoder and ctx.prefix_len > 0,
    )
    o = linear(seg, ctx, attn, LinearSpec("SelfAttention.o", inner, h, "o", bias=False))
    seg.hold(q, k, v, label="SelfAttention.locals")  # until T5Attention returns
    # An adapter hooks T5Attention's output, before the sublayer's dropout.
    o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
    branch = dropout(seg, ctx, o, p, "layer.0.dropout")
    hidden = residual_add(seg, x, branch, "layer.0.residual")
    seg.hold(hn, o, label="layer.0.locals")
    shared: tuple[Tensor, ...] = ()
    if decoder and encoder_out is not None:
        enc = seg.input(
            encoder_out.numel,
            encoder_out.dtype,
            "encoder_hidden_states",
            requires_grad=encoder_out.requires_grad,
            persistent=True,
        )
        shared = (enc,)
        cn = _t5_norm(seg, ctx, hidden, "layer.1.layer_norm", h)
        cq = linear(seg, ctx, cn, LinearSpec("EncDecAttention.q", h, inner, "q", bias=False))
        ck = linear(seg, ctx, enc, LinearSpec("EncDecAttention.k", h, inner, "k", bias=False))
        cv = linear(seg, ctx, enc, LinearSpec("EncDecAttention.v", h, inner, "v", bias=False))
        if ctx.prefix_len:
            # With a cache (peft's EncoderDecoderCache) the cross-attention keys and values are
            # copied into its emptied cross-attention cache (torch.cat onto an empty tensor),
            # which holds them until the model's output is dropped.
            ck, cv = (
                seg.op(f"EncDecAttention.cache_{n}", [t], t.numel, t.dtype, passthrough_grad=True)
                for t, n in ((ck, "key"), (cv, "value"))
            )
            seg.cache_held += [ck, cv]
        zeros = None
        if first:
            zeros = seg.op(
                "EncDecAttention.zeros_bias",
                [],
                heads * ctx.seq_len * encoder_len,
                cq.dtype,
                requires_grad=zeros_grad,
            )
            seg.stack_held.append(zeros)
        cross_bias = _Bias(cq.dtype, False, causal=False, permuted=False, made=zeros)
        ca, cross_weights = _t5_attention(
            seg,
            ctx,
            (cq, ck, cv),
            heads=heads,
            kv_len=encoder_len,
            bias=cross_bias,
            dropout_p=spec.attention_dropout,
            label="EncDecAttention",
            cached_kv=ctx.prefix_len > 0,
        )
        co = linear(seg, ctx, ca, LinearSpec("EncDecAttention.o", inner, h, "o", bias=False))
        seg.hold(cq, ck, cv, label="EncDecAttention.locals")
        branch = dropout(seg, ctx, co, p, "layer.1.dropout")
        hidden = residual_add(seg, hidden, branch, "layer.1.residual")
        seg.hold(cn, co, label="layer.1.locals")
        if weights is not None:  # T5Block's `_` now names the cross-attention's weights
            seg.hold(weights, label="SelfAttention.weights")
        weights = cross_weights
    fn = _t5_norm(seg, ctx, hidden, "layer.-1.layer_norm", h)
    ff = _t5_mlp(seg, ctx, spec, fn)
    ff = ctx.method.branch_output(seg, ctx, ff, "adapter_mlp")  # hooks DenseReluDense
    seg.hold(fn, label="layer.-1.norm_out")  # until DenseReluDense returns
    branch = dropout(seg, ctx, ff, p, "layer.-1.dropout")
    out = residual_add(seg, hidden, branch, "layer.-1.residual")
    seg.hold(ff, *([weights] if weights is not None else []), label="layer.-1.locals")
    seg.hold(x)  # the caller's `hidden_states` keeps the layer input until the layer returns
    if seg.stack_held:  # returned by the block (a recomputation drops them when it stops)
        seg.hold(*seg.stack_held, label="position biases")
    return LayerGraph(seg, x, out, shared)


def _t5_mlp(seg: Segment, ctx: StepContext, spec: ModelSpec, x: Tensor) -> Tensor:
    """T5DenseActDense / T5DenseGatedActDense: act(wi_0 x) * wi_1 x, dropout, wo.

    ``wo`` stays in fp32 (_keep_in_fp32_modules; bitsandbytes leaves it unquantized), and its
    input is cast to the weight's dtype first: under AMP a 16-bit product becomes an fp32 copy
    that autocast casts back for the matmul.
    """
    from memplan.analytic.blocks import LinearSpec, activation, cast, dropout, linear

    h = spec.hidden_size
    i = spec.intermediate_size // ctx.tensor_parallel_degree
    held: list[Tensor] = []
    if spec.gated_mlp:
        g = linear(seg, ctx, x, LinearSpec("DenseReluDense.wi_0", h, i, "gate", bias=False))
        a = activation(seg, g, spec.hidden_act, "DenseReluDense.act", fp32_pow=ctx.cuda_autocast)
        u = linear(seg, ctx, x, LinearSpec("DenseReluDense.wi_1", h, i, "up", bias=False))
        mid = seg.op("DenseReluDense.mul", [a, u], a.numel, a.dtype, saves=[a, u])
        held = [a, u]  # hidden_gelu, hidden_linear
    else:
        up = linear(seg, ctx, x, LinearSpec("DenseReluDense.wi", h, i, "up", bias=False))
        mid = activation(seg, up, spec.hidden_act, "DenseReluDense.act", fp32_pow=ctx.cuda_autocast)
    mid = dropout(seg, ctx, mid, spec.hidden_dropout, "DenseReluDense.dropout")
    # T5DenseGatedActDense: hidden_states.to(self.wo.weight.dtype); transformers keeps wo in
    # fp32 only when a model is loaded in fp16.
    mid = cast(seg, mid, ctx.weight_dtype, "DenseReluDense.wo_cast")
    out = linear(
        seg, ctx, mid, LinearSpec("DenseReluDense.wo", i, h, "down", bias=False, quantizable=False)
    )
    seg.hold(mid, *held, label="DenseReluDense.locals")
    return out


FAMILY = T5()

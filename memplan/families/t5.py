"""T5 and mT5 (transformers ``modeling_t5``): an encoder and a decoder stack sharing one
embedding, relative position biases, pre-RMSNorm blocks with dropout after every branch.

transformers >= 5 ties the LM head to the shared embedding for T5 and mT5 (T5Config forces
tie_word_embeddings=True; False only turns off the d_model**-0.5 output scaling of T5 v1.1,
Flan-T5 and mT5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config, Layout, ModelFamily

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.analytic.layers import LayerGraph
    from memplan.analytic.model_graph import StackBuilder, Stacks
    from memplan.architecture import Block, Params
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
        """T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0 gate, wi_1 up, wo)."""
        from memplan.architecture import gated_mlp_params, mlp_params

        if spec.gated_mlp:
            return gated_mlp_params(spec, f"{prefix}.DenseReluDense.", ("wi_0", "wi_1", "wo"))
        return mlp_params(spec, f"{prefix}.DenseReluDense.wi", f"{prefix}.DenseReluDense.wo")

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
        from memplan.analytic.model_graph import Stacks

        if not spec.num_decoder_layers:  # T5EncoderModel
            return build.single(spec, ctx, self._encoder_layer, spec.num_encoder_layers)
        dctx = build.decoder_ctx or ctx
        enc = build.stack(
            spec, ctx, label="encoder", layer=self._encoder_layer, count=spec.num_encoder_layers
        )
        dec = build.stack(
            spec,
            dctx,
            label="decoder",
            layer=self._decoder_layer,
            count=spec.num_decoder_layers,
            encoder_len=ctx.seq_len,
            encoder_out=enc.norm_out,
        )
        cross = dec.layers[0].graph.shared if dec.layers else ()
        dec.cross_input = cross[0] if cross else None
        return Stacks([enc, dec], [(0, 1)], dctx)

    def _encoder_layer(
        self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool
    ) -> LayerGraph:
        return _t5_layer(
            spec,
            ctx,
            input_requires_grad=input_requires_grad,
            decoder=False,
            encoder_len=ctx.seq_len,
        )

    def _decoder_layer(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        *,
        input_requires_grad: bool,
        encoder_len: int,
        encoder_out: Tensor,
    ) -> LayerGraph:
        return _t5_layer(
            spec,
            ctx,
            input_requires_grad=input_requires_grad,
            decoder=True,
            encoder_len=encoder_len,
            encoder_out=encoder_out,
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
        decoder lookup's in the middle, the encoder's last; an untied head leaves the decoder's
        first, waiting in the temporaries.
        """
        from memplan.analytic.blocks import dropout
        from memplan.analytic.head import token_embedding

        if not spec.is_encoder_decoder:
            tie = "last" if spec.tie_word_embeddings else ""
        elif stack == "decoder":
            tie = "middle" if spec.tie_word_embeddings else "first"
        else:
            tie = "last"
        x = token_embedding(spec, ctx, seg, output_requires_grad=output_requires_grad, tie=tie)
        return dropout(seg, ctx, x, spec.hidden_dropout, "embed_dropout")

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        from memplan.analytic.blocks import dropout, rms_norm

        normed = rms_norm(seg, ctx, x, "final_layer_norm", spec.hidden_size)
        return dropout(seg, ctx, normed, spec.hidden_dropout, "final_dropout")

    def head(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
    ) -> tuple[Tensor, Tensor]:
        """The tied LM head and CrossEntropyLoss on the logits in their own dtype."""
        from memplan.analytic.head import cross_entropy, lm_head

        head_in = x
        if self.layout(spec).scale_decoder_outputs:  # * d_model**-0.5
            head_in = seg.op("scale_decoder_outputs", [x], x.numel, x.dtype)
        logits = lm_head(spec, ctx, head_in, seg)
        return cross_entropy(ctx, seg, logits, x, shifted_fp32=False), logits

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


def _t5_layer(
    spec: ModelSpec,
    ctx: StepContext,
    *,
    input_requires_grad: bool,
    decoder: bool,
    encoder_len: int,
    encoder_out: Tensor | None = None,
) -> LayerGraph:
    """T5Block: pre-RMSNorm self-attention (+ cross-attention in the decoder) and MLP.

    T5 adds a relative position bias to unscaled scores, so attention runs the eager path;
    dropout follows every branch.
    """
    from memplan.analytic.blocks import (
        LinearSpec,
        activation,
        attention_core,
        dropout,
        linear,
        residual_add,
        rms_norm,
    )
    from memplan.analytic.graph import Segment
    from memplan.analytic.layers import LayerGraph, qkv_projections, self_attention

    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads = spec.num_attention_heads // tp
    inner = heads * spec.head_dim
    p = spec.hidden_dropout
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    hn = rms_norm(seg, ctx, x, "layer.0.layer_norm", h)
    q, k, v = qkv_projections(
        seg, ctx, spec, hn, names=("SelfAttention.q", "SelfAttention.k", "SelfAttention.v")
    )
    o = self_attention(
        seg,
        ctx,
        spec,
        (q, k, v),
        LinearSpec("SelfAttention.o", inner, h, "o", bias=False),
        heads=heads,
        kv_heads=heads,
        label="SelfAttention",
        dropout_p=spec.attention_dropout,
        eager_only=True,
    )
    o = dropout(seg, ctx, o, p, "layer.0.dropout")
    o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
    hidden = residual_add(seg, x, o, "layer.0.residual")
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
        cn = rms_norm(seg, ctx, hidden, "layer.1.layer_norm", h)
        cq = linear(seg, ctx, cn, LinearSpec("EncDecAttention.q", h, inner, "q", bias=False))
        ck = linear(seg, ctx, enc, LinearSpec("EncDecAttention.k", h, inner, "k", bias=False))
        cv = linear(seg, ctx, enc, LinearSpec("EncDecAttention.v", h, inner, "v", bias=False))
        ca = attention_core(
            seg,
            ctx,
            cq,
            ck,
            cv,
            num_heads=heads,
            num_kv_heads=heads,
            label="EncDecAttention",
            kv_len=encoder_len,
            dropout_p=spec.attention_dropout,
            eager_only=True,
        )
        co = dropout(
            seg,
            ctx,
            linear(seg, ctx, ca, LinearSpec("EncDecAttention.o", inner, h, "o", bias=False)),
            p,
            "layer.1.dropout",
        )
        hidden = residual_add(seg, hidden, co, "layer.1.residual")
    fn = rms_norm(seg, ctx, hidden, "layer.-1.layer_norm", h)
    i = spec.intermediate_size // tp
    if spec.gated_mlp:  # T5DenseGatedActDense: act(wi_0 x) * wi_1 x
        g = linear(seg, ctx, fn, LinearSpec("DenseReluDense.wi_0", h, i, "gate", bias=False))
        a = activation(seg, g, spec.hidden_act, "DenseReluDense.act")
        u = linear(seg, ctx, fn, LinearSpec("DenseReluDense.wi_1", h, i, "up", bias=False))
        mid = seg.op("DenseReluDense.mul", [a, u], a.numel, a.dtype, saves=[a, u])
    else:
        up = linear(seg, ctx, fn, LinearSpec("DenseReluDense.wi", h, i, "up", bias=False))
        mid = activation(seg, up, spec.hidden_act, "DenseReluDense.act")
    mid = dropout(seg, ctx, mid, p, "DenseReluDense.dropout")
    ff = linear(seg, ctx, mid, LinearSpec("DenseReluDense.wo", i, h, "down", bias=False))
    ff = ctx.method.branch_output(
        seg, ctx, dropout(seg, ctx, ff, p, "layer.-1.dropout"), "adapter_mlp"
    )
    out = residual_add(seg, hidden, ff, "layer.-1.residual")
    return LayerGraph(seg, x, out, shared)


FAMILY = T5()

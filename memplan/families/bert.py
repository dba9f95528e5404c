"""BERT (transformers ``modeling_bert``): a post-LayerNorm encoder with token-type embeddings;
its head (MLM, classification, ...) follows the class named in config.json 'architectures'."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config, Layout, ModelFamily

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import LayerGraph
    from memplan.architecture import Block, Params
    from memplan.dtypes import DType
    from memplan.specs.model import ModelSpec

# BERT classes (config.json 'architectures') -> (pooler, MLM head, extra linear head as
# (module name, outputs) or None; outputs 0 means the config's num_labels).
BERT_HEADS: Final[dict[str, tuple[bool, bool, tuple[str, int] | None]]] = {
    "BertForMaskedLM": (False, True, None),
    "BertLMHeadModel": (False, True, None),
    "BertForPreTraining": (True, True, ("cls.seq_relationship", 2)),
    "BertModel": (True, False, None),
    "BertForNextSentencePrediction": (True, False, ("cls.seq_relationship", 2)),
    "BertForSequenceClassification": (True, False, ("classifier", 0)),
    "BertForMultipleChoice": (True, False, ("classifier", 1)),
    "BertForTokenClassification": (False, False, ("classifier", 0)),
    "BertForQuestionAnswering": (False, False, ("qa_outputs", 2)),
}


class BertLayout(Layout):
    architecture: str = Field(
        default="BertForMaskedLM",
        description="transformers class laid out (its head), from config.json 'architectures'.",
    )
    type_vocab_size: PositiveInt = Field(
        default=2, description="Rows of the token-type (segment) embedding."
    )
    num_labels: PositiveInt = Field(
        default=2, description="Outputs of a classification head (num_labels or id2label)."
    )
    cross_attention: bool = Field(
        default=False, description="Layers attend to an encoder too (add_cross_attention)."
    )


def _num_labels(config: Config) -> int:
    """PretrainedConfig: num_labels, else len(id2label), else 2."""
    id2label = config.get("id2label")
    default = len(id2label) if isinstance(id2label, dict) and id2label else 2
    return cfg.integer(config, "num_labels", default)


class Bert(ModelFamily):
    name = "bert"
    own_loss = "a masked-LM head (transform, LayerNorm, decoder with bias) and unshifted labels"
    model_types = ("bert",)
    tiny_model = "tiny-bert"
    layout_type = BertLayout
    lora_roles = ("q", "v")  # query, value
    causal = False
    # BertSelfOutput and BertOutput: dense -> dropout -> LayerNorm(x + input); an adapter
    # adapts the dropout's output before the residual sum.
    adapter_hooks = ("attention.output.dropout", "output.dropout")

    def layout(self, spec: ModelSpec) -> BertLayout:
        assert isinstance(spec.layout, BertLayout)
        return spec.layout

    # -- config.json -------------------------------------------------------------------------
    def read_config(self, config: Config) -> dict[str, Any]:
        architecture = cfg.architecture_name(config, "BertForMaskedLM")
        if architecture not in BERT_HEADS:
            raise ValueError(
                f"unsupported architecture {architecture!r} (supported: {', '.join(BERT_HEADS)})"
            )
        hidden = cfg.integer(config, "hidden_size")
        heads = cfg.integer(config, "num_attention_heads")
        cross = cfg.flag(config, "add_cross_attention", False)
        if cross and not cfg.flag(config, "is_decoder", False):
            raise ValueError("add_cross_attention needs is_decoder=true (BertLayer)")
        return {
            "vocab_size": cfg.integer(config, "vocab_size"),
            "hidden_size": hidden,
            "num_encoder_layers": cfg.integer(config, "num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": cfg.head_width(hidden, heads),
            "intermediate_size": cfg.integer(config, "intermediate_size"),
            "gated_mlp": False,
            "hidden_act": cfg.text(config, "hidden_act", "gelu"),
            "norm_type": "layernorm",
            "attention_bias": True,
            "attention_out_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "position_embedding": "learned",
            "max_position_embeddings": cfg.integer(config, "max_position_embeddings", 512),
            "hidden_dropout": cfg.fraction(config, "hidden_dropout_prob", 0.1),
            "attention_dropout": cfg.fraction(config, "attention_probs_dropout_prob", 0.1),
            "layout": {
                "architecture": architecture,
                "type_vocab_size": cfg.integer(config, "type_vocab_size", 2),
                "num_labels": _num_labels(config),
                "cross_attention": cross,
            },
        }

    def hf_class(self, config: Config) -> str:
        return str((config.get("architectures") or ["BertForMaskedLM"])[0])

    def buffers(self, spec: ModelSpec) -> tuple[tuple[str, int, DType], ...]:
        """BertEmbeddings' position_ids (an arange) and token_type_ids (zeros), int64 rows of
        max_position_embeddings."""
        from memplan.dtypes import DType

        rows = spec.max_position_embeddings
        return (
            ("embeddings.position_ids", rows, DType.INT64),
            ("embeddings.token_type_ids", rows, DType.INT64),
        )

    # -- parameters ---------------------------------------------------------------------------
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        """Word + position + token-type embeddings, post-LN encoder layers, class heads."""
        from memplan.architecture import (
            Block,
            linear_params,
            norm_params,
            table_param,
            token_embedding_param,
        )

        h, i = spec.hidden_size, spec.intermediate_size
        layout = self.layout(spec)
        layer = self._attention_params(spec, "attention")
        if layout.cross_attention:
            layer += self._attention_params(spec, "crossattention")
        layer += [
            *linear_params("intermediate.dense", i, h, "up", bias=True),
            *linear_params("output.dense", h, i, "down", bias=True),
            *norm_params("output.LayerNorm", h, with_bias=True),
        ]
        embeddings = (
            token_embedding_param("embeddings.word_embeddings", spec),
            table_param("embeddings.position_embeddings", spec.max_position_embeddings, h),
            table_param("embeddings.token_type_embeddings", layout.type_vocab_size, h),
            *norm_params("embeddings.LayerNorm", h, with_bias=True),
        )
        return (
            Block("embeddings", embeddings),
            Block("encoder_layer", tuple(layer), repeat=spec.num_encoder_layers),
            *self._head_blocks(spec),
        )

    def _attention_params(self, spec: ModelSpec, prefix: str) -> Params:
        from memplan.architecture import attention_params, norm_params

        names = ("self.query", "self.key", "self.value", "output.dense")
        return [
            *attention_params(spec, prefix, names),
            *norm_params(f"{prefix}.output.LayerNorm", spec.hidden_size, with_bias=True),
        ]

    def _head_blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        """Pooler, MLM head (decoder tied to the word embedding) and classifier of the class."""
        from memplan.architecture import (
            Block,
            ParamKind,
            ParamTensor,
            linear_params,
            norm_params,
            table_param,
        )

        h = spec.hidden_size
        layout = self.layout(spec)
        pooler, mlm, extra = BERT_HEADS[layout.architecture]
        blocks: list[Block] = []
        if pooler:
            blocks.append(
                Block("pooler", tuple(linear_params("pooler.dense", h, h, None, bias=True)))
            )
        if mlm:
            head = [
                *linear_params("cls.predictions.transform.dense", h, h, None, bias=True),
                *norm_params("cls.predictions.transform.LayerNorm", h, with_bias=True),
                ParamTensor("cls.predictions.bias", (spec.vocab_size,), ParamKind.BIAS),
            ]
            # BertForMaskedLM._tied_weights_keys: decoder.weight -> word embedding and
            # decoder.bias -> predictions.bias; tie_word_embeddings=False unties both.
            if not spec.tie_word_embeddings:
                head += [
                    table_param("cls.predictions.decoder", spec.vocab_size, h, ParamKind.EMBEDDING),
                    ParamTensor("cls.predictions.decoder.bias", (spec.vocab_size,), ParamKind.BIAS),
                ]
            blocks.append(Block("mlm_head", tuple(head)))
        if extra is not None:
            name, outputs = extra
            outputs = outputs or layout.num_labels
            blocks.append(
                Block("classifier", tuple(linear_params(name, outputs, h, None, bias=True)))
            )
        return tuple(blocks)

    # -- the step ------------------------------------------------------------------------------
    def layer(self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
        return _bert_layer(spec, ctx, input_requires_grad=input_requires_grad)

    def embedding(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        seg: Segment,
        *,
        output_requires_grad: bool,
        stack: str = "model",
    ) -> Tensor:
        """BertEmbeddings: word + token-type + position lookups, LayerNorm, dropout.

        The token-type ids are the registered buffer gathered at the positions (one int64 row,
        expanded over the batch), saved by the lookup when its table trains; the position ids
        are a view of their buffer. The lookups and the LayerNorm's output are locals until
        BertEmbeddings returns.
        """
        from memplan.analytic.blocks import dropout, layer_norm, residual_add
        from memplan.analytic.head import table_grad, token_embedding
        from memplan.dtypes import DType

        h, trainable = spec.hidden_size, ctx.trains_embedding
        words = token_embedding(spec, ctx, seg, output_requires_grad=output_requires_grad)
        type_rows = self.layout(spec).type_vocab_size
        type_ids = seg.op("token_type_ids", [], ctx.seq_len, DType.INT64, requires_grad=False)
        types = seg.op(
            "token_type_embeddings",
            [type_ids],
            ctx.num_tokens * h,
            ctx.weight_dtype,
            saves=[type_ids],
            param_grads=[table_grad(ctx, "token_type", type_rows * h, trainable=trainable)],
            requires_grad=trainable,
        )
        x = residual_add(seg, words, types, "add_token_types")
        pos = seg.op(
            "position_embeddings",
            [],
            ctx.seq_len * h,
            ctx.weight_dtype,
            param_grads=[
                table_grad(ctx, "position", spec.max_position_embeddings * h, trainable=trainable)
            ],
            requires_grad=trainable,
        )
        x = residual_add(seg, x, pos, "add_positions")
        normed = layer_norm(seg, ctx, x, "LayerNorm", h)
        seg.model_locals.clear()  # BertEmbeddings' locals end with it
        x = dropout(seg, ctx, normed, spec.hidden_dropout, "embed_dropout")
        seg.hold(words, type_ids, types, pos, normed, label="embeddings.locals")
        seg.model_locals.append(x)  # BertModel's `embedding_output`
        return x

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        """Post-LN layers have no norm after the last one; an MLM head's transform (dense,
        activation, LayerNorm: BertPredictionHeadTransform) runs here, before the decoder."""
        from memplan.analytic.blocks import LinearSpec, activation, layer_norm, linear

        if not BERT_HEADS[self.layout(spec).architecture][1]:
            return x
        h = spec.hidden_size
        dense = LinearSpec("cls.predictions.transform.dense", h, h, None, bias=True)
        t = linear(seg, ctx, x, dense)
        t = activation(
            seg, t, spec.hidden_act, "cls.predictions.transform.act", fp32_pow=ctx.cuda_autocast
        )
        return layer_norm(seg, ctx, t, "cls.predictions.transform.LayerNorm", h)

    def head(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
    ) -> tuple[Tensor, Tensor]:
        """The MLM decoder (tied to the word embedding, with its bias) and CrossEntropyLoss
        over every position; or a classification head."""
        from memplan.analytic.head import cross_entropy, lm_head

        if "Classification" in self.layout(spec).architecture:
            return self._classification_loss(spec, ctx, x, seg)
        logits = lm_head(spec, ctx, x, seg, bias=True)
        return cross_entropy(ctx, seg, logits, x, shifted_fp32=False), logits

    def _classification_loss(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
    ) -> tuple[Tensor, Tensor]:
        """BertForSequenceClassification: pooler (dense + tanh on [CLS]), dropout, classifier."""
        from memplan.analytic.blocks import LinearSpec, dropout, linear
        from memplan.dtypes import DType

        h, b = spec.hidden_size, ctx.batch
        labels = self.layout(spec).num_labels
        cls = seg.op("pooler.first_token", [x], b * h, x.dtype, passthrough_grad=False)
        pooler = LinearSpec(
            "pooler.dense", h, h, None, bias=True, quantizable=False, trainable=ctx.trains_embedding
        )
        pooled = linear(seg, ctx, cls, pooler)
        pooled = seg.op("pooler.tanh", [pooled], pooled.numel, pooled.dtype, saves_output=True)
        pooled = dropout(seg, ctx, pooled, spec.hidden_dropout, "dropout")
        classifier = LinearSpec(
            "classifier", h, labels, None, bias=True, quantizable=False, trainable=True
        )
        logits = linear(seg, ctx, pooled, classifier)
        logp = seg.op("log_softmax", [logits], logits.numel, logits.dtype, saves_output=True)
        return seg.op("nll_loss", [logp], 1, DType.FP32), logits


def _bert_layer(spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
    """BertLayer: post-LayerNorm self-attention and MLP with dropout after each branch.

    Python locals keep tensors past their last use: BertSelfAttention's query/key/value
    layers (the keys and values a cache update returned) until it returns, BertAttention's
    context until BertSelfOutput returns, each output module's branch (``hidden_states``)
    until its LayerNorm returns; the attention output, feed_forward_chunk's
    ``intermediate_output``, under eager attention the attention weights (BertLayer's ``_``),
    and the encoder loop's ``hidden_states`` (the layer's input) until the layer returns.
    """
    from memplan.analytic.blocks import (
        LinearSpec,
        activation,
        dropout,
        layer_norm,
        linear,
        residual_add,
    )
    from memplan.analytic.graph import Segment
    from memplan.analytic.layers import LayerGraph, attention_context, qkv_projections
    from memplan.specs.training import Attention

    seg = Segment("layer")
    tp = ctx.tensor_parallel_degree
    h, n = spec.hidden_size, ctx.num_tokens
    heads = spec.num_attention_heads // tp
    x = seg.input(n * h, ctx.activation_dtype, "layer.input", requires_grad=input_requires_grad)
    names = ("attention.self.query", "attention.self.key", "attention.self.value")
    q, k, v = qkv_projections(seg, ctx, spec, x, names=names)
    # .view(..., heads, head_dim).transpose(1, 2): (batch, heads, seq, head_dim) views.
    q, k, v = (
        seg.op(f"{t.label}.heads", [t], t.numel, t.dtype, view_of=t, passthrough_grad=True)
        for t in (q, k, v)
    )
    context = attention_context(
        seg,
        ctx,
        spec,
        (q, k, v),
        heads=heads,
        kv_heads=heads,
        label="attention",
        dropout_p=spec.attention_dropout,
        softmax_fp32=False,
        hold_qkv=True,  # BertSelfAttention's query/key/value layers
    )
    # eager_attention_forward returns the dropped-out probabilities (the product's left
    # operand) as the attention weights; SDPA returns none.
    weights = None
    if ctx.attention is Attention.EAGER:
        weights = next(op for op in reversed(seg.ops) if op.name == "attention.pv").inputs[0]
    dense = LinearSpec("attention.output.dense", heads * spec.head_dim, h, "o", bias=True)
    d = linear(seg, ctx, context, dense)
    o = dropout(seg, ctx, d, spec.hidden_dropout, "attention.output.dropout")
    # The dense output stays bound while the dropout module's forward hooks run.
    o = ctx.method.branch_output(seg, ctx, o, "adapter_attn")
    seg.hold(d, label="attention.output.dense.end")
    h1 = layer_norm(
        seg, ctx, residual_add(seg, o, x, "attention.residual"), "attention.output.LayerNorm", h
    )
    seg.hold(context, o, label="attention.locals")
    i = spec.intermediate_size // tp
    up = LinearSpec("intermediate.dense", h, i, "up", bias=True)
    inter = activation(
        seg, linear(seg, ctx, h1, up), spec.hidden_act, "mlp.act", fp32_pow=ctx.cuda_autocast
    )
    down = LinearSpec("output.dense", i, h, "down", bias=True)
    d = linear(seg, ctx, inter, down)
    m = dropout(seg, ctx, d, spec.hidden_dropout, "output.dropout")
    m = ctx.method.branch_output(seg, ctx, m, "adapter_mlp")
    seg.hold(d, label="output.dense.end")
    out = layer_norm(seg, ctx, residual_add(seg, m, h1, "output.residual"), "output.LayerNorm", h)
    held = [m, inter, h1, x] + ([weights] if weights is not None else [])
    seg.hold(*held, label="layer.locals")
    return LayerGraph(seg, x, out, ())


FAMILY = Bert()

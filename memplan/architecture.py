"""Parameter layout of a model: every parameter tensor, grouped into (repeated) blocks.

``architecture(spec)`` lists the tensors the Hugging Face implementation of ``spec.family``
registers as parameters, with their shapes, so that ``count_params`` equals
``sum(p.numel() for p in model.parameters())`` of the real model exactly (tied weights counted
once). The analytical model reads the same layout to size weights, quantization, LoRA adapters,
gradients, ZeRO-3 gather buffers and dequantization temporaries.

Conventions:

- Tensor names are the Hugging Face parameter names without the base-model prefix and layer
  index: ``self_attn.q_proj.weight`` inside a ``decoder_layer`` block, ``embed_tokens.weight``
  in the ``embeddings`` block.
- Linear weights are ``(out_features, in_features)`` like ``nn.Linear``. GPT-2's ``Conv1D``
  stores its weight transposed, ``(in_features, out_features)``; memplan lists it as
  ``(out_features, in_features)`` too, so every linear reads the same way (same numel).
- Layers are ``decoder_layer`` blocks (decoder-only models, T5's decoder with cross-attention)
  and ``encoder_layer`` blocks (BERT, T5's encoder); cross-attention linears carry
  ``EncDecAttention`` (T5) or ``crossattention`` (GPT-2, BERT) in their names.
- MoE experts are one tensor with ``copies`` = number of experts, as transformers >= 5 stores
  them (``mlp.experts.gate_up_proj`` of shape experts x 2*ffn x hidden).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from memplan._compat import StrEnum
from memplan.specs.model import Family, ModelSpec
from memplan.specs.training import LinearRole


class ParamKind(StrEnum):
    LINEAR = "linear"  # weight of a transformer-layer nn.Linear: quantizable, LoRA-targetable
    BIAS = "bias"
    NORM = "norm"  # LayerNorm / RMSNorm weight or bias
    EMBEDDING = "embedding"  # token embedding (and an untied LM head)
    POSITION = "position"  # learned position / token-type tables, T5 relative bias
    ROUTER = "router"  # MoE router (an nn.Linear kept unquantized by memplan)
    # nn.Linear outside the transformer layers with no LoRA role: BERT's pooler, MLM transform
    # and classifiers, OPT's project_in / project_out (bitsandbytes quantizes them).
    HEAD_LINEAR = "head_linear"


@dataclass(frozen=True, slots=True)
class ParamTensor:
    """One parameter tensor (or ``copies`` identical ones, e.g. MoE experts)."""

    name: str
    shape: tuple[int, ...]
    kind: ParamKind
    role: LinearRole | None = None
    copies: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def out_features(self) -> int:
        return self.shape[0]


@dataclass(frozen=True, slots=True)
class Block:
    """A group of parameters; ``repeat`` identical copies for transformer layers."""

    name: str
    params: tuple[ParamTensor, ...]
    repeat: int = 1

    @property
    def numel(self) -> int:
        return self.repeat * sum(p.numel for p in self.params)


@dataclass(frozen=True, slots=True)
class Architecture:
    spec: ModelSpec
    blocks: tuple[Block, ...]

    @property
    def num_params(self) -> int:
        return sum(b.numel for b in self.blocks)

    def tensors(self) -> Iterator[tuple[Block, ParamTensor]]:
        for block in self.blocks:
            for tensor in block.params:
                yield block, tensor

    def layer_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.name.endswith("layer"))


Params = list[ParamTensor]


# ---------------------------------------------------------------------------- shared pieces


def _linear(
    name: str, out_features: int, in_features: int, role: LinearRole | None, *, bias: bool
) -> Params:
    kind = ParamKind.LINEAR if role is not None else ParamKind.HEAD_LINEAR
    tensors = [ParamTensor(f"{name}.weight", (out_features, in_features), kind, role)]
    if bias:
        tensors.append(ParamTensor(f"{name}.bias", (out_features,), ParamKind.BIAS, role))
    return tensors


def _norm(name: str, size: int, *, with_bias: bool) -> Params:
    tensors = [ParamTensor(f"{name}.weight", (size,), ParamKind.NORM)]
    if with_bias:
        tensors.append(ParamTensor(f"{name}.bias", (size,), ParamKind.NORM))
    return tensors


def _table(name: str, rows: int, width: int, kind: ParamKind = ParamKind.POSITION) -> ParamTensor:
    return ParamTensor(f"{name}.weight", (rows, width), kind)


def _token_embedding(name: str, spec: ModelSpec, width: int | None = None) -> ParamTensor:
    return _table(name, spec.vocab_size, width or spec.hidden_size, ParamKind.EMBEDDING)


def _attention(spec: ModelSpec, prefix: str, names: tuple[str, str, str, str]) -> Params:
    """Separate q, k, v, o projections (heads * head_dim wide; K/V with the KV heads)."""
    h = spec.hidden_size
    q_out = spec.num_attention_heads * spec.head_dim
    kv_out = spec.num_key_value_heads * spec.head_dim
    q, k, v, o = (f"{prefix}.{n}" for n in names)
    bias, out_bias = spec.attention_bias, spec.attention_out_bias
    return [
        *_linear(q, q_out, h, "q", bias=bias),
        *_linear(k, kv_out, h, "k", bias=bias),
        *_linear(v, kv_out, h, "v", bias=bias),
        *_linear(o, h, q_out, "o", bias=out_bias),
    ]


def _fused_attention(spec: ModelSpec, qkv: str, out: str) -> Params:
    """One fused q/k/v projection (heads + 2 * kv_heads) * head_dim wide, then the output."""
    h = spec.hidden_size
    q_out = spec.num_attention_heads * spec.head_dim
    # Phi3Attention op_size, FalconAttention qkv_out_dim: (heads + 2 * kv_heads) * head_dim;
    # 3 * hidden for MHA (GPT-2, NeoX, BLOOM), hidden + 2 * head_dim for multi-query Falcon.
    qkv_out = q_out + 2 * spec.num_key_value_heads * spec.head_dim
    return [
        *_linear(qkv, qkv_out, h, "qkv", bias=spec.attention_bias),
        *_linear(out, h, q_out, "o", bias=spec.attention_out_bias),
    ]


def _gated_mlp(spec: ModelSpec, prefix: str, names: tuple[str, str, str]) -> Params:
    """SwiGLU / GeGLU: gate and up projections to the MLP width, down back to hidden."""
    h, i = spec.hidden_size, spec.intermediate_size
    gate, up, down = (f"{prefix}{n}" for n in names)
    return [
        *_linear(gate, i, h, "gate", bias=spec.mlp_bias),
        *_linear(up, i, h, "up", bias=spec.mlp_bias),
        *_linear(down, h, i, "down", bias=spec.mlp_bias),
    ]


def _mlp(spec: ModelSpec, up: str, down: str) -> Params:
    """Two-matrix MLP: up to the MLP width, activation, down back to hidden."""
    h, i = spec.hidden_size, spec.intermediate_size
    return [
        *_linear(up, i, h, "up", bias=spec.mlp_bias),
        *_linear(down, h, i, "down", bias=spec.mlp_bias),
    ]


def _lm_head(spec: ModelSpec, width: int | None = None) -> tuple[Block, ...]:
    """An untied LM head is its own vocab x hidden matrix (kept 16-bit under quantization)."""
    if spec.tie_word_embeddings:
        return ()
    head = _table("lm_head", spec.vocab_size, width or spec.hidden_size, ParamKind.EMBEDDING)
    return (Block("lm_head", (head,)),)


def _decoder_only(
    spec: ModelSpec, embeddings: Params, layer: Params, final_norm: Params
) -> tuple[Block, ...]:
    return (
        Block("embeddings", tuple(embeddings)),
        Block("decoder_layer", tuple(layer), repeat=spec.num_decoder_layers),
        Block("final_norm", tuple(final_norm)),
        *_lm_head(spec),
    )


# ---------------------------------------------------------------------------- families


def _llama_like(spec: ModelSpec) -> tuple[Block, ...]:
    """Llama, Mistral, Mixtral, Qwen2 (transformers modeling_llama and relatives)."""
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    layer = [
        *_attention(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        *_norm("input_layernorm", h, with_bias=False),
        *_norm("post_attention_layernorm", h, with_bias=False),
    ]
    if spec.is_moe:
        # MixtralSparseMoeBlock: router (MixtralTopKRouter.weight) plus experts stored as
        # 3-D parameters (MixtralExperts: gate_up_proj e x 2i x h, down_proj e x h x i).
        layer += [
            ParamTensor("mlp.gate.weight", (e, h), ParamKind.ROUTER, "router"),
            ParamTensor(
                "mlp.experts.gate_up_proj", (2 * i, h), ParamKind.LINEAR, "gate_up", copies=e
            ),
            ParamTensor("mlp.experts.down_proj", (h, i), ParamKind.LINEAR, "down", copies=e),
        ]
    else:
        layer += _gated_mlp(spec, "mlp.", ("gate_proj", "up_proj", "down_proj"))
    embeddings = [_token_embedding("embed_tokens", spec)]
    return _decoder_only(spec, embeddings, layer, _norm("norm", h, with_bias=False))


def _gemma2(spec: ModelSpec) -> tuple[Block, ...]:
    """Gemma2: Llama-like, with norms before and after both attention and MLP (four)."""
    h = spec.hidden_size
    norms = ("input", "post_attention", "pre_feedforward", "post_feedforward")
    layer = [
        *_attention(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        *_gated_mlp(spec, "mlp.", ("gate_proj", "up_proj", "down_proj")),
        *(t for n in norms for t in _norm(f"{n}_layernorm", h, with_bias=False)),
    ]
    embeddings = [_token_embedding("embed_tokens", spec)]
    return _decoder_only(spec, embeddings, layer, _norm("norm", h, with_bias=False))


def _phi3(spec: ModelSpec) -> tuple[Block, ...]:
    """Phi-3: fused qkv_proj and gate_up_proj (Phi3Attention, Phi3MLP)."""
    h, i = spec.hidden_size, spec.intermediate_size
    layer = [
        *_fused_attention(spec, "self_attn.qkv_proj", "self_attn.o_proj"),
        *_linear("mlp.gate_up_proj", 2 * i, h, "gate_up", bias=False),
        *_linear("mlp.down_proj", h, i, "down", bias=False),
        *_norm("input_layernorm", h, with_bias=False),
        *_norm("post_attention_layernorm", h, with_bias=False),
    ]
    embeddings = [_token_embedding("embed_tokens", spec)]
    return _decoder_only(spec, embeddings, layer, _norm("norm", h, with_bias=False))


def _gpt2(spec: ModelSpec) -> tuple[Block, ...]:
    """GPT-2: Conv1D projections (listed out x in), learned positions, tied head."""
    h = spec.hidden_size
    layer = [
        *_norm("ln_1", h, with_bias=True),
        *_fused_attention(spec, "attn.c_attn", "attn.c_proj"),
        *_norm("ln_2", h, with_bias=True),
        *_mlp(spec, "mlp.c_fc", "mlp.c_proj"),
    ]
    if spec.layout.get("cross_attention"):
        # GPT2Attention(is_cross_attention=True): q_attn for the queries, c_attn for k and v.
        layer += [
            *_linear("crossattention.c_attn", 2 * h, h, "qkv", bias=True),
            *_linear("crossattention.q_attn", h, h, "q", bias=True),
            *_linear("crossattention.c_proj", h, h, "o", bias=True),
            *_norm("ln_cross_attn", h, with_bias=True),
        ]
    embeddings = [_token_embedding("wte", spec), _table("wpe", spec.max_position_embeddings, h)]
    return _decoder_only(spec, embeddings, layer, _norm("ln_f", h, with_bias=True))


def _gpt_neox(spec: ModelSpec) -> tuple[Block, ...]:
    """GPT-NeoX / Pythia: fused query_key_value, two LayerNorms, untied lm_head."""
    h = spec.hidden_size
    layer = [
        *_norm("input_layernorm", h, with_bias=True),
        *_norm("post_attention_layernorm", h, with_bias=True),
        *_fused_attention(spec, "attention.query_key_value", "attention.dense"),
        *_mlp(spec, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ]
    embeddings = [_token_embedding("embed_in", spec)]
    return _decoder_only(spec, embeddings, layer, _norm("final_layer_norm", h, with_bias=True))


# FalconDecoderLayer norm names per ModelSpec.layout["falcon_layer_norms"].
_FALCON_NORMS: Final = {
    "input": ("input_layernorm",),
    "ln_attn+ln_mlp": ("ln_attn", "ln_mlp"),
    "input+post_attention": ("input_layernorm", "post_attention_layernorm"),
}


def _falcon(spec: ModelSpec) -> tuple[Block, ...]:
    """Falcon: fused query_key_value with multi-query or grouped KV heads."""
    h = spec.hidden_size
    norms = _FALCON_NORMS[str(spec.layout.get("falcon_layer_norms", "input"))]
    layer = [
        *_fused_attention(spec, "self_attention.query_key_value", "self_attention.dense"),
        *_mlp(spec, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        *(t for n in norms for t in _norm(n, h, with_bias=True)),
    ]
    embeddings = [_token_embedding("word_embeddings", spec)]
    return _decoder_only(spec, embeddings, layer, _norm("ln_f", h, with_bias=True))


def _bloom(spec: ModelSpec) -> tuple[Block, ...]:
    """BLOOM: ALiBi (no position table), a LayerNorm right after the token embedding."""
    h = spec.hidden_size
    layer = [
        *_norm("input_layernorm", h, with_bias=True),
        *_fused_attention(spec, "self_attention.query_key_value", "self_attention.dense"),
        *_norm("post_attention_layernorm", h, with_bias=True),
        *_mlp(spec, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ]
    embeddings = [
        _token_embedding("word_embeddings", spec),
        *_norm("word_embeddings_layernorm", h, with_bias=True),
    ]
    return _decoder_only(spec, embeddings, layer, _norm("ln_f", h, with_bias=True))


def _opt(spec: ModelSpec) -> tuple[Block, ...]:
    """OPT: learned positions (2 extra rows), optional project_in / project_out."""
    h = spec.hidden_size
    proj = int(spec.layout.get("word_embed_proj_dim", h))
    affine = bool(spec.layout.get("layer_norm_affine", True))

    def norm(name: str) -> Params:  # layer_norm_elementwise_affine=False: no parameters
        return _norm(name, h, with_bias=True) if affine else []

    layer = [
        *_attention(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
        *norm("self_attn_layer_norm"),
        *_mlp(spec, "fc1", "fc2"),
        *norm("final_layer_norm"),
    ]
    rows = spec.max_position_embeddings + int(spec.layout.get("position_offset", 2))
    embeddings = [_token_embedding("embed_tokens", spec, proj), _table("embed_positions", rows, h)]
    if proj != h:
        embeddings += [
            *_linear("project_in", h, proj, None, bias=False),
            *_linear("project_out", proj, h, None, bias=False),
        ]
    # OPTDecoder: a final LayerNorm only with do_layer_norm_before (not opt-350m).
    final = norm("final_layer_norm") if spec.layout.get("final_layer_norm", True) else []
    return (
        Block("embeddings", tuple(embeddings)),
        Block("decoder_layer", tuple(layer), repeat=spec.num_decoder_layers),
        *((Block("final_norm", tuple(final)),) if final else ()),
        *_lm_head(spec, proj),
    )


def _t5_mlp(spec: ModelSpec, prefix: str) -> Params:
    """T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0 gate, wi_1 up, wo)."""
    if spec.gated_mlp:
        return _gated_mlp(spec, f"{prefix}.DenseReluDense.", ("wi_0", "wi_1", "wo"))
    return _mlp(spec, f"{prefix}.DenseReluDense.wi", f"{prefix}.DenseReluDense.wo")


def _t5_stack(spec: ModelSpec, stack: str, num_layers: int) -> tuple[Block, ...]:
    """One T5 stack: relative bias (in block 0, shared), layers, final RMS norm."""
    h = spec.hidden_size
    qkvo = ("q", "k", "v", "o")
    layer = [
        *_attention(spec, "layer.0.SelfAttention", qkvo),
        *_norm("layer.0.layer_norm", h, with_bias=False),
    ]
    if stack == "decoder":
        layer += [
            *_attention(spec, "layer.1.EncDecAttention", qkvo),
            *_norm("layer.1.layer_norm", h, with_bias=False),
        ]
    ff = "layer.2" if stack == "decoder" else "layer.1"
    layer += [*_t5_mlp(spec, ff), *_norm(f"{ff}.layer_norm", h, with_bias=False)]
    # T5Attention(has_relative_attention_bias=(i == 0)): buckets x heads, used by every layer.
    buckets = int(spec.layout.get("relative_attention_num_buckets", 32))
    bias = _table(
        "block.0.layer.0.SelfAttention.relative_attention_bias", buckets, spec.num_attention_heads
    )
    return (
        Block(f"{stack}_relative_attention_bias", (bias,)),
        Block(f"{stack}_layer", tuple(layer), repeat=num_layers),
        Block(f"{stack}_final_norm", tuple(_norm("final_layer_norm", h, with_bias=False))),
    )


def _t5(spec: ModelSpec) -> tuple[Block, ...]:
    """T5 / mT5: shared embedding, encoder and decoder stacks; lm_head tied (transformers >= 5)."""
    blocks: tuple[Block, ...] = (Block("embeddings", (_token_embedding("shared", spec),)),)
    blocks += _t5_stack(spec, "encoder", spec.num_encoder_layers)
    if spec.num_decoder_layers:
        blocks += _t5_stack(spec, "decoder", spec.num_decoder_layers)
    return blocks + _lm_head(spec)


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


def _bert_attention(spec: ModelSpec, prefix: str) -> Params:
    h = spec.hidden_size
    return [
        *_attention(spec, prefix, ("self.query", "self.key", "self.value", "output.dense")),
        *_norm(f"{prefix}.output.LayerNorm", h, with_bias=True),
    ]


def _bert_heads(spec: ModelSpec) -> tuple[Block, ...]:
    """Pooler, MLM head (decoder tied to the word embedding) and classifier of the BERT class."""
    h = spec.hidden_size
    pooler, mlm, extra = BERT_HEADS[str(spec.layout.get("architecture", "BertForMaskedLM"))]
    blocks: list[Block] = []
    if pooler:
        blocks.append(Block("pooler", tuple(_linear("pooler.dense", h, h, None, bias=True))))
    if mlm:
        head = [
            *_linear("cls.predictions.transform.dense", h, h, None, bias=True),
            *_norm("cls.predictions.transform.LayerNorm", h, with_bias=True),
            ParamTensor("cls.predictions.bias", (spec.vocab_size,), ParamKind.BIAS),
        ]
        # BertForMaskedLM._tied_weights_keys: decoder.weight -> word embedding and decoder.bias
        # -> predictions.bias; tie_word_embeddings=False unties both.
        if not spec.tie_word_embeddings:
            head += [
                _table("cls.predictions.decoder", spec.vocab_size, h, ParamKind.EMBEDDING),
                ParamTensor("cls.predictions.decoder.bias", (spec.vocab_size,), ParamKind.BIAS),
            ]
        blocks.append(Block("mlm_head", tuple(head)))
    if extra is not None:
        name, outputs = extra
        outputs = outputs or int(spec.layout.get("num_labels", 2))
        blocks.append(Block("classifier", tuple(_linear(name, outputs, h, None, bias=True))))
    return tuple(blocks)


def _bert(spec: ModelSpec) -> tuple[Block, ...]:
    """BERT: word + position + token-type embeddings, post-LN encoder layers, class heads."""
    h, i = spec.hidden_size, spec.intermediate_size
    layer = _bert_attention(spec, "attention")
    if spec.layout.get("cross_attention"):
        layer += _bert_attention(spec, "crossattention")
    layer += [
        *_linear("intermediate.dense", i, h, "up", bias=True),
        *_linear("output.dense", h, i, "down", bias=True),
        *_norm("output.LayerNorm", h, with_bias=True),
    ]
    embeddings = (
        _token_embedding("embeddings.word_embeddings", spec),
        _table("embeddings.position_embeddings", spec.max_position_embeddings, h),
        _table("embeddings.token_type_embeddings", int(spec.layout.get("type_vocab_size", 2)), h),
        *_norm("embeddings.LayerNorm", h, with_bias=True),
    )
    return (
        Block("embeddings", embeddings),
        Block("encoder_layer", tuple(layer), repeat=spec.num_encoder_layers),
        *_bert_heads(spec),
    )


_LAYOUTS: Final[dict[Family, Callable[[ModelSpec], tuple[Block, ...]]]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "mixtral": _llama_like,
    "qwen2": _llama_like,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
    "bloom": _bloom,
    "opt": _opt,
    "t5": _t5,
    "bert": _bert,
}

# peft's default LoRA targets per family (peft.utils.constants
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), as memplan roles.
DEFAULT_LORA_ROLES: Final[dict[Family, tuple[LinearRole, ...]]] = {
    "llama": ("q", "v"),  # q_proj, v_proj
    "mistral": ("q", "v"),
    "mixtral": ("q", "v"),
    "qwen2": ("q", "v"),
    "gemma2": ("q", "v"),
    "opt": ("q", "v"),  # q_proj, v_proj
    "t5": ("q", "v"),  # q, v (t5 and mt5)
    "bert": ("q", "v"),  # query, value
    "gpt2": ("qkv",),  # c_attn
    "gpt_neox": ("qkv",),  # query_key_value
    "falcon": ("qkv",),  # query_key_value
    "bloom": ("qkv",),  # query_key_value
    # peft has no entry for phi3 (it asks for target_modules); memplan assumes the fused
    # qkv_proj, the counterpart of q_proj + v_proj, as for the other fused-attention families.
    "phi3": ("qkv",),
}


def architecture(spec: ModelSpec) -> Architecture:
    """The parameter layout of ``spec`` as the Hugging Face implementation registers it."""
    layout = _LAYOUTS.get(spec.family)
    if layout is None:
        raise NotImplementedError(f"no parameter layout for family {spec.family!r}")
    return Architecture(spec, layout(spec))


def count_params(spec: ModelSpec) -> int:
    """``sum(p.numel())`` of the model (tied parameters once).

    >>> from memplan.catalog import load_model
    >>> count_params(load_model("llama-2-7b"))
    6738415616
    """
    return architecture(spec).num_params


def _module(tensor: ParamTensor) -> str:
    return tensor.name.removesuffix(".weight")


def _matches(module: str, target: str) -> bool:
    # peft matches a target_modules entry by the module's full name or a dotted suffix of it
    # (peft.tuners.tuners_utils.check_target_module_exists).
    return module == target or module.endswith(f".{target}")


def _suffixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def lora_module_names(spec: ModelSpec) -> dict[LinearRole, str]:
    """Each role's Hugging Face module name, as a peft ``target_modules`` entry.

    The name is the shortest dotted suffix that peft's suffix matching selects exactly the
    role's modules with (``q_proj``; GPT-2's attention output ``attn.c_proj``, not the MLP's
    ``mlp.c_proj``). Where none exists, the first module's path inside its layer is given:
    BERT's down projection ``output.dense`` also matches ``attention.output.dense``, so
    targeting it alone needs a regular expression.

    >>> from memplan.catalog import load_model
    >>> lora_module_names(load_model("gpt2"))["qkv"]
    'c_attn'
    """
    arch = architecture(spec)
    linear_kinds = (ParamKind.LINEAR, ParamKind.ROUTER, ParamKind.HEAD_LINEAR)
    linears = [(t.role, _module(t)) for _, t in arch.tensors() if t.kind in linear_kinds]
    names: dict[LinearRole, str] = {}
    for role in dict.fromkeys(r for r, _ in linears if r is not None):
        own = [m for r, m in linears if r == role]
        others = [m for r, m in linears if r != role]

        def exact(target: str, own: list[str] = own, others: list[str] = others) -> bool:
            return all(_matches(m, target) for m in own) and not any(
                _matches(m, target) for m in others
            )

        candidates = [s for s in _suffixes(own[0]) if exact(s)]
        if not candidates:  # no suffix covers all of the role's modules without others
            candidates = [
                s for s in _suffixes(own[0]) if not any(_matches(m, s) for m in others)
            ] or [own[0]]
        names[role] = candidates[0]
    return names

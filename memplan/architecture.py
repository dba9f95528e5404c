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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from memplan._compat import StrEnum
from memplan.specs.model import ModelSpec
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
    # A weight of no nn.Linear or nn.Embedding: SigLIP's patch-embedding convolution, Gemma3's
    # projector matrix (an nn.Parameter used with torch.matmul); never quantized, never targeted.
    OTHER = "other"


# Megatron splits the output of column-parallel layers and the input of row-parallel ones: the
# attention output and MLP down projections (whose biases stay whole).
ROW_PARALLEL_ROLES: Final[tuple[LinearRole, ...]] = ("o", "down")


@dataclass(frozen=True, slots=True)
class ParamTensor:
    """One parameter tensor (or ``copies`` identical ones, e.g. MoE experts)."""

    name: str
    shape: tuple[int, ...]
    kind: ParamKind
    role: LinearRole | None = None
    copies: int = 1
    # False: bitsandbytes leaves it a plain nn.Linear (a model's _keep_in_fp32_modules).
    quantizable: bool = True
    # True: stored in fp32 whatever the load dtype (a model's _keep_in_fp32_modules_strict).
    keep_fp32: bool = False
    # False: tensor parallelism replicates it (MLA's kv_a_proj_with_mqa: every head reads the
    # whole latent).
    tp_split: bool = True
    # False: no op of a text-only step reads it (a vision tower): it may require grad, but it
    # never gets a .grad, so torch's optimizers make no state for it.
    in_step: bool = True

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


def linear_params(
    name: str, out_features: int, in_features: int, role: LinearRole | None, *, bias: bool
) -> Params:
    kind = ParamKind.LINEAR if role is not None else ParamKind.HEAD_LINEAR
    tensors = [ParamTensor(f"{name}.weight", (out_features, in_features), kind, role)]
    if bias:
        tensors.append(ParamTensor(f"{name}.bias", (out_features,), ParamKind.BIAS, role))
    return tensors


def norm_params(name: str, size: int, *, with_bias: bool) -> Params:
    tensors = [ParamTensor(f"{name}.weight", (size,), ParamKind.NORM)]
    if with_bias:
        tensors.append(ParamTensor(f"{name}.bias", (size,), ParamKind.NORM))
    return tensors


def table_param(
    name: str, rows: int, width: int, kind: ParamKind = ParamKind.POSITION
) -> ParamTensor:
    return ParamTensor(f"{name}.weight", (rows, width), kind)


def token_embedding_param(name: str, spec: ModelSpec, width: int | None = None) -> ParamTensor:
    return table_param(name, spec.vocab_size, width or spec.hidden_size, ParamKind.EMBEDDING)


def attention_params(spec: ModelSpec, prefix: str, names: tuple[str, str, str, str]) -> Params:
    """Separate q, k, v, o projections (heads * head_dim wide; K/V with the KV heads)."""
    h = spec.hidden_size
    q_out = spec.num_attention_heads * spec.head_dim
    kv_out = spec.num_key_value_heads * spec.head_dim
    q, k, v, o = (f"{prefix}.{n}" for n in names)
    bias, out_bias = spec.attention_bias, spec.attention_out_bias
    return [
        *linear_params(q, q_out, h, "q", bias=bias),
        *linear_params(k, kv_out, h, "k", bias=bias),
        *linear_params(v, kv_out, h, "v", bias=bias),
        *linear_params(o, h, q_out, "o", bias=out_bias),
    ]


def fused_attention_params(spec: ModelSpec, qkv: str, out: str) -> Params:
    """One fused q/k/v projection (heads + 2 * kv_heads) * head_dim wide, then the output."""
    h = spec.hidden_size
    q_out = spec.num_attention_heads * spec.head_dim
    # Phi3Attention op_size, FalconAttention qkv_out_dim: (heads + 2 * kv_heads) * head_dim;
    # 3 * hidden for MHA (GPT-2, NeoX, BLOOM), hidden + 2 * head_dim for multi-query Falcon.
    qkv_out = q_out + 2 * spec.num_key_value_heads * spec.head_dim
    return [
        *linear_params(qkv, qkv_out, h, "qkv", bias=spec.attention_bias),
        *linear_params(out, h, q_out, "o", bias=spec.attention_out_bias),
    ]


def gated_mlp_params(spec: ModelSpec, prefix: str, names: tuple[str, str, str]) -> Params:
    """SwiGLU / GeGLU: gate and up projections to the MLP width, down back to hidden."""
    h, i = spec.hidden_size, spec.intermediate_size
    gate, up, down = (f"{prefix}{n}" for n in names)
    return [
        *linear_params(gate, i, h, "gate", bias=spec.mlp_bias),
        *linear_params(up, i, h, "up", bias=spec.mlp_bias),
        *linear_params(down, h, i, "down", bias=spec.mlp_bias),
    ]


def mlp_params(spec: ModelSpec, up: str, down: str) -> Params:
    """Two-matrix MLP: up to the MLP width, activation, down back to hidden."""
    h, i = spec.hidden_size, spec.intermediate_size
    return [
        *linear_params(up, i, h, "up", bias=spec.mlp_bias),
        *linear_params(down, h, i, "down", bias=spec.mlp_bias),
    ]


def lm_head_blocks(spec: ModelSpec, width: int | None = None) -> tuple[Block, ...]:
    """An untied LM head is its own vocab x hidden matrix (kept 16-bit under quantization)."""
    if spec.tie_word_embeddings:
        return ()
    head = table_param("lm_head", spec.vocab_size, width or spec.hidden_size, ParamKind.EMBEDDING)
    return (Block("lm_head", (head,)),)


def decoder_only_blocks(
    spec: ModelSpec, embeddings: Params, layer: Params, final_norm: Params
) -> tuple[Block, ...]:
    return (
        Block("embeddings", tuple(embeddings)),
        Block("decoder_layer", tuple(layer), repeat=spec.num_decoder_layers),
        Block("final_norm", tuple(final_norm)),
        *lm_head_blocks(spec),
    )


def is_bias(tensor: ParamTensor) -> bool:
    """A bias term: of a linear layer, or a LayerNorm's (beta)."""
    return tensor.kind is ParamKind.BIAS or (
        tensor.kind is ParamKind.NORM and tensor.name.endswith(".bias")
    )


def architecture(spec: ModelSpec) -> Architecture:
    """The parameter layout of ``spec`` as the Hugging Face implementation registers it."""
    from memplan.families import family

    return Architecture(spec, family(spec.family).blocks(spec))


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


def lora_target_names(spec: ModelSpec) -> dict[LinearRole, tuple[str, ...]]:
    """Each role's Hugging Face module names, as peft ``target_modules`` entries.

    A name is the shortest dotted suffix that peft's suffix matching selects the role's
    modules with and no others (``q_proj``; GPT-2's attention output ``attn.c_proj``, not the
    MLP's ``mlp.c_proj``). A role whose modules have different names gets one per name
    (Gemma3's attention output: the text model's ``o_proj``, the vision tower's ``out_proj``).
    Where no suffix selects a role alone, the first module's path inside its layer is given:
    BERT's down projection ``output.dense`` also matches ``attention.output.dense``, so
    targeting it alone needs a regular expression.

    >>> from memplan.catalog import load_model
    >>> lora_target_names(load_model("gpt2"))["qkv"]
    ('c_attn',)
    """
    arch = architecture(spec)
    linear_kinds = (ParamKind.LINEAR, ParamKind.ROUTER, ParamKind.HEAD_LINEAR)
    linears = [(t.role, _module(t)) for _, t in arch.tensors() if t.kind in linear_kinds]
    names: dict[LinearRole, tuple[str, ...]] = {}
    for role in dict.fromkeys(r for r, _ in linears if r is not None):
        own = [m for r, m in linears if r == role]
        others = [m for r, m in linears if r != role]
        names[role] = _selecting(own, others) or _by_leaf(own, others) or (_nearest(own, others),)
    return names


def _selecting(own: list[str], others: list[str]) -> tuple[str, ...]:
    """The shortest suffix that selects every module of ``own`` and none of ``others``."""
    for suffix in _suffixes(own[0]):
        if all(_matches(m, suffix) for m in own) and not any(_matches(m, suffix) for m in others):
            return (suffix,)
    return ()


def _by_leaf(own: list[str], others: list[str]) -> tuple[str, ...]:
    """One selecting suffix per distinct module name of ``own`` (none if one has none)."""
    leaves = dict.fromkeys(m.rsplit(".", 1)[-1] for m in own)
    if len(leaves) < 2:
        return ()
    found: list[str] = []
    for leaf in leaves:
        group = [m for m in own if m.rsplit(".", 1)[-1] == leaf]
        chosen = _selecting(group, others)
        if not chosen:
            return ()
        found += chosen
    return tuple(found)


def _nearest(own: list[str], others: list[str]) -> str:
    """A suffix of the first module that selects no other role's modules (or its path)."""
    return next((s for s in _suffixes(own[0]) if not any(_matches(m, s) for m in others)), own[0])


def lora_module_names(spec: ModelSpec) -> dict[LinearRole, str]:
    """Each role's first target name (:func:`lora_target_names`).

    >>> from memplan.catalog import load_model
    >>> lora_module_names(load_model("gpt2"))["qkv"]
    'c_attn'
    """
    return {role: names[0] for role, names in lora_target_names(spec).items()}

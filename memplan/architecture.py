"""Parameter layout of a model: every parameter tensor, grouped into (repeated) blocks.

``architecture(spec)`` lists the tensors the Hugging Face implementation of ``spec.family``
registers as parameters, with their shapes, so that ``count_params`` equals
``sum(p.numel() for p in model.parameters())`` of the real model exactly (tied weights counted
once). The analytical model reads the same layout to size weights, quantization, LoRA adapters,
gradients, ZeRO-3 gather buffers and dequantization temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from memplan._compat import StrEnum
from typing import Final

from memplan.specs.model import Family, ModelSpec
from memplan.specs.training import LinearRole


class ParamKind(StrEnum):
    LINEAR = "linear"  # weight of an nn.Linear: quantizable, LoRA-targetable
    BIAS = "bias"
    NORM = "norm"  # LayerNorm / RMSNorm weight or bias
    EMBEDDING = "embedding"  # token embedding (and an untied LM head)
    POSITION = "position"  # learned position / token-type tables, T5 relative bias
    ROUTER = "router"  # MoE router (an nn.Linear kept unquantized by memplan)


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


def _linear(
    name: str, out_features: int, in_features: int, role: LinearRole | None, *, bias: bool
) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", (out_features, in_features), ParamKind.LINEAR, role)]
    if bias:
        tensors.append(ParamTensor(f"{name}.bias", (out_features,), ParamKind.BIAS, role))
    return tensors


def _norm(name: str, size: int, *, with_bias: bool) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", (size,), ParamKind.NORM)]
    if with_bias:
        tensors.append(ParamTensor(f"{name}.bias", (size,), ParamKind.NORM))
    return tensors


def _llama_like(spec: ModelSpec) -> tuple[Block, ...]:
    """Llama, Mistral, Mixtral, Qwen2 (transformers modeling_llama and relatives)."""
    h, i = spec.hidden_size, spec.intermediate_size
    q_out = spec.num_attention_heads * spec.head_dim
    kv_out = spec.num_key_value_heads * spec.head_dim
    layernorm = spec.norm_type == "layernorm"
    layer: list[ParamTensor] = [
        *_linear("self_attn.q_proj", q_out, h, "q", bias=spec.attention_bias),
        *_linear("self_attn.k_proj", kv_out, h, "k", bias=spec.attention_bias),
        *_linear("self_attn.v_proj", kv_out, h, "v", bias=spec.attention_bias),
        *_linear("self_attn.o_proj", h, q_out, "o", bias=spec.attention_out_bias),
        *_norm("input_layernorm", h, with_bias=layernorm),
        *_norm("post_attention_layernorm", h, with_bias=layernorm),
    ]
    if spec.is_moe:
        # MixtralSparseMoeBlock: a router plus num_experts SwiGLU experts.
        e = spec.num_experts
        layer += [
            ParamTensor("mlp.gate.weight", (e, h), ParamKind.ROUTER, "router"),
            ParamTensor("mlp.experts.gate_proj", (i, h), ParamKind.LINEAR, "gate", copies=e),
            ParamTensor("mlp.experts.up_proj", (i, h), ParamKind.LINEAR, "up", copies=e),
            ParamTensor("mlp.experts.down_proj", (h, i), ParamKind.LINEAR, "down", copies=e),
        ]
    else:
        layer += [
            *_linear("mlp.gate_proj", i, h, "gate", bias=spec.mlp_bias),
            *_linear("mlp.up_proj", i, h, "up", bias=spec.mlp_bias),
            *_linear("mlp.down_proj", h, i, "down", bias=spec.mlp_bias),
        ]
    return (
        Block("embeddings", (ParamTensor("embed_tokens.weight", (spec.vocab_size, h), ParamKind.EMBEDDING),)),
        Block("decoder_layer", tuple(layer), repeat=spec.num_decoder_layers),
        Block("final_norm", tuple(_norm("norm", h, with_bias=layernorm))),
        *_lm_head(spec),
    )


def _lm_head(spec: ModelSpec) -> tuple[Block, ...]:
    """An untied LM head is its own vocab x hidden matrix (kept 16-bit under quantization)."""
    if spec.tie_word_embeddings:
        return ()
    head = ParamTensor("lm_head.weight", (spec.vocab_size, spec.hidden_size), ParamKind.EMBEDDING)
    return (Block("lm_head", (head,)),)


_LAYOUTS: Final[dict[Family, Callable[[ModelSpec], tuple[Block, ...]]]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "mixtral": _llama_like,
    "qwen2": _llama_like,
}

# peft's default LoRA targets per family (peft.utils.constants
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), as memplan roles.
DEFAULT_LORA_ROLES: Final[dict[Family, tuple[LinearRole, ...]]] = {
    "llama": ("q", "v"),
    "mistral": ("q", "v"),
    "mixtral": ("q", "v"),
    "qwen2": ("q", "v"),
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

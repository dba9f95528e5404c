"""Read a Hugging Face ``config.json`` into a :class:`ModelSpec`, family by family."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from pydantic import ValidationError

from memplan.errors import MemplanError
from memplan.specs.model import Family, ModelSpec


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise MemplanError(f"{source}: config.json has no {key!r}")
    return config[key]


def _llama_like(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config."""
    heads = int(_require(config, "num_attention_heads", source))
    hidden = int(_require(config, "hidden_size", source))
    family = config["model_type"]
    return {
        "vocab_size": _require(config, "vocab_size", source),
        "hidden_size": hidden,
        "num_decoder_layers": _require(config, "num_hidden_layers", source),
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or hidden // heads,
        "intermediate_size": _require(config, "intermediate_size", source),
        "gated_mlp": True,
        "hidden_act": config.get("hidden_act", "silu"),
        "norm_type": "rmsnorm",
        # Qwen2 always has q/k/v biases and no o_proj bias (modeling_qwen2).
        "attention_bias": True if family == "qwen2" else bool(config.get("attention_bias", False)),
        "attention_out_bias": False if family == "qwen2" else bool(config.get("attention_bias", False)),
        "mlp_bias": bool(config.get("mlp_bias", False)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "position_embedding": "rope",
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "num_experts": config.get("num_local_experts", 0) or 0,
        "num_experts_per_token": config.get("num_experts_per_tok", 0) or 0,
        "attention_dropout": float(config.get("attention_dropout", 0.0) or 0.0),
    }


_READERS: Final[dict[str, tuple[Family, Callable[[Mapping[str, Any], str], dict[str, Any]]]]] = {
    "llama": ("llama", _llama_like),
    "mistral": ("mistral", _llama_like),
    "mixtral": ("mixtral", _llama_like),
    "qwen2": ("qwen2", _llama_like),
}

SUPPORTED_MODEL_TYPES: Final = tuple(sorted(_READERS))


def spec_from_hf_config(
    config: Mapping[str, Any], *, name: str, source: str | None = None, **extra: Any
) -> ModelSpec:
    """Build a ModelSpec from a parsed Hugging Face config.json.

    ``source`` names the file in error messages; ``extra`` adds catalog fields (num_params,
    hf_id). Raises MemplanError for unsupported model types and missing or invalid fields.
    """
    where = source or name
    model_type = config.get("model_type")
    if model_type not in _READERS:
        raise MemplanError(
            f"{where}: unsupported model_type {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    family, reader = _READERS[model_type]
    try:
        fields = reader(config, where)
        return ModelSpec(name=name, family=family, **fields, **extra)
    except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
        raise MemplanError(f"{where}: {_one_line(exc)}") from exc


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "config"
        return f"invalid {loc}: {first['msg']}"
    return str(exc).splitlines()[0]

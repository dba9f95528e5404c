"""Reading config.json fields the way the transformers configuration classes do.

Helpers shared by the families' ``read_config``: a field is required unless a default is given
(the configuration class's), aliases are tried in priority order, and a wrong type or value is
a ``ValueError`` with a short message naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

Config = Mapping[str, Any]
_MISSING: Final = object()


def get(config: Config, keys: str | tuple[str, ...], default: Any = _MISSING) -> tuple[str, Any]:
    """(key, value) of the first of ``keys`` present and not null (aliases in priority order)."""
    names = (keys,) if isinstance(keys, str) else keys
    for key in names:
        if config.get(key) is not None:
            return key, config[key]
    if default is _MISSING:
        raise ValueError(f"config.json has no {names[0]!r}")
    return names[0], default


def integer(
    config: Config, keys: str | tuple[str, ...], default: Any = _MISSING, *, minimum: int = 1
) -> int:
    """An integer size (JSON int, not bool) of at least ``minimum``."""
    key, value = get(config, keys, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{key} must be {kind}, got {value}")
    return value


def flag(config: Config, key: str, default: bool) -> bool:
    _, value = get(config, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def text(config: Config, keys: str | tuple[str, ...], default: str) -> str:
    key, value = get(config, keys, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def fraction(config: Config, keys: str | tuple[str, ...], default: float = 0.0) -> float:
    """A dropout probability in [0, 1)."""
    key, value = get(config, keys, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


def head_width(hidden: int, heads: int, explicit: int | None = None) -> int:
    """Width of one head: config head_dim when given, else hidden / heads (must divide)."""
    if explicit is not None:
        return explicit
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return hidden // heads


def architecture_name(config: Config, default: str) -> str:
    """The first class named in config.json 'architectures' (``default`` when absent)."""
    names = config.get("architectures") or [default]
    if not isinstance(names, list) or not isinstance(names[0], str):
        raise ValueError(f"architectures must be a list of class names, got {names!r}")
    return names[0]


def rope_decoder(
    config: Config, hidden: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, Any]:
    """Fields shared by the RMSNorm + RoPE + gated-MLP decoders (Llama and relatives)."""
    return {
        "vocab_size": integer(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": integer(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": integer(config, "intermediate_size"),
        "gated_mlp": True,
        "norm_type": "rmsnorm",
        "position_embedding": "rope",
        "attention_dropout": fraction(config, "attention_dropout"),
    }


def optional_integer(config: Config, key: str) -> int | None:
    """A positive integer, or None when the field is absent or null."""
    return integer(config, key) if config.get(key) is not None else None


def sliding_window(config: Config) -> int | None:
    """Sliding-window span in tokens (None: off, or use_sliding_window is false)."""
    if config.get("use_sliding_window") is False:
        return None
    return optional_integer(config, "sliding_window")

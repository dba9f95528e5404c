"""Read a Hugging Face ``config.json`` into a :class:`ModelSpec`, family by family.

Each reader mirrors the defaults of the transformers configuration class of its
``model_type`` (``LlamaConfig``, ``GPT2Config``, ...) for optional fields, and requires the
sizes that define the model (vocabulary, width, depth, heads, MLP width). A reader raises
``ValueError`` with a short message; :func:`spec_from_hf_config` turns it into a one-line
:class:`MemplanError` that names the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from pydantic import ValidationError

from memplan.architecture import BERT_HEADS
from memplan.errors import MemplanError
from memplan.specs.model import Family, ModelSpec

Config = Mapping[str, Any]
_MISSING: Final = object()


def _get(config: Config, keys: str | tuple[str, ...], default: Any = _MISSING) -> tuple[str, Any]:
    """(key, value) of the first of ``keys`` present and not null (aliases in priority order)."""
    names = (keys,) if isinstance(keys, str) else keys
    for key in names:
        if config.get(key) is not None:
            return key, config[key]
    if default is _MISSING:
        raise ValueError(f"config.json has no {names[0]!r}")
    return names[0], default


def _int(
    config: Config, keys: str | tuple[str, ...], default: Any = _MISSING, *, minimum: int = 1
) -> int:
    """An integer size (JSON int, not bool) of at least ``minimum``."""
    key, value = _get(config, keys, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{key} must be {kind}, got {value}")
    return value


def _flag(config: Config, key: str, default: bool) -> bool:
    _, value = _get(config, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _text(config: Config, keys: str | tuple[str, ...], default: str) -> str:
    key, value = _get(config, keys, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _fraction(config: Config, keys: str | tuple[str, ...], default: float = 0.0) -> float:
    """A dropout probability in [0, 1)."""
    key, value = _get(config, keys, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


def _head_dim(hidden: int, heads: int, explicit: int | None = None) -> int:
    """Width of one head: config head_dim when given, else hidden / heads (must divide)."""
    if explicit is not None:
        return explicit
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return hidden // heads


def _architecture(config: Config, default: str) -> str:
    """The first class named in config.json 'architectures' (``default`` when absent)."""
    names = config.get("architectures") or [default]
    if not isinstance(names, list) or not isinstance(names[0], str):
        raise ValueError(f"architectures must be a list of class names, got {names!r}")
    return names[0]


def _rope_decoder(
    config: Config, hidden: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, Any]:
    """Fields shared by the RMSNorm + RoPE + gated-MLP decoders (Llama and relatives)."""
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": _int(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": _int(config, "intermediate_size"),
        "gated_mlp": True,
        "norm_type": "rmsnorm",
        "position_embedding": "rope",
        "attention_dropout": _fraction(config, "attention_dropout"),
    }


def _sliding_window(config: Config) -> dict[str, int | bool | str]:
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False or window is None:
        return {}
    return {"sliding_window": _int(config, "sliding_window")}


# Optional-field defaults of each family's transformers config class (configuration_<type>.py).
_KV_HEADS_DEFAULT: Final = {"mistral": 8, "mixtral": 8, "qwen2": 32}
_MAX_POSITIONS_DEFAULT: Final = {
    "llama": 2048,
    "mistral": 131072,
    "mixtral": 131072,
    "qwen2": 32768,
}


def _llama_like(config: Config) -> dict[str, Any]:
    """LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config (modeling_llama and relatives)."""
    family = config["model_type"]
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads", _KV_HEADS_DEFAULT.get(family, heads))
    explicit_head_dim = _int(config, "head_dim") if config.get("head_dim") is not None else None
    # Llama: attention_bias on q, k, v and o; Qwen2: q, k, v always biased, o never;
    # Mistral and Mixtral: no biases (their modeling files hard-code bias=False).
    llama_bias = family == "llama" and _flag(config, "attention_bias", False)
    moe = family == "mixtral"
    return {
        **_rope_decoder(
            config, hidden, heads, kv_heads, _head_dim(hidden, heads, explicit_head_dim)
        ),
        "hidden_act": _text(config, "hidden_act", "silu"),
        "attention_bias": family == "qwen2" or llama_bias,
        "attention_out_bias": llama_bias,
        "mlp_bias": family == "llama" and _flag(config, "mlp_bias", False),
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", False),
        "max_position_embeddings": _int(
            config, "max_position_embeddings", _MAX_POSITIONS_DEFAULT[family]
        ),
        "num_experts": _int(config, "num_local_experts", 8) if moe else 0,
        "num_experts_per_token": _int(config, "num_experts_per_tok", 2) if moe else 0,
        "layout": _sliding_window(config) if family != "llama" else {},
    }


def _gemma2(config: Config) -> dict[str, Any]:
    """Gemma2Config: head_dim defaults to 256 (not hidden / heads); embeddings tied."""
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    bias = _flag(config, "attention_bias", False)
    layout: dict[str, int | bool | str] = {
        **_sliding_window(config),
        "query_pre_attn_scalar": _int(config, "query_pre_attn_scalar", 256),
        "attn_logit_softcapping": config.get("attn_logit_softcapping", 50.0) is not None,
        "final_logit_softcapping": config.get("final_logit_softcapping", 30.0) is not None,
    }
    return {
        **_rope_decoder(
            config,
            hidden,
            heads,
            _int(config, "num_key_value_heads", 4),
            _int(config, "head_dim", 256),
        ),
        "hidden_act": _text(config, ("hidden_activation", "hidden_act"), "gelu_pytorch_tanh"),
        "attention_bias": bias,
        "attention_out_bias": bias,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", True),
        "max_position_embeddings": _int(config, "max_position_embeddings", 8192),
        "layout": layout,
    }


def _phi3(config: Config) -> dict[str, Any]:
    """Phi3Config: fused qkv_proj and gate_up_proj, no biases."""
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    explicit_head_dim = _int(config, "head_dim") if config.get("head_dim") is not None else None
    return {
        **_rope_decoder(
            config,
            hidden,
            heads,
            _int(config, "num_key_value_heads", heads),
            _head_dim(hidden, heads, explicit_head_dim),
        ),
        "hidden_act": _text(config, "hidden_act", "silu"),
        "hidden_dropout": _fraction(config, "resid_pdrop"),
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", False),
        "max_position_embeddings": _int(config, "max_position_embeddings", 4096),
        "layout": _sliding_window(config),
    }


def _gpt2(config: Config) -> dict[str, Any]:
    """GPT2Config: n_embd / n_layer / n_head (hidden_size etc. accepted as aliases)."""
    hidden = _int(config, ("n_embd", "hidden_size"))
    heads = _int(config, ("n_head", "num_attention_heads"))
    # GPT2Block: inner_dim = n_inner if not None else 4 * hidden_size.
    inner = _int(config, "n_inner", 4 * hidden)
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": _int(config, ("n_layer", "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": _head_dim(hidden, heads),
        "intermediate_size": inner,
        "gated_mlp": False,
        "hidden_act": _text(config, "activation_function", "gelu_new"),
        "norm_type": "layernorm",
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", True),
        "position_embedding": "learned",
        "max_position_embeddings": _int(config, ("n_positions", "max_position_embeddings"), 1024),
        "hidden_dropout": _fraction(config, "resid_pdrop", 0.1),
        "attention_dropout": _fraction(config, "attn_pdrop", 0.1),
        "layout": {"cross_attention": _flag(config, "add_cross_attention", False)},
    }


def _rotary_fraction(config: Config) -> float:
    """GPT-NeoX rotary_pct (transformers >= 5: rope_parameters.partial_rotary_factor)."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("partial_rotary_factor") is not None:
        key, value = "partial_rotary_factor", rope["partial_rotary_factor"]
    else:
        key, value = _get(config, "rotary_pct", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    return float(value)


def _gpt_neox(config: Config) -> dict[str, Any]:
    """GPTNeoXConfig: fused query_key_value, parallel residual, partial rotary."""
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    head_dim = _head_dim(hidden, heads)
    bias = _flag(config, "attention_bias", True)
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": _int(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "intermediate_size": _int(config, "intermediate_size"),
        "gated_mlp": False,
        "hidden_act": _text(config, "hidden_act", "gelu"),
        "norm_type": "layernorm",
        "attention_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": True,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", False),
        "position_embedding": "rope",
        "max_position_embeddings": _int(config, "max_position_embeddings", 2048),
        "parallel_attention": _flag(config, "use_parallel_residual", True),
        "hidden_dropout": _fraction(config, "hidden_dropout"),
        "attention_dropout": _fraction(config, "attention_dropout"),
        "layout": {"rotary_dim": int(head_dim * _rotary_fraction(config))},
    }


def _falcon(config: Config) -> dict[str, Any]:
    """FalconConfig: multi-query (7B) or grouped KV heads (new_decoder_architecture, 40B/180B)."""
    hidden = _int(config, ("hidden_size", "n_embed"))
    heads = _int(config, "num_attention_heads")
    new_arch = _flag(config, "new_decoder_architecture", False)
    multi_query = _flag(config, "multi_query", True)
    parallel = _flag(config, "parallel_attn", True)
    # FalconAttention: new architecture -> num_kv_heads (default: all heads); else multi_query
    # -> one shared KV head; else one KV head per query head.
    kv_heads = _int(config, "num_kv_heads", heads) if new_arch else 1 if multi_query else heads
    # FalconDecoderLayer: two norms unless parallel attention with num_ln_in_parallel_attn == 1
    # (which new_decoder_architecture turns to 2 when unset).
    num_ln = _int(config, "num_ln_in_parallel_attn", 2 if new_arch else 1)
    norms = "input+post_attention" if not parallel else "ln_attn+ln_mlp" if num_ln == 2 else "input"
    bias = _flag(config, "bias", False)
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": _int(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _head_dim(hidden, heads),
        "intermediate_size": _int(config, "ffn_hidden_size", 4 * hidden),
        "gated_mlp": False,
        "hidden_act": _text(config, "activation", "gelu"),
        "norm_type": "layernorm",
        "attention_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", True),
        "position_embedding": "alibi" if _flag(config, "alibi", False) else "rope",
        "max_position_embeddings": _int(config, "max_position_embeddings", 2048),
        "parallel_attention": parallel or new_arch,
        "hidden_dropout": _fraction(config, "hidden_dropout"),
        "attention_dropout": _fraction(config, "attention_dropout"),
        "layout": {"falcon_layer_norms": norms},
    }


def _bloom(config: Config) -> dict[str, Any]:
    """BloomConfig: n_embed / n_layer / n_head aliases, ALiBi, MLP fixed at 4 * hidden."""
    hidden = _int(config, ("n_embed", "hidden_size"))
    heads = _int(config, ("num_attention_heads", "n_head"))
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": _int(config, ("n_layer", "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": _head_dim(hidden, heads),
        # BloomMLP: dense_h_to_4h = nn.Linear(hidden_size, 4 * hidden_size); n_inner is ignored.
        "intermediate_size": 4 * hidden,
        "gated_mlp": False,
        "hidden_act": "gelu_pytorch_tanh",  # BloomGelu: the tanh approximation
        "norm_type": "layernorm",
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", True),
        "position_embedding": "alibi",
        "max_position_embeddings": _int(config, "seq_length", 2048),
        "hidden_dropout": _fraction(config, "hidden_dropout"),
        "attention_dropout": _fraction(config, "attention_dropout"),
    }


def _opt(config: Config) -> dict[str, Any]:
    """OPTConfig: learned positions with an offset of 2, optional embedding projection."""
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    bias = _flag(config, "enable_bias", True)
    pre_ln = _flag(config, "do_layer_norm_before", True)
    layout: dict[str, int | bool | str] = {
        "word_embed_proj_dim": _int(config, "word_embed_proj_dim", hidden),
        "position_offset": 2,  # OPTLearnedPositionalEmbedding: offset = 2
        "do_layer_norm_before": pre_ln,
        "final_layer_norm": pre_ln and not _flag(config, "_remove_final_layer_norm", False),
        "layer_norm_affine": _flag(config, "layer_norm_elementwise_affine", True),
    }
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_decoder_layers": _int(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": _head_dim(hidden, heads),
        "intermediate_size": _int(config, "ffn_dim"),
        "gated_mlp": False,
        "hidden_act": _text(config, "activation_function", "relu"),
        "norm_type": "layernorm",
        "attention_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", True),
        "position_embedding": "learned",
        "max_position_embeddings": _int(config, "max_position_embeddings", 2048),
        "hidden_dropout": _fraction(config, "dropout", 0.1),
        "attention_dropout": _fraction(config, "attention_dropout"),
        "layout": layout,
    }


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


def _t5(config: Config) -> dict[str, Any]:
    """T5Config / MT5Config: feed_forward_proj '[gated-]act', d_kv independent of d_model."""
    mt5 = config["model_type"] == "mt5"
    default_class = "MT5ForConditionalGeneration" if mt5 else "T5ForConditionalGeneration"
    architecture = _architecture(config, default_class)
    if architecture not in T5_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r} (supported: {', '.join(T5_ARCHITECTURES)})"
        )
    proj = _text(config, "feed_forward_proj", "gated-gelu" if mt5 else "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}")
    encoder_layers = _int(config, ("num_layers", "num_hidden_layers"))
    decoder_layers = (
        _int(config, "num_decoder_layers", encoder_layers) if T5_ARCHITECTURES[architecture] else 0
    )
    layout: dict[str, int | bool | str] = {
        "architecture": architecture,
        "relative_attention_num_buckets": _int(config, "relative_attention_num_buckets", 32),
        "scale_decoder_outputs": config.get("tie_word_embeddings") is not False,
    }
    heads = _int(config, ("num_heads", "num_attention_heads"))
    dropout = _fraction(config, "dropout_rate", 0.1)
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": _int(config, ("d_model", "hidden_size")),
        "num_encoder_layers": encoder_layers,
        "num_decoder_layers": decoder_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": _int(config, ("d_kv", "head_dim")),
        "intermediate_size": _int(config, "d_ff"),
        "gated_mlp": parts[0] == "gated" and len(parts) == 2,
        # T5Config: 'gated-gelu' runs gelu_new (backwards compatibility).
        "hidden_act": "gelu_new" if proj == "gated-gelu" else parts[-1],
        "norm_type": "rmsnorm",  # T5LayerNorm: scale only, no mean subtraction
        # transformers >= 5 always ties lm_head to the shared embedding for T5 and mT5
        # (T5Config.__post_init__ forces tie_word_embeddings=True; False only turns off the
        # d_model**-0.5 output scaling of T5 v1.1, Flan-T5 and mT5).
        "tie_word_embeddings": True,
        "position_embedding": "relative",
        "max_position_embeddings": _int(config, "n_positions", 512),
        "hidden_dropout": dropout,
        "attention_dropout": dropout,
        "layout": layout,
    }


def _num_labels(config: Config) -> int:
    """PretrainedConfig: num_labels, else len(id2label), else 2."""
    id2label = config.get("id2label")
    return _int(
        config, "num_labels", len(id2label) if isinstance(id2label, dict) and id2label else 2
    )


def _bert(config: Config) -> dict[str, Any]:
    """BertConfig: post-LN encoder with token-type embeddings; head from 'architectures'."""
    architecture = _architecture(config, "BertForMaskedLM")
    if architecture not in BERT_HEADS:
        raise ValueError(
            f"unsupported architecture {architecture!r} (supported: {', '.join(BERT_HEADS)})"
        )
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    cross = _flag(config, "add_cross_attention", False)
    if cross and not _flag(config, "is_decoder", False):
        raise ValueError("add_cross_attention needs is_decoder=true (BertLayer)")
    return {
        "vocab_size": _int(config, "vocab_size"),
        "hidden_size": hidden,
        "num_encoder_layers": _int(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": _head_dim(hidden, heads),
        "intermediate_size": _int(config, "intermediate_size"),
        "gated_mlp": False,
        "hidden_act": _text(config, "hidden_act", "gelu"),
        "norm_type": "layernorm",
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings", True),
        "position_embedding": "learned",
        "max_position_embeddings": _int(config, "max_position_embeddings", 512),
        "hidden_dropout": _fraction(config, "hidden_dropout_prob", 0.1),
        "attention_dropout": _fraction(config, "attention_probs_dropout_prob", 0.1),
        "layout": {
            "architecture": architecture,
            "type_vocab_size": _int(config, "type_vocab_size", 2),
            "num_labels": _num_labels(config),
            "cross_attention": cross,
        },
    }


Reader = Callable[[Config], dict[str, Any]]

_READERS: Final[dict[str, tuple[Family, Reader]]] = {
    "llama": ("llama", _llama_like),
    "mistral": ("mistral", _llama_like),
    "mixtral": ("mixtral", _llama_like),
    "qwen2": ("qwen2", _llama_like),
    "gemma2": ("gemma2", _gemma2),
    "phi3": ("phi3", _phi3),
    "gpt2": ("gpt2", _gpt2),
    "gpt_neox": ("gpt_neox", _gpt_neox),
    "falcon": ("falcon", _falcon),
    "bloom": ("bloom", _bloom),
    "opt": ("opt", _opt),
    "t5": ("t5", _t5),
    "mt5": ("t5", _t5),
    "bert": ("bert", _bert),
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
        found = (
            "has no 'model_type'"
            if model_type is None
            else f"unsupported model_type {model_type!r}"
        )
        raise MemplanError(f"{where}: {found} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    family, reader = _READERS[model_type]
    try:
        fields = reader(config)
        return ModelSpec(name=name, family=family, **fields, **extra)
    except (TypeError, ValueError, AttributeError) as exc:  # ValidationError is a ValueError
        raise MemplanError(f"{where}: {_one_line(exc)}") from exc


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in first["loc"])
        return f"invalid {loc}: {message}" if loc else message
    return str(exc).splitlines()[0]

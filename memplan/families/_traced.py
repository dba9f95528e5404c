"""Architectures no family models: traced by ``simulate``, never planned analytically.

A config.json whose ``model_type`` no registered family reads can still be traced when the
installed transformers knows the architecture: the tracer builds the class named in
``architectures`` (else the model type's causal-LM class) and runs the step, and the answer is
the trace alone. ``plan`` refuses such a model in one line; this family is not in the registry
(:func:`memplan.families.families`), so nothing generated from the registry (the oracle, the
lists of supported families) sees it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from pydantic import Field

from memplan.errors import MemplanError
from memplan.families import _config as cfg
from memplan.families.base import Config, Layout, ModelFamily

if TYPE_CHECKING:
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec

# What a traced-only model can run: the methods that need no knowledge of its layers (LoRA
# takes peft's default targets for the model type; quantization swaps every nn.Linear).
TRACED_METHODS: Final = ("full", "frozen", "lora", "qlora")


class TracedLayout(Layout):
    config: dict[str, Any] = Field(
        description="The config.json the tracer builds the model from (no family reads it)."
    )


class TracedOnly(ModelFamily):
    name = "traced-only"
    model_types = ()
    tiny_model = ""
    layout_type = TracedLayout
    traced_only = True

    def read_config(self, config: Config) -> dict[str, Any]:
        """The ModelSpec fields transformers' common configuration names give (attribute_map
        resolves GPT-2's n_embd and the like), read through the installed transformers."""
        model_type = str(config.get("model_type"))
        try:
            from transformers import AutoConfig
        except ImportError:
            raise ValueError("tracing needs transformers: pip install 'memplan[hf]'") from None
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        from memplan.torchsim.runner import third_party_warnings_muted

        try:
            with third_party_warnings_muted():
                hf = AutoConfig.for_model(model_type, **fields)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"transformers does not know model_type {model_type!r}") from exc
        hidden = _positive(hf, "hidden_size")
        heads = _positive(hf, "num_attention_heads")
        layers = _positive(hf, "num_hidden_layers")
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        intermediate = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None)
        return {
            "vocab_size": _positive(hf, "vocab_size"),
            "hidden_size": hidden,
            "num_decoder_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads if heads % kv_heads == 0 else heads,
            "head_dim": getattr(hf, "head_dim", None) or max(1, hidden // heads),
            # Informational only (nothing analytical reads a traced-only spec): GPT-style
            # configs leave the MLP width unset for 4 x hidden.
            "intermediate_size": intermediate or 4 * hidden,
            "gated_mlp": False,
            # Named by the configuration's own fields (RMSNorm epsilon, rotary settings).
            "norm_type": "rmsnorm" if hasattr(hf, "rms_norm_eps") else "layernorm",
            "position_embedding": "rope" if _has_rope(hf) else "learned",
            "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
            "max_position_embeddings": getattr(hf, "max_position_embeddings", None) or 2048,
            "layout": {"config": dict(config)},
        }

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        raise MemplanError(
            f"{spec.name} is traced only: memplan does not lay out its parameters "
            "(--lora-targets takes all-linear, or leave it out for peft's defaults)"
        )

    def hf_class(self, config: Config) -> str:
        """The class config.json names, else the model type's causal-LM class."""
        return cfg.architecture_name(config, "AutoModelForCausalLM")

    def unsupported(self, spec: ModelSpec, method: str) -> str | None:
        if method in TRACED_METHODS:
            return None
        return (
            f"{spec.name} is traced only (no family models its model_type): method {method} "
            f"needs its layers described; traced methods: {', '.join(TRACED_METHODS)}"
        )


def _has_rope(hf: Any) -> bool:
    return any(hasattr(hf, k) for k in ("rope_theta", "rope_parameters", "rotary_dim"))


def _positive(hf: Any, name: str) -> int:
    value = getattr(hf, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"its configuration has no positive {name}")
    return value


FAMILY: Final = TracedOnly()

"""Qwen2 (transformers ``modeling_qwen2``): Llama's layout with biased q, k, v projections."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.llama import Llama
from memplan.families.mistral import WindowLayout

if TYPE_CHECKING:
    from memplan.specs.model import ModelSpec


class Qwen2(Llama):
    name = "qwen2"
    model_types = ("qwen2",)
    tiny_model = "tiny-qwen2"
    hf_model_class = "Qwen2ForCausalLM"
    layout_type = WindowLayout
    default_kv_heads = 32
    default_max_positions = 32768

    def biases(self, config: Config) -> tuple[bool, bool, bool]:
        return True, False, False  # Qwen2Attention: q, k, v always biased, o never

    def extra_fields(self, config: Config) -> dict[str, Any]:
        return {"layout": {"sliding_window": cfg.sliding_window(config)}}

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        # create_sliding_window_causal_mask in every layer when config.sliding_window is set.
        return self.sliding_window(spec)


FAMILY = Qwen2()

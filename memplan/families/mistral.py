"""Mistral (transformers ``modeling_mistral``): Llama's layout, no biases, sliding window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config, Layout
from memplan.families.llama import Llama

if TYPE_CHECKING:
    from memplan.specs.model import ModelSpec


class WindowLayout(Layout):
    sliding_window: PositiveInt | None = Field(
        default=None, description="Sliding-window attention span in tokens (None: full)."
    )


class Mistral(Llama):
    name = "mistral"
    model_types = ("mistral",)
    tiny_model = "tiny-mistral"
    hf_model_class = "MistralForCausalLM"
    layout_type = WindowLayout
    default_kv_heads = 8
    default_max_positions = 131072

    def biases(self, config: Config) -> tuple[bool, bool, bool]:
        return False, False, False  # MistralAttention / MistralMLP hard-code bias=False

    def extra_fields(self, config: Config) -> dict[str, Any]:
        return {"layout": {"sliding_window": cfg.sliding_window(config)}}

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        # create_sliding_window_causal_mask in every layer when config.sliding_window is set.
        return self.sliding_window(spec)


FAMILY = Mistral()

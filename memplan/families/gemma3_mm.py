"""Gemma 3 with vision (``modeling_gemma3``, Gemma3ForConditionalGeneration, ``gemma3``).

The 4B, 12B and 27B checkpoints are this class: a SigLIP vision tower (``SiglipVisionModel``:
a patch-embedding convolution, learned positions, pre-LN encoder layers with biased q/k/v/out
projections and an fc1/fc2 MLP, a final LayerNorm), a projector (``Gemma3MultiModalProjector``:
an RMSNorm and a vision-width x text-width matrix) and the Gemma3 text model, whose layers,
norms and head are the ``gemma3`` family's. ``AutoModelForCausalLM`` builds this class for a
``gemma3`` config (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), so text fine-tuning runs it too.

memplan models text-only batches (input_ids and labels, no pixel_values): Gemma3Model.forward
then never calls the vision tower or the projector, and its language model runs as
Gemma3ForCausalLM's would (Gemma3ForConditionalGeneration applies no final-logit soft-capping).
The vision weights sit in memory; they require grad under full fine-tuning (nothing freezes
them) but get no ``.grad``, so torch's optimizers make no state for them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Final

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.gemma3 import Gemma3, Gemma3Layout

if TYPE_CHECKING:
    from memplan.architecture import Block, ParamTensor
    from memplan.dtypes import DType
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import LinearRole, TrainingSetup

# Gemma3TextConfig defaults (the hub's 4B config.json leaves the sizes it shares with them out).
_TEXT_DEFAULTS: Final[dict[str, Any]] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
}
# SiglipVisionConfig defaults.
_VISION_DEFAULTS: Final[dict[str, Any]] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "vision_use_head": True,
}


class Gemma3MMLayout(Gemma3Layout):
    vision_hidden_size: PositiveInt = Field(default=768, description="SigLIP width.")
    vision_intermediate_size: PositiveInt = Field(default=3072, description="SigLIP MLP width.")
    vision_num_layers: PositiveInt = Field(default=12, description="SigLIP encoder layers.")
    vision_num_heads: PositiveInt = Field(default=12, description="SigLIP attention heads.")
    num_channels: PositiveInt = Field(default=3, description="Image channels (patch conv input).")
    image_size: PositiveInt = Field(default=224, description="Image side in pixels.")
    patch_size: PositiveInt = Field(default=16, description="Patch side in pixels.")
    mm_tokens_per_image: PositiveInt = Field(
        default=256, description="Soft tokens an image becomes (pooled patches)."
    )


class Gemma3MM(Gemma3):
    name = "gemma3_mm"
    model_types = ("gemma3",)
    tiny_model = "tiny-gemma3_mm"
    hf_model_class = "Gemma3ForConditionalGeneration"
    layout_type = Gemma3MMLayout
    # peft has no default for "gemma3" (get_peft_model asks for target_modules); memplan names
    # gemma3_text's q_proj, v_proj, which peft's suffix match also finds in the vision tower.
    lora_roles = ("q", "v")

    def layout(self, spec: ModelSpec) -> Gemma3MMLayout:
        assert isinstance(spec.layout, Gemma3MMLayout)
        return spec.layout

    def read_config(self, config: Config) -> dict[str, Any]:
        text = _section(config, "text_config", _TEXT_DEFAULTS)
        vision = _section(config, "vision_config", _VISION_DEFAULTS)
        if cfg.flag(vision, "vision_use_head", True):
            raise ValueError(
                "gemma3: vision_config.vision_use_head (SigLIP's attention-pooling head, which "
                "Gemma 3 does not use) is not modeled; Gemma 3 checkpoints set it false"
            )
        width = cfg.integer(vision, "hidden_size")
        heads = cfg.integer(vision, "num_attention_heads")
        if width % heads:  # SiglipAttention refuses it
            raise ValueError(
                f"vision_config: hidden_size {width} is not divisible by {heads} heads"
            )
        fields = super().read_config(text)
        return {
            **fields,
            # Gemma3ForConditionalGeneration ties lm_head to the embedding by the top-level flag.
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "layout": {
                **fields["layout"],
                # Gemma3ForConditionalGeneration.forward never soft-caps its logits.
                "final_logit_softcapping": False,
                "vision_hidden_size": width,
                "vision_intermediate_size": cfg.integer(vision, "intermediate_size"),
                "vision_num_layers": cfg.integer(vision, "num_hidden_layers"),
                "vision_num_heads": heads,
                "num_channels": cfg.integer(vision, "num_channels"),
                "image_size": cfg.integer(vision, "image_size"),
                "patch_size": cfg.integer(vision, "patch_size"),
                "mm_tokens_per_image": cfg.integer(config, "mm_tokens_per_image", 256),
            },
        }

    def hf_class(self, config: Config) -> str:
        return self.hf_model_class

    def num_patches(self, spec: ModelSpec) -> int:
        layout = self.layout(spec)
        return (layout.image_size // layout.patch_size) ** 2  # SiglipVisionEmbeddings

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        """The text model's blocks, then the vision tower's and the projector's (never run by
        a text-only step: ``in_step=False``; replicated under tensor parallelism, as
        Gemma3's tensor-parallel plan covers the language model only)."""
        from memplan.architecture import (
            Block,
            ParamKind,
            ParamTensor,
            linear_params,
            norm_params,
            table_param,
        )

        layout = self.layout(spec)
        d, i = layout.vision_hidden_size, layout.vision_intermediate_size
        p, c = layout.patch_size, layout.num_channels
        # SiglipVisionEmbeddings: Conv2d(channels, d, patch, stride=patch) and a learned position
        # per patch.
        embeddings = [
            ParamTensor("patch_embedding.weight", (d, c, p, p), ParamKind.OTHER),
            ParamTensor("patch_embedding.bias", (d,), ParamKind.BIAS),
            table_param("position_embedding", self.num_patches(spec), d),
        ]
        # SiglipEncoderLayer: layer_norm1, SiglipAttention (k, v, q, out_proj with biases),
        # layer_norm2, SiglipMLP (fc1, fc2 with biases).
        roles: tuple[tuple[LinearRole, str], ...] = (
            ("q", "q_proj"),
            ("k", "k_proj"),
            ("v", "v_proj"),
            ("o", "out_proj"),
        )
        layer = [
            *norm_params("layer_norm1", d, with_bias=True),
            *(
                t
                for role, name in roles
                for t in linear_params(f"self_attn.{name}", d, d, role, bias=True)
            ),
            *norm_params("layer_norm2", d, with_bias=True),
            *linear_params("mlp.fc1", i, d, "up", bias=True),
            *linear_params("mlp.fc2", d, i, "down", bias=True),
        ]
        # Gemma3MultiModalProjector: mm_soft_emb_norm (Gemma3RMSNorm over the vision width) and
        # mm_input_projection_weight (vision width x text width, an nn.Parameter).
        projector = [
            ParamTensor(
                "multi_modal_projector.mm_input_projection_weight",
                (d, spec.hidden_size),
                ParamKind.OTHER,
            ),
            *norm_params("multi_modal_projector.mm_soft_emb_norm", d, with_bias=False),
        ]
        vision = (
            Block("vision_tower.embeddings", _idle(embeddings)),
            Block("vision_tower.encoder_layer", _idle(layer), repeat=layout.vision_num_layers),
            Block(
                "vision_tower.post_layernorm",
                _idle(norm_params("post_layernorm", d, with_bias=True)),
            ),
            Block("projector", _idle(projector)),
        )
        return (*super().blocks(spec), *vision)

    def buffers(self, spec: ModelSpec) -> tuple[tuple[str, int, DType], ...]:
        from memplan.dtypes import DType

        # SiglipVisionEmbeddings.position_ids: arange(num_patches), int64, non-persistent.
        ids = ("vision_tower.embeddings.position_ids", self.num_patches(spec), DType.INT64)
        return (*super().buffers(spec), ids)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        from memplan.architecture import architecture

        idle = sum(b.numel for b in architecture(spec).blocks if not b.params[0].in_step)
        lines = [
            *super().assumptions(spec, setup),
            f"gemma3: text-only inputs (no pixel_values, no image tokens) are modeled: the "
            f"vision tower and projector ({idle:,} parameters) are weights in memory that never "
            "run (no vision activations); parameters that require grad there get no .grad, "
            "so no gradients and no torch.optim state (DeepSpeed ZeRO still gives them fp32 "
            "partitions)",
        ]
        if setup.tuning.uses_lora:
            lines.append(self._lora_line(spec, setup))
        return lines

    def _lora_line(self, spec: ModelSpec, setup: TrainingSetup) -> str:
        from memplan.architecture import ParamKind, architecture
        from memplan.methods.lora import lora_roles

        roles = lora_roles(spec, setup)
        tower = [
            (b, t)
            for b, t in architecture(spec).tensors()
            if not t.in_step and t.kind is ParamKind.LINEAR and t.role in roles
        ]
        # peft's lora_A (r x in) and lora_B (out x r) on each matched module.
        numel = sum(setup.lora_r * (t.in_features + t.out_features) * b.repeat for b, t in tower)
        modules = ", ".join(dict.fromkeys(t.name.split(".")[-2] for _, t in tower)) or "none"
        return (
            "gemma3: peft has no default LoRA targets for model_type gemma3 (get_peft_model "
            "asks for target_modules); the targets are named as for gemma3_text, and peft's "
            f"suffix match also takes the vision tower's modules of those names ({modules}): "
            f"{numel:,} adapter parameters there train but get no gradient from text-only steps"
        )


def _section(config: Config, key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """A nested configuration (text_config, vision_config) over its class's defaults."""
    section = config.get(key) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{key} must be a JSON object, got {section!r}")
    return {**defaults, **section}


def _idle(params: list[ParamTensor]) -> tuple[ParamTensor, ...]:
    """Vision-side tensors: never read by a text-only step, replicated across TP ranks."""
    return tuple(dataclasses.replace(t, in_step=False, tp_split=False) for t in params)


FAMILY = Gemma3MM()

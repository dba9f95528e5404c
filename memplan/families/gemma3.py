"""Gemma3 text models (transformers ``modeling_gemma3``, Gemma3ForCausalLM, ``gemma3_text``).

Gemma2's layer (four (1 + weight) RMSNorms in fp32, the sqrt(hidden) scaled embedding, a head
tied to it) plus Gemma3RMSNorms over head_dim on each query and key head (``q_norm``,
``k_norm``, after the transpose, before the rotary embedding). ``layer_types`` marks each layer
sliding-window or full attention (by default five sliding then one full,
``sliding_window_pattern`` 6); Gemma3TextModel builds one rotary table per layer type (local
base ``rope_local_base_freq``, global ``rope_theta``) and both masks (``create_causal_mask``,
``create_sliding_window_causal_mask``) before the layers. Gemma3Attention never passes
``attn_logit_softcapping`` to the attention function (no score soft-capping), so unlike Gemma2
it runs SDPA; final-logit soft-capping is off unless configured.

The multimodal ``gemma3`` model_type (Gemma3ForConditionalGeneration: a SigLIP vision tower and
a projector around this text model) is the ``gemma3_mm`` family, built on this one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from memplan.families import _config as cfg
from memplan.families.base import Config
from memplan.families.gemma2 import Gemma2, Gemma2Layout

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.layers import LayerGraph, RopeStyle
    from memplan.analytic.model_graph import StackBuilder, Stacks
    from memplan.architecture import Block
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import Attention, TrainingSetup

LayerType = Literal["sliding_attention", "full_attention"]

# Gemma3TextConfig defaults.
_DEFAULT_WINDOW = 4096  # Gemma3TextConfig.sliding_window
_DEFAULT_PATTERN = 6  # sliding_window_pattern: every 6th layer is full attention
_TABLES = ("sliding_attention", "full_attention")  # rotary tables, in layer-type order


class Gemma3Layout(Gemma2Layout):
    layer_types: tuple[LayerType, ...] = Field(
        default=(), description="Each layer's attention: sliding-window or full."
    )


class Gemma3(Gemma2):
    name = "gemma3"
    model_types = ("gemma3_text",)
    tiny_model = "tiny-gemma3"
    hf_model_class = "Gemma3ForCausalLM"
    layout_type = Gemma3Layout
    lora_roles = ("q", "v")  # peft: "gemma3_text": ["q_proj", "v_proj"]

    def layout(self, spec: ModelSpec) -> Gemma3Layout:
        assert isinstance(spec.layout, Gemma3Layout)
        return spec.layout

    def read_config(self, config: Config) -> dict[str, Any]:
        if cfg.flag(config, "use_bidirectional_attention", False):
            raise ValueError(
                "gemma3_text: use_bidirectional_attention (non-causal masks) is not modeled"
            )
        layers = cfg.integer(config, "num_hidden_layers")
        types = config.get("layer_types")
        if types is None:  # Gemma3TextConfig.__post_init__
            pattern = cfg.integer(config, "sliding_window_pattern", _DEFAULT_PATTERN)
            types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(layers)
            ]
        if len(types) != layers or not set(types) <= set(_TABLES):
            raise ValueError(f"gemma3_text: layer_types {types} do not fit {layers} layers")
        fields = super().read_config(config)
        window: int | None = _DEFAULT_WINDOW
        if "sliding_window" in config:
            window = cfg.optional_integer(config, "sliding_window")
        return {
            **fields,
            "max_position_embeddings": cfg.integer(config, "max_position_embeddings", 131072),
            "layout": {
                **fields["layout"],
                "sliding_window": window,
                # Gemma3Attention does not hand attn_logit_softcapping to the attention function.
                "attn_logit_softcapping": False,
                "final_logit_softcapping": config.get("final_logit_softcapping") is not None,
                "layer_types": tuple(types),
            },
        }

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import Block, norm_params

        blocks = list(super().blocks(spec))
        layer = next(i for i, b in enumerate(blocks) if b.name == "decoder_layer")
        d = spec.head_dim
        # Gemma3RMSNorm(head_dim): one weight per head dimension, shared by all heads.
        qk = (
            *norm_params("self_attn.q_norm", d, with_bias=False),
            *norm_params("self_attn.k_norm", d, with_bias=False),
        )
        b = blocks[layer]
        blocks[layer] = Block(b.name, (*b.params, *qk), repeat=b.repeat)
        return tuple(blocks)

    def rotary_tables(self, spec: ModelSpec) -> int:
        # Gemma3RotaryEmbedding: {layer_type}_inv_freq and _original_inv_freq per layer type.
        return len(set(self.layout(spec).layer_types))

    def layer_period(self, spec: ModelSpec) -> int:
        types = self.layout(spec).layer_types
        return next(
            p
            for p in range(1, len(types) + 1)
            if all(t == types[i % p] for i, t in enumerate(types))
        )

    def attention(self, requested: Attention) -> Attention:
        return requested  # _supports_sdpa = True: no soft-capped scores

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        # The sliding layers' mask (create_sliding_window_causal_mask); full layers get
        # is_causal=True unless a prefix forces a mask (see stacks).
        return self.sliding_window(spec)

    def style(self, spec: ModelSpec, table: int = 0) -> RopeStyle:
        from memplan.analytic.layers import RopeStyle

        present = set(self.layout(spec).layer_types)
        return RopeStyle(
            gemma_norms=True,
            head_qk_norm=True,
            # position_embeddings: one (cos, sin) per layer type present, sliding first.
            rope_tables=tuple(t for t in _TABLES if t in present),
            rope_table=table,
        )

    def layer(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        *,
        input_requires_grad: bool,
        layer_type: LayerType = "sliding_attention",
    ) -> LayerGraph:
        from memplan.analytic.layers import rope_decoder_layer

        present = [t for t in _TABLES if t in set(self.layout(spec).layer_types)]
        return rope_decoder_layer(
            spec,
            ctx,
            input_requires_grad=input_requires_grad,
            style=self.style(spec, present.index(layer_type)),
        )

    def stacks(self, spec: ModelSpec, ctx: StepContext, build: StackBuilder) -> Stacks:
        """One stack whose layers follow layer_types: sliding layers read the sliding-window
        mask (materialized for SDPA once the keys reach the window), full layers the causal one
        (SDPA: is_causal=True unless a prefix needs a mask)."""
        from memplan.analytic.model_graph import LayerPlan
        from memplan.specs.training import Attention

        types = self.layout(spec).layer_types
        full_ctx = dataclasses.replace(ctx, sdpa_mask=ctx.sdpa_mask and ctx.prefix_len > 0)
        contexts = {"sliding_attention": ctx, "full_attention": full_ctx}
        stacks = build.single(spec, ctx, self.layer, spec.num_layers)
        stack = stacks.stacks[0]
        graphs: dict[tuple[str, bool], LayerGraph] = {}
        rg = stack.embed_out.requires_grad
        plans = []
        for layer_type, plan in zip(types, stack.layers, strict=True):
            key = (layer_type, rg)
            if key not in graphs:
                graphs[key] = self.layer(
                    spec, contexts[layer_type], input_requires_grad=rg, layer_type=layer_type
                )
            graph = graphs[key]
            plans.append(LayerPlan(graph, plan.checkpointed))
            rg = graph.output.requires_grad
        stack.layers = plans
        if ctx.attention is Attention.SDPA and ctx.sdpa_mask and ctx.prefix_len > 0:
            stack.num_masks = 2  # the causal mask is materialized beside the sliding one
        return stacks

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        types = self.layout(spec).layer_types
        sliding = types.count("sliding_attention")
        return [
            f"gemma3_text: {sliding} of {len(types)} layers attend within a "
            f"{self.sliding_window(spec)}-token window, the others to the whole sequence; "
            "attn_logit_softcapping is not applied (Gemma3Attention does not pass it)"
        ]


FAMILY = Gemma3()

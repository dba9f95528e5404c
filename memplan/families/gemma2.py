"""Gemma2 (transformers ``modeling_gemma2``): a Llama-style decoder with four norms per layer.

Norms compute in fp32 and scale by (1 + weight); the embeddings are scaled by
sqrt(hidden_size); attention scores and output logits are soft-capped with tanh; the head is
tied to the embedding by default. transformers has no SDPA path for Gemma2
(``Gemma2PreTrainedModel._supports_sdpa = False``: SDPA cannot soft-cap), so a run that asks for
SDPA gets eager attention, and ``Gemma2Model.forward`` builds two masks for it (full and
sliding-window, ``masking_utils``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt

from memplan.families import _config as cfg
from memplan.families.base import Config, Layout
from memplan.families.llama import Llama
from memplan.specs.training import LossKind

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import RopeStyle
    from memplan.architecture import Block
    from memplan.dtypes import DType
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import Attention, TrainingSetup


class Gemma2Layout(Layout):
    sliding_window: PositiveInt | None = Field(
        default=None, description="Sliding-window span of the local layers, in tokens."
    )
    query_pre_attn_scalar: PositiveInt = Field(
        default=256, description="Attention scores are scaled by query_pre_attn_scalar**-0.5."
    )
    attn_logit_softcapping: bool = Field(
        default=True, description="Attention scores are soft-capped with tanh."
    )
    final_logit_softcapping: bool = Field(
        default=True, description="Output logits are soft-capped with tanh (a vocab-wide op)."
    )


class Gemma2(Llama):
    name = "gemma2"
    own_loss = "logit soft-capping (tanh on the whole logits)"
    model_types = ("gemma2",)
    tiny_model = "tiny-gemma2"
    hf_model_class = "Gemma2ForCausalLM"
    layout_type = Gemma2Layout
    num_eager_masks = 2  # create_causal_mask and create_sliding_window_causal_mask

    def layout(self, spec: ModelSpec) -> Gemma2Layout:
        assert isinstance(spec.layout, Gemma2Layout)
        return spec.layout

    def buffers(self, spec: ModelSpec) -> tuple[tuple[str, int, DType], ...]:
        """Gemma's scaled embedding registers its scale as a 0-d buffer
        (``nn.Buffer(torch.tensor(embed_scale))``, one element: one 512-byte block)."""
        from memplan.dtypes import DType

        return (("embed_tokens.embed_scale", 1, DType.FP32),)

    def read_config(self, config: Config) -> dict[str, Any]:
        """Gemma2Config: head_dim defaults to 256 (not hidden / heads); embeddings tied."""
        hidden = cfg.integer(config, "hidden_size")
        heads = cfg.integer(config, "num_attention_heads")
        bias = cfg.flag(config, "attention_bias", False)
        kv_heads = cfg.integer(config, "num_key_value_heads", 4)
        head_dim = cfg.integer(config, "head_dim", 256)
        return {
            **cfg.rope_decoder(config, hidden, heads, kv_heads, head_dim),
            "hidden_act": cfg.text(
                config, ("hidden_activation", "hidden_act"), "gelu_pytorch_tanh"
            ),
            "attention_bias": bias,
            "attention_out_bias": bias,
            "tie_word_embeddings": cfg.flag(config, "tie_word_embeddings", True),
            "max_position_embeddings": cfg.integer(config, "max_position_embeddings", 8192),
            "layout": {
                "sliding_window": cfg.sliding_window(config),
                "query_pre_attn_scalar": cfg.integer(config, "query_pre_attn_scalar", 256),
                "attn_logit_softcapping": config.get("attn_logit_softcapping", 50.0) is not None,
                "final_logit_softcapping": config.get("final_logit_softcapping", 30.0) is not None,
            },
        }

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        from memplan.architecture import (
            attention_params,
            decoder_only_blocks,
            gated_mlp_params,
            norm_params,
            token_embedding_param,
        )

        h = spec.hidden_size
        norms = ("input", "post_attention", "pre_feedforward", "post_feedforward")
        layer = [
            *attention_params(spec, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            *gated_mlp_params(spec, "mlp.", ("gate_proj", "up_proj", "down_proj")),
            *(t for n in norms for t in norm_params(f"{n}_layernorm", h, with_bias=False)),
        ]
        embeddings = [token_embedding_param("embed_tokens", spec)]
        return decoder_only_blocks(spec, embeddings, layer, norm_params("norm", h, with_bias=False))

    def attention(self, requested: Attention) -> Attention:
        """SDPA is refused (``_supports_sdpa = False``): the model trains with eager attention."""
        from memplan.specs.training import Attention

        return Attention.EAGER if requested is Attention.SDPA else requested

    def style(self, spec: ModelSpec) -> RopeStyle:
        from memplan.analytic.layers import RopeStyle

        return RopeStyle(gemma_norms=True, attn_softcap=self.layout(spec).attn_logit_softcapping)

    def embedding(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        seg: Segment,
        *,
        output_requires_grad: bool,
        stack: str = "model",
    ) -> Tensor:
        # Gemma2TextScaledWordEmbedding multiplies the lookup by sqrt(hidden_size) inside the
        # module: the scaled tensor is the model's `inputs_embeds` (and the output
        # enable_input_require_grads marks), the lookup a temporary.
        from memplan.analytic.head import token_embedding

        x = token_embedding(spec, ctx, seg, output_requires_grad=False)
        rg = output_requires_grad or x.requires_grad
        scaled = seg.op("embed_scale", [x], x.numel, x.dtype, requires_grad=rg)
        seg.model_locals[-1] = scaled
        return ctx.method.inputs_embeds(seg, ctx, scaled)

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        from memplan.analytic.blocks import rms_norm

        return rms_norm(seg, ctx, x, "norm", spec.hidden_size, gemma=True)

    def loss_refusal(self, spec: ModelSpec) -> str:
        return self.own_loss if self.layout(spec).final_logit_softcapping else ""

    def head(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
    ) -> tuple[Tensor, Tensor]:
        from memplan.analytic.head import causal_lm_loss, cross_entropy, lm_head

        # Refused with soft-capping (loss_refusal), as is DPO's fused head.
        if ctx.loss is not LossKind.FULL or ctx.fused_logprobs:
            return causal_lm_loss(spec, ctx, x, seg)
        logits = lm_head(spec, ctx, x, seg)
        if self.layout(spec).final_logit_softcapping:  # tanh(logits / cap) * cap
            scaled = seg.op("logits.softcap_div", [logits], logits.numel, logits.dtype)
            th = seg.op(
                "logits.softcap_tanh", [scaled], logits.numel, logits.dtype, saves_output=True
            )
            logits = seg.op("logits.softcap_mul", [th], logits.numel, logits.dtype)
        return cross_entropy(ctx, seg, logits, x, shifted_fp32=ctx.logits_fp32), logits

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        from memplan.specs.training import Attention

        if setup.attention is not Attention.SDPA:
            return []
        return [
            "gemma2: transformers has no SDPA path (Gemma2PreTrainedModel._supports_sdpa = False, "
            "for the soft-capped scores): attention=sdpa trains with eager attention, "
            "(batch, heads, seq, seq) scores and two masks"
        ]


FAMILY = Gemma2()

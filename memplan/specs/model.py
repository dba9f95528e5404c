"""ModelSpec: the architecture of a transformer, in Hugging Face config vocabulary."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    SerializeAsAny,
    model_validator,
)

from memplan.families.base import Layout

MAX_LAYERS: Final = 1024  # transformer blocks of one model

Family = str
"""A registered model family (:mod:`memplan.families`); by convention the Hugging Face
``model_type`` it reads (``mt5`` is read by family ``t5``)."""


class ModelSpec(BaseModel):
    """Shapes of a transformer that determine its parameters and activations.

    Field names follow Hugging Face ``config.json`` so a config maps onto a spec field by field;
    what is specific to one family (fused projections, extra norms, its typed ``layout``)
    lives in its module, :mod:`memplan.families`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Catalog name, e.g. 'llama-2-7b'.")
    family: Family = Field(description="Registered model family (memplan.families).")
    vocab_size: PositiveInt = Field(description="Rows of the token embedding (and LM head).")
    hidden_size: PositiveInt = Field(description="Width of the residual stream (d_model).")
    num_encoder_layers: NonNegativeInt = Field(
        default=0, description="Encoder blocks (BERT: all of them; T5: the encoder stack)."
    )
    num_decoder_layers: NonNegativeInt = Field(
        default=0, description="Decoder blocks (decoder-only models: all of them)."
    )
    num_attention_heads: PositiveInt = Field(description="Query heads per attention layer.")
    num_key_value_heads: PositiveInt = Field(
        description="Key/value heads (grouped-query attention); equals the query heads for MHA."
    )
    head_dim: PositiveInt = Field(description="Width of one attention head (T5: d_kv).")
    intermediate_size: PositiveInt = Field(description="Width of the MLP (d_ff) per expert.")
    gated_mlp: bool = Field(
        description="MLP has a gate projection (SwiGLU/GeGLU: gate, up, down) instead of two."
    )
    hidden_act: str = Field(default="silu", description="MLP activation (HF hidden_act name).")
    norm_type: Literal["rmsnorm", "layernorm"] = Field(
        description="RMSNorm (weight only) or LayerNorm (weight and bias)."
    )
    attention_bias: bool = Field(default=False, description="q, k, v projections have biases.")
    attention_out_bias: bool = Field(default=False, description="Output projection has a bias.")
    mlp_bias: bool = Field(default=False, description="MLP projections have biases.")
    tie_word_embeddings: bool = Field(
        default=False, description="LM head shares the token embedding matrix."
    )
    position_embedding: Literal["rope", "learned", "alibi", "relative"] = Field(
        default="rope", description="How positions enter: rotary, a learned table, ALiBi, T5 bias."
    )
    max_position_embeddings: PositiveInt = Field(
        default=2048, description="Rows of a learned position table; longest trained context."
    )
    num_experts: NonNegativeInt = Field(
        default=0, description="MoE experts per layer (0 = dense MLP)."
    )
    num_experts_per_token: NonNegativeInt = Field(
        default=0, description="Experts each token is routed to (top-k) in an MoE layer."
    )
    parallel_attention: bool = Field(
        default=False,
        description="Attention and MLP read the same input in parallel (GPT-NeoX, Falcon).",
    )
    hidden_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on residual branches during training."
    )
    attention_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities."
    )
    layout: SerializeAsAny[Layout] = Field(
        default_factory=Layout,
        description="Family-specific details read from config.json (OPT's word_embed_proj_dim, "
        "BERT's type_vocab_size, ...): an instance of the family's layout class; a dict is "
        "read into it.",
    )
    num_params: PositiveInt | None = Field(
        default=None,
        description="sum(p.numel()) of the real model built from this config (catalog record).",
    )
    hf_id: str | None = Field(default=None, description="Hugging Face repository it describes.")

    @property
    def num_layers(self) -> int:
        """All transformer blocks, encoder and decoder."""
        return self.num_encoder_layers + self.num_decoder_layers

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0 and self.num_decoder_layers > 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @model_validator(mode="before")
    @classmethod
    def _typed_layout(cls, data: Any) -> Any:
        """Read ``layout`` into the family's layout class (unknown keys are refused there)."""
        if not isinstance(data, dict):
            return data
        from memplan.errors import MemplanError
        from memplan.families import families, family

        try:
            fam = family(str(data.get("family")))
        except MemplanError:
            fam = None
        if fam is None:
            raise ValueError(
                f"unknown family {data.get('family')!r} (known: {', '.join(families())})"
            )
        layout = data.get("layout")
        if layout is None or isinstance(layout, dict):
            known = fam.layout_type.model_fields
            unknown = sorted(set(layout or {}) - set(known))
            if unknown:
                raise ValueError(
                    f"unknown layout key {unknown[0]!r} of family {fam.name} "
                    f"(known: {', '.join(known) or 'none'})"
                )
            data = {**data, "layout": fam.layout_type(**(layout or {}))}
        elif not isinstance(layout, fam.layout_type):
            raise ValueError(
                f"layout of family {fam.name} must be {fam.layout_type.__name__}, "
                f"got {type(layout).__name__}"
            )
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        if self.num_layers == 0:
            raise ValueError("num_encoder_layers + num_decoder_layers must be at least 1")
        if self.num_layers > MAX_LAYERS:
            raise ValueError(
                f"{self.num_layers} layers: memplan plans models of at most {MAX_LAYERS} layers "
                "(the deepest published ones have under 200)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"num_experts_per_token={self.num_experts_per_token} must be in "
                f"1..num_experts={self.num_experts}"
            )
        return self

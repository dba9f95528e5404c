"""ModelSpec: the architecture of a transformer, in Hugging Face config vocabulary."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

Family = Literal[
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt_neox",
    "falcon",
    "bloom",
    "opt",
    "t5",
    "bert",
]
"""Model families memplan can lay out; each maps 1:1 to a Hugging Face ``model_type``
(``mt5`` is read as family ``t5``: same modules, other defaults)."""

LAYOUT_KEYS: Final[dict[str, str]] = {
    # Parameter layout (read by memplan.architecture).
    "architecture": "Hugging Face class whose parameters are laid out (BERT and T5 heads), "
    "from config.json 'architectures'; decoder-only families are laid out as *ForCausalLM.",
    "num_labels": "Outputs of a BERT classification head (config num_labels or id2label).",
    "type_vocab_size": "Rows of BERT's token-type (segment) embedding.",
    "cross_attention": "GPT-2 / BERT layers attend to an encoder too (add_cross_attention).",
    "relative_attention_num_buckets": "Rows of T5's relative position bias, one table per stack "
    "(registered in layer 0, shared by all layers).",
    "word_embed_proj_dim": "OPT token-embedding width; project_in / project_out map it to "
    "hidden_size when they differ (opt-350m).",
    "position_offset": "Extra rows of a learned position table (OPT: 2, for padding).",
    "final_layer_norm": "OPT has a final LayerNorm (do_layer_norm_before and not "
    "_remove_final_layer_norm).",
    "layer_norm_affine": "OPT LayerNorms have weight and bias (layer_norm_elementwise_affine).",
    "falcon_layer_norms": "Falcon LayerNorms per layer: 'input' (parallel attention, falcon-7b), "
    "'ln_attn+ln_mlp' (new_decoder_architecture) or 'input+post_attention' (sequential).",
    # Activation-relevant details (no parameters of their own).
    "do_layer_norm_before": "OPT pre-LN (true) or post-LN (false, opt-350m).",
    "scale_decoder_outputs": "T5 scales decoder outputs by d_model**-0.5 before the tied LM head "
    "(config tie_word_embeddings not false: original T5).",
    "rotary_dim": "Dimensions per head that get rotary embedding (GPT-NeoX rotary_pct * head_dim).",
    "sliding_window": "Sliding-window attention span in tokens (Mistral, Gemma2, Phi-3, Qwen2).",
    "query_pre_attn_scalar": "Gemma2 scales attention scores by query_pre_attn_scalar**-0.5.",
    "attn_logit_softcapping": "Gemma2 soft-caps attention scores with tanh.",
    "final_logit_softcapping": "Gemma2 soft-caps the output logits with tanh (a vocab-wide op).",
}
"""Keys ``ModelSpec.layout`` may hold, with their meaning; any other key is rejected."""


class ModelSpec(BaseModel):
    """Shapes of a transformer that determine its parameters and activations.

    Field names follow Hugging Face ``config.json`` so a config maps onto a spec field by field;
    the family-specific layout quirks (fused projections, extra norms) live in
    :mod:`memplan.architecture`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Catalog name, e.g. 'llama-2-7b'.")
    family: Family = Field(description="Hugging Face model_type the layout follows.")
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
    layout: dict[str, int | bool | str] = Field(
        default_factory=dict,
        description="Family-specific details read from config.json (e.g. OPT's "
        "word_embed_proj_dim, BERT's type_vocab_size); keys and meanings in LAYOUT_KEYS.",
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

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        unknown = sorted(set(self.layout) - set(LAYOUT_KEYS))
        if unknown:
            raise ValueError(f"unknown layout key {unknown[0]!r} (known: {', '.join(LAYOUT_KEYS)})")
        if self.num_layers == 0:
            raise ValueError("num_encoder_layers + num_decoder_layers must be at least 1")
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

"""Minimal config.json of every supported model_type, and variants of each family's options.

Shared by the reader tests and the transformers cross-checks; counts are pinned in the tests.
"""

from __future__ import annotations

from typing import Any

_ROPE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_ROPE},
    "mistral": {"model_type": "mistral", **_ROPE, "num_key_value_heads": 2},
    "mixtral": {
        "model_type": "mixtral",
        **_ROPE,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen2": {"model_type": "qwen2", **_ROPE, "num_key_value_heads": 2},
    "qwen3": {"model_type": "qwen3", **_ROPE, "num_key_value_heads": 2, "head_dim": 16},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        **_ROPE,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    },
    "olmo2": {
        "model_type": "olmo2",
        **_ROPE,
        "num_key_value_heads": 2,
        "pad_token_id": 1,
        "eos_token_id": 2,
    },
    "gemma2": {"model_type": "gemma2", **_ROPE, "num_key_value_heads": 2, "head_dim": 16},
    "gemma3_text": {"model_type": "gemma3_text", **_ROPE, "num_key_value_heads": 2, "head_dim": 16},
    "gemma3": {
        "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", **_ROPE, "num_key_value_heads": 2},
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 7,
            "vision_use_head": False,
        },
        "mm_tokens_per_image": 4,
    },
    "phi3": {"model_type": "phi3", **_ROPE, "pad_token_id": 0},
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 128,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "gpt_neox": {"model_type": "gpt_neox", **_ROPE},
    "falcon": {
        "model_type": "falcon",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "bloom": {
        "model_type": "bloom",
        "vocab_size": 128,
        "n_embed": 64,
        "n_layer": 2,
        "num_attention_heads": 4,
    },
    "opt": {
        "model_type": "opt",
        "vocab_size": 128,
        "hidden_size": 64,
        "ffn_dim": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
    },
    "t5": {
        "model_type": "t5",
        "vocab_size": 128,
        "d_model": 64,
        "d_kv": 8,
        "d_ff": 96,
        "num_layers": 2,
        "num_heads": 4,
    },
    "mt5": {
        "model_type": "mt5",
        "vocab_size": 128,
        "d_model": 64,
        "d_kv": 8,
        "d_ff": 96,
        "num_layers": 2,
        "num_heads": 4,
    },
    "bert": {"model_type": "bert", **_ROPE, "max_position_embeddings": 32},
}

# (id, model_type, overrides): each family option that changes the parameter layout.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "llama-biases-head-dim",
        "llama",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "head_dim": 8,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
    ),
    (
        "mistral-default-kv-heads",
        "mistral",
        {"num_attention_heads": 8, "num_key_value_heads": None},
    ),
    ("mixtral-defaults", "mixtral", {"num_local_experts": None, "num_experts_per_tok": None}),
    ("qwen2-tied", "qwen2", {"tie_word_embeddings": True}),
    (
        "qwen3-defaults-bias-tied",
        "qwen3",
        {
            "num_attention_heads": 32,
            "num_key_value_heads": None,
            "head_dim": None,
            "attention_bias": True,
            "tie_word_embeddings": True,
        },
    ),
    (
        "olmo2-mha-bias-tied",
        "olmo2",
        {"num_key_value_heads": None, "attention_bias": True, "tie_word_embeddings": True},
    ),
    ("gemma2-bias-untied", "gemma2", {"attention_bias": True, "tie_word_embeddings": False}),
    (
        "qwen3_moe-defaults",
        "qwen3_moe",
        {"num_experts": None, "num_experts_per_tok": None, "head_dim": None},
    ),
    ("qwen3_moe-dense", "qwen3_moe", {"num_experts": 0}),
    ("gemma3-bias-untied", "gemma3_text", {"attention_bias": True, "tie_word_embeddings": False}),
    ("gemma3-vision-untied", "gemma3", {"tie_word_embeddings": False}),
    ("phi3-gqa", "phi3", {"num_key_value_heads": 2}),
    ("gpt2-n-inner", "gpt2", {"n_inner": 80}),
    ("gpt2-cross-attention", "gpt2", {"add_cross_attention": True}),
    ("gpt2-untied", "gpt2", {"tie_word_embeddings": False}),
    (
        "neox-sequential-no-bias",
        "gpt_neox",
        {"use_parallel_residual": False, "attention_bias": False, "tie_word_embeddings": True},
    ),
    (
        "falcon-new-arch",
        "falcon",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 96},
    ),
    (
        "falcon-new-arch-one-norm",
        "falcon",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
    ),
    (
        "falcon-sequential-mha-bias",
        "falcon",
        {"parallel_attn": False, "multi_query": False, "bias": True, "alibi": True},
    ),
    ("falcon-untied", "falcon", {"tie_word_embeddings": False}),
    (
        "bloom-hidden-size-names",
        "bloom",
        {
            "n_embed": None,
            "hidden_size": 32,
            "n_layer": None,
            "num_hidden_layers": 3,
            "num_attention_heads": None,
            "n_head": 2,
        },
    ),
    ("opt-350m-style", "opt", {"word_embed_proj_dim": 32, "do_layer_norm_before": False}),
    (
        "opt-no-affine-no-bias",
        "opt",
        {
            "layer_norm_elementwise_affine": False,
            "enable_bias": False,
            "tie_word_embeddings": False,
        },
    ),
    (
        "t5-gated-gelu-untied",
        "t5",
        {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_decoder_layers": 3},
    ),
    (
        "t5-gated-silu",
        "t5",
        {"feed_forward_proj": "gated-silu", "relative_attention_num_buckets": 16},
    ),
    ("t5-old-class-name", "t5", {"architectures": ["T5WithLMHeadModel"]}),
    ("t5-encoder-model", "t5", {"architectures": ["T5EncoderModel"]}),
    ("mt5-relu", "mt5", {"feed_forward_proj": "relu"}),
    ("bert-pretraining", "bert", {"architectures": ["BertForPreTraining"]}),
    ("bert-model", "bert", {"architectures": ["BertModel"], "type_vocab_size": 1}),
    (
        "bert-sequence-classification",
        "bert",
        {
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "a", "1": "b", "2": "c"},
        },
    ),
    (
        "bert-token-classification",
        "bert",
        {"architectures": ["BertForTokenClassification"], "num_labels": 5},
    ),
    ("bert-question-answering", "bert", {"architectures": ["BertForQuestionAnswering"]}),
    ("bert-multiple-choice", "bert", {"architectures": ["BertForMultipleChoice"]}),
    ("bert-next-sentence", "bert", {"architectures": ["BertForNextSentencePrediction"]}),
    (
        "bert-decoder-cross-attention",
        "bert",
        {"architectures": ["BertLMHeadModel"], "is_decoder": True, "add_cross_attention": True},
    ),
    ("bert-untied", "bert", {"tie_word_embeddings": False}),
]


def variant_config(model_type: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The family's minimal config with ``overrides`` applied (None removes a key)."""
    config = {**FAMILY_CONFIGS[model_type], **overrides}
    return {k: v for k, v in config.items() if v is not None}

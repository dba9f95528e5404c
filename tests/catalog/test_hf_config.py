"""config.json readers: each family's options reach the spec and the exact parameter count."""

from __future__ import annotations

from typing import Any

import pytest

from memplan.architecture import architecture, count_params
from memplan.catalog import load_model, spec_from_hf_config
from memplan.catalog.hf_config import supported_model_types
from memplan.specs.model import ModelSpec

from .family_configs import FAMILY_CONFIGS, VARIANTS, variant_config

# sum(p.numel()) of the transformers model built from each config (checked below when
# transformers is installed; pinned here so the layout is tested without it).
FAMILY_COUNTS = {
    "llama": 86_336,
    "mistral": 78_144,
    "mixtral": 189_248,
    "qwen2": 78_400,
    "qwen3": 78_208,
    "qwen3_moe": 91_008,
    "olmo2": 78_336,
    "gemma2": 70_208,
    "gemma3_text": 70_272,
    "gemma3": 462_272,  # Gemma3TextConfig's head_dim 256, a 2-layer SigLIP, the projector
    "phi3": 86_336,
    "gpt2": 110_336,
    "gpt_neox": 75_200,
    "falcon": 94_592,
    "bloom": 108_416,
    "opt": 69_184,
    "t5": 107_520,
    "mt5": 132_096,
    "bert": 73_600,
}
VARIANT_COUNTS = {
    "llama-biases-head-dim": 58_432,
    "mistral-default-kv-heads": 86_336,
    "mixtral-defaults": 337_216,
    "qwen2-tied": 70_208,
    "qwen3-defaults-bias-tied": 2_167_744,
    "olmo2-mha-bias-tied": 78_912,
    "gemma2-bias-untied": 78_784,
    "qwen3_moe-defaults": 1_630_592,
    "qwen3_moe-dense": 78_208,
    "gemma3-bias-untied": 78_848,
    "gemma3-vision-untied": 470_464,
    "phi3-gqa": 78_144,
    "gpt2-n-inner": 64_928,
    "gpt2-cross-attention": 143_872,
    "gpt2-untied": 118_528,
    "neox-sequential-no-bias": 66_496,
    "falcon-new-arch": 57_984,
    "falcon-new-arch-one-norm": 98_688,
    "falcon-sequential-mha-bias": 108_288,
    "falcon-untied": 102_784,
    "bloom-hidden-size-names": 42_336,
    "opt-350m-style": 69_056,
    "opt-no-affine-no-bias": 75_904,
    "t5-gated-gelu-untied": 167_104,
    "t5-gated-silu": 131_968,
    "t5-old-class-name": 107_520,
    "t5-encoder-model": 49_600,
    "mt5-relu": 107_520,
    "bert-pretraining": 77_890,
    "bert-model": 73_280,
    "bert-sequence-classification": 73_539,
    "bert-token-classification": 69_509,
    "bert-question-answering": 69_314,
    "bert-multiple-choice": 73_409,
    "bert-next-sentence": 73_474,
    "bert-decoder-cross-attention": 107_136,
    "bert-untied": 81_920,
}
CASES: list[tuple[str, dict[str, Any], int]] = [
    *((mt, FAMILY_CONFIGS[mt], FAMILY_COUNTS[mt]) for mt in FAMILY_CONFIGS),
    *((vid, variant_config(mt, o), VARIANT_COUNTS[vid]) for vid, mt, o in VARIANTS),
]


def _spec(config: dict[str, Any]) -> ModelSpec:
    return spec_from_hf_config(config, name="test")


def test_minimal_configs_are_of_supported_model_types() -> None:
    assert set(FAMILY_CONFIGS) <= set(supported_model_types())
    assert {v[0] for v in VARIANTS} == set(VARIANT_COUNTS)


@pytest.mark.parametrize(("case", "config", "count"), CASES, ids=[c[0] for c in CASES])
def test_layout_count(case: str, config: dict[str, Any], count: int) -> None:
    assert count_params(_spec(config)) == count


@pytest.mark.hf
class TestAgainstTransformers:
    @pytest.mark.parametrize(("case", "config", "count"), CASES, ids=[c[0] for c in CASES])
    def test_meta_model_count(self, case: str, config: dict[str, Any], count: int) -> None:
        pytest.importorskip("transformers")
        from memplan.catalog.hf_model import hf_num_params

        assert hf_num_params(config) == count


def test_gpt2_reads_native_names_and_inner_default() -> None:
    spec = _spec(FAMILY_CONFIGS["gpt2"])
    assert (spec.hidden_size, spec.num_decoder_layers, spec.num_attention_heads) == (64, 2, 4)
    assert spec.intermediate_size == 4 * 64  # n_inner None -> 4 * n_embd
    assert spec.max_position_embeddings == 32
    assert spec.position_embedding == "learned"
    assert spec.tie_word_embeddings
    assert _spec(variant_config("gpt2", {"n_inner": 80})).intermediate_size == 80


def test_falcon_kv_heads_and_norms_per_variant() -> None:
    falcon_7b = load_model("falcon-7b")
    assert falcon_7b.num_key_value_heads == 1  # multi_query
    assert falcon_7b.layout.layer_norms == "input"
    assert falcon_7b.parallel_attention
    new = _spec(variant_config("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}))
    assert new.num_key_value_heads == 2
    assert new.layout.layer_norms == "ln_attn+ln_mlp"
    sequential = _spec(variant_config("falcon", {"parallel_attn": False, "multi_query": False}))
    assert sequential.num_key_value_heads == 4
    assert sequential.layout.layer_norms == "input+post_attention"
    assert not sequential.parallel_attention
    assert _spec(variant_config("falcon", {"alibi": True})).position_embedding == "alibi"


def test_gpt_neox_parallel_residual_and_rotary() -> None:
    spec = load_model("gpt-neox-20b")
    assert spec.parallel_attention
    assert spec.layout.rotary_dim == 24  # rotary_pct 0.25 of head_dim 96
    assert not _spec(
        variant_config("gpt_neox", {"use_parallel_residual": False})
    ).parallel_attention


def test_opt_layout_details() -> None:
    spec = load_model("opt-6.7b")
    assert spec.layout.word_embed_proj_dim == 4096
    assert spec.layout.position_offset == 2
    assert spec.layout.final_layer_norm is True
    assert spec.hidden_act == "relu"
    small = _spec(variant_config("opt", {"word_embed_proj_dim": 32, "do_layer_norm_before": False}))
    assert small.layout.word_embed_proj_dim == 32
    assert small.layout.do_layer_norm_before is False
    assert small.layout.final_layer_norm is False


def test_t5_feed_forward_variants_and_forced_tying() -> None:
    t5_3b = load_model("t5-3b")
    assert not t5_3b.gated_mlp
    assert t5_3b.hidden_act == "relu"
    assert t5_3b.head_dim == 128
    assert t5_3b.num_attention_heads * t5_3b.head_dim == 4096
    assert t5_3b.layout.scale_decoder_outputs is True
    flan = load_model("flan-t5-xl")
    assert flan.gated_mlp
    assert flan.hidden_act == "gelu_new"
    # config says tie_word_embeddings=false; transformers >= 5 ties anyway and drops the scaling
    assert flan.tie_word_embeddings
    assert flan.layout.scale_decoder_outputs is False
    assert (flan.num_encoder_layers, flan.num_decoder_layers) == (24, 24)
    assert flan.is_encoder_decoder
    silu = _spec(variant_config("t5", {"feed_forward_proj": "gated-silu"}))
    assert silu.gated_mlp
    assert silu.hidden_act == "silu"
    encoder = _spec(variant_config("t5", {"architectures": ["T5EncoderModel"]}))
    assert (encoder.num_encoder_layers, encoder.num_decoder_layers) == (2, 0)
    mt5 = load_model("mt5-xxl")
    assert mt5.family == "t5"
    assert mt5.gated_mlp


def test_bert_heads_and_token_types() -> None:
    spec = load_model("bert-base")
    assert spec.num_encoder_layers == 12
    assert spec.num_decoder_layers == 0
    assert spec.layout.architecture == "BertForMaskedLM"
    assert spec.layout.type_vocab_size == 2
    classifier = _spec(
        variant_config(
            "bert",
            {
                "architectures": ["BertForSequenceClassification"],
                "id2label": {"0": "a", "1": "b", "2": "c"},
            },
        )
    )
    assert classifier.layout.num_labels == 3
    assert _spec(FAMILY_CONFIGS["bert"]).layout.architecture == "BertForMaskedLM"  # default


def test_llama_like_biases_per_family() -> None:
    qwen = load_model("qwen2.5-7b")
    assert qwen.attention_bias
    assert not qwen.attention_out_bias
    assert not qwen.tie_word_embeddings
    assert load_model("qwen2.5-0.5b").tie_word_embeddings
    # Mistral's modeling hard-codes bias=False whatever the config says.
    mistral = _spec(variant_config("mistral", {"attention_bias": True}))
    assert not mistral.attention_bias
    assert not mistral.attention_out_bias
    llama = _spec(variant_config("llama", {"attention_bias": True, "mlp_bias": True}))
    assert llama.attention_bias
    assert llama.attention_out_bias
    assert llama.mlp_bias


def test_defaults_follow_the_transformers_config_classes() -> None:
    # MistralConfig defaults num_key_value_heads to 8, LlamaConfig to num_attention_heads.
    mistral = _spec(
        variant_config("mistral", {"num_attention_heads": 8, "num_key_value_heads": None})
    )
    assert mistral.num_key_value_heads == 8
    llama = _spec(variant_config("llama", {"num_attention_heads": 8}))
    assert llama.num_key_value_heads == 8
    mixtral = _spec(
        variant_config("mixtral", {"num_local_experts": None, "num_experts_per_tok": None})
    )
    assert (mixtral.num_experts, mixtral.num_experts_per_token) == (8, 2)


def test_gemma2_and_phi3_details() -> None:
    gemma = load_model("gemma-2-9b")
    assert gemma.head_dim == 256
    assert gemma.num_attention_heads * gemma.head_dim == 4096 != gemma.hidden_size
    assert gemma.hidden_act == "gelu_pytorch_tanh"
    assert gemma.layout.query_pre_attn_scalar == 256
    assert gemma.layout.final_logit_softcapping is True
    assert gemma.tie_word_embeddings
    phi = load_model("phi-3-mini")
    assert phi.gated_mlp
    assert phi.layout.sliding_window == 2047


def test_qwen3_head_dim_and_sliding_layers() -> None:
    # Qwen3Config.head_dim is 128 whatever hidden / heads; q/k/v unbiased unless attention_bias.
    spec = _spec(variant_config("qwen3", {"head_dim": None}))
    assert spec.head_dim == 128
    assert not spec.attention_bias
    assert spec.layout.sliding_window is None  # use_sliding_window defaults to false
    sliding = {"use_sliding_window": True, "sliding_window": 8}
    # layer_types: sliding attention from layer max_window_layers (28 by default) on.
    assert _spec(variant_config("qwen3", sliding)).layout.sliding_window is None
    later = {**sliding, "max_window_layers": 1}
    assert _spec(variant_config("qwen3", later)).layout.sliding_window == 8
    full = {**sliding, "layer_types": ["full_attention"] * 2}
    assert _spec(variant_config("qwen3", full)).layout.sliding_window is None
    qwen3 = load_model("qwen3-0.6b")
    assert (qwen3.head_dim, qwen3.hidden_size // qwen3.num_attention_heads) == (128, 64)
    assert qwen3.tie_word_embeddings


def test_olmo2_norms_and_defaults() -> None:
    spec = _spec(variant_config("olmo2", {"num_key_value_heads": None, "mlp_bias": True}))
    assert spec.num_key_value_heads == spec.num_attention_heads  # Olmo2Config: None -> MHA
    assert not spec.mlp_bias  # Olmo2MLP hard-codes bias=False
    names = {t.name for _, t in architecture(spec).tensors()}
    # Norms after the branches and over the whole q/k projections; no input norm.
    assert "post_feedforward_layernorm.weight" in names
    assert "input_layernorm.weight" not in names
    q_norm = [t for _, t in architecture(spec).tensors() if t.name == "self_attn.q_norm.weight"]
    assert q_norm[0].shape == (spec.num_attention_heads * spec.head_dim,)

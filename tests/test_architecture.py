"""Parameter layouts: roles, LoRA names, tied heads and block structure of every family."""

from __future__ import annotations

import re
import typing
from collections import Counter

import pytest

from memplan.architecture import (
    ParamKind,
    architecture,
    count_params,
    lora_module_names,
    lora_target_names,
)
from memplan.catalog import catalog_names, catalog_record, load_model, spec_from_hf_config
from memplan.families import families
from memplan.specs.model import Family, ModelSpec
from memplan.specs.training import LinearRole

FAMILIES: tuple[Family, ...] = tuple(families())
DEFAULT_LORA_ROLES = {name: fam.lora_roles for name, fam in families().items()}

# One catalog model per family (the published one when it is cheap enough to build on meta).
REPRESENTATIVE: dict[Family, str] = {
    "llama": "llama-2-7b",
    "mistral": "mistral-7b",
    "mixtral": "mixtral-8x7b",
    "qwen2": "qwen2.5-0.5b",
    "qwen3": "qwen3-0.6b",
    "olmo2": "olmo-2-7b",
    "gemma2": "gemma-2-9b",
    "phi3": "phi-3-mini",
    "gpt2": "gpt2",
    "gpt_neox": "gpt-neox-20b",
    "falcon": "falcon-7b",
    "bloom": "bloom-7b1",
    "opt": "opt-6.7b",
    "t5": "flan-t5-xl",
    "bert": "bert-base",
}

ROLES: dict[str, set[str]] = {
    "llama-2-7b": {"q", "k", "v", "o", "gate", "up", "down"},
    "mixtral-8x7b": {"q", "k", "v", "o", "router", "gate_up", "down"},
    "phi-3-mini": {"qkv", "o", "gate_up", "down"},
    "gpt2": {"qkv", "o", "up", "down"},
    "gpt-neox-20b": {"qkv", "o", "up", "down"},
    "falcon-7b": {"qkv", "o", "up", "down"},
    "bloom-7b1": {"qkv", "o", "up", "down"},
    "opt-6.7b": {"q", "k", "v", "o", "up", "down"},
    "t5-3b": {"q", "k", "v", "o", "up", "down"},
    "flan-t5-xl": {"q", "k", "v", "o", "gate", "up", "down"},
    "bert-base": {"q", "k", "v", "o", "up", "down"},
}

LORA_NAMES: dict[str, dict[str, str]] = {
    "llama-2-7b": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mixtral-8x7b": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "router": "gate",
                     "gate_up": "gate_up_proj", "down": "down_proj"},
    "phi-3-mini": {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj",
                   "down": "down_proj"},
    "gpt2": {"qkv": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"},
    "gpt-neox-20b": {"qkv": "query_key_value", "o": "dense", "up": "dense_h_to_4h",
                     "down": "dense_4h_to_h"},
    "bloom-7b1": {"qkv": "query_key_value", "o": "dense", "up": "dense_h_to_4h",
                  "down": "dense_4h_to_h"},
    "opt-6.7b": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "up": "fc1",
                 "down": "fc2"},
    "t5-3b": {"q": "q", "k": "k", "v": "v", "o": "o", "up": "wi", "down": "wo"},
    "flan-t5-xl": {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "wi_0", "up": "wi_1",
                   "down": "wo"},
    "bert-base": {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense",
                  "up": "intermediate.dense", "down": "output.dense"},
}  # fmt: skip


def _blocks(name: str) -> dict[str, int]:
    return {b.name: b.numel for b in architecture(load_model(name)).blocks}


def _tensor_names(spec: ModelSpec, block: str) -> list[str]:
    return [t.name for b, t in architecture(spec).tensors() if b.name == block]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_tiny_model_and_default_lora_roles(family: Family) -> None:
    for name in {families()[family].tiny_model, REPRESENTATIVE.get(family, "")} - {""}:
        spec = load_model(name)
        assert spec.family == family
        roles = {t.role for _, t in architecture(spec).tensors()}
        assert set(DEFAULT_LORA_ROLES[family]) <= roles, family


@pytest.mark.parametrize("name", catalog_names())
def test_every_linear_weight_has_a_role(name: str) -> None:
    for block, tensor in architecture(load_model(name)).tensors():
        if tensor.kind in (ParamKind.LINEAR, ParamKind.ROUTER):
            assert tensor.role is not None, (block.name, tensor.name)
            assert block.name.endswith("layer"), (block.name, tensor.name)
        if tensor.kind is ParamKind.HEAD_LINEAR:
            assert tensor.role is None
            assert not block.name.endswith("layer")


@pytest.mark.parametrize(("name", "roles"), ROLES.items())
def test_roles_per_family(name: str, roles: set[str]) -> None:
    spec = load_model(name)
    found = {t.role for _, t in architecture(spec).tensors() if t.kind is ParamKind.LINEAR}
    found |= {t.role for _, t in architecture(spec).tensors() if t.kind is ParamKind.ROUTER}
    assert found == roles


@pytest.mark.parametrize(("name", "names"), LORA_NAMES.items())
def test_lora_module_names(name: str, names: dict[str, str]) -> None:
    assert lora_module_names(load_model(name)) == names


def test_lora_names_of_cross_attention_models() -> None:
    gpt2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 2,
            "add_cross_attention": True}  # fmt: skip
    names = lora_module_names(spec_from_hf_config(gpt2, name="gpt2-cross"))
    assert names["qkv"] == "c_attn"  # self and cross c_attn alike
    assert names["q"] == "q_attn"
    assert names["o"] == "attn.c_proj"  # no suffix covers both o projections but not mlp.c_proj


def test_llama_2_7b_breakdown() -> None:
    # embed 32000 x 4096; per layer 4 * 4096^2 + 3 * 4096 * 11008 + 2 * 4096; final norm; head.
    assert _blocks("llama-2-7b") == {
        "embeddings": 131_072_000,
        "decoder_layer": 32 * 202_383_360,
        "final_norm": 4096,
        "lm_head": 131_072_000,
    }
    assert count_params(load_model("llama-2-7b")) == 6_738_415_616


def test_tied_and_untied_heads() -> None:
    tied, untied = load_model("llama-3.2-1b"), load_model("llama-3.1-8b")
    assert "lm_head" not in _blocks("llama-3.2-1b")
    assert _blocks("llama-3.1-8b")["lm_head"] == 128_256 * 4096
    assert tied.tie_word_embeddings
    assert not untied.tie_word_embeddings
    untied_1b = tied.model_copy(update={"tie_word_embeddings": False})
    assert count_params(untied_1b) - count_params(tied) == 128_256 * 2048
    assert "lm_head" not in _blocks("gpt2")  # GPT-2 ties wte
    assert "lm_head" not in _blocks("flan-t5-xl")  # transformers >= 5 ties T5's lm_head


def test_gpt2_conv1d_listed_as_out_by_in() -> None:
    shapes = {t.name: t.shape for _, t in architecture(load_model("gpt2")).tensors()}
    assert shapes["attn.c_attn.weight"] == (3 * 768, 768)
    assert shapes["mlp.c_fc.weight"] == (3072, 768)
    assert shapes["mlp.c_proj.weight"] == (768, 3072)
    assert shapes["wpe.weight"] == (1024, 768)


def test_mixtral_experts_are_one_tensor_with_copies() -> None:
    layer = {t.name: t for _, t in architecture(load_model("mixtral-8x7b")).tensors()}
    experts = layer["mlp.experts.gate_up_proj"]
    assert (experts.shape, experts.copies) == ((2 * 14336, 4096), 8)
    assert layer["mlp.experts.down_proj"].numel == 8 * 4096 * 14336
    assert layer["mlp.gate.weight"].kind is ParamKind.ROUTER


def test_t5_stacks_cross_attention_and_relative_bias() -> None:
    spec = load_model("flan-t5-xl")
    arch = architecture(spec)
    assert [b.name for b in arch.layer_blocks()] == ["encoder_layer", "decoder_layer"]
    assert [b.repeat for b in arch.layer_blocks()] == [24, 24]
    encoder, decoder = (_tensor_names(spec, b) for b in ("encoder_layer", "decoder_layer"))
    assert not any("EncDecAttention" in n for n in encoder)
    assert {n for n in decoder if "EncDecAttention" in n} == {
        f"layer.1.EncDecAttention.{p}.weight" for p in "qkvo"
    }
    assert "layer.2.DenseReluDense.wi_0.weight" in decoder
    blocks = _blocks("flan-t5-xl")
    assert (
        blocks["encoder_relative_attention_bias"]
        == blocks["decoder_relative_attention_bias"]
        == 32 * 32
    )


def test_bert_embeddings_and_mlm_head() -> None:
    blocks = _blocks("bert-base")
    # word + 512 positions + 2 token types, then the embedding LayerNorm.
    assert blocks["embeddings"] == (30522 + 512 + 2) * 768 + 2 * 768
    # transform dense + LayerNorm + the decoder bias; the decoder weight is the word embedding.
    assert blocks["mlm_head"] == 768 * 768 + 768 + 2 * 768 + 30522
    assert "pooler" not in blocks


def test_special_norms() -> None:
    falcon = _tensor_names(load_model("falcon-7b"), "decoder_layer")
    assert [n for n in falcon if "layernorm" in n] == [
        "input_layernorm.weight",
        "input_layernorm.bias",
    ]
    gemma = _tensor_names(load_model("gemma-2-9b"), "decoder_layer")
    assert len([n for n in gemma if n.endswith("layernorm.weight")]) == 4
    bloom = _tensor_names(load_model("bloom-7b1"), "embeddings")
    assert "word_embeddings_layernorm.weight" in bloom


def test_falcon_7b_multi_query_qkv() -> None:
    shapes = {t.name: t.shape for _, t in architecture(load_model("falcon-7b")).tensors()}
    assert shapes["self_attention.query_key_value.weight"] == (4544 + 2 * 64, 4544)


def test_opt_positions_have_two_extra_rows() -> None:
    shapes = {t.name: t.shape for _, t in architecture(load_model("opt-6.7b")).tensors()}
    assert shapes["embed_positions.weight"] == (2050, 4096)


# ---------------------------------------------------------------- against transformers and peft


def _inside_layer(module: str) -> str:
    """The module path after the first layer index ('model.layers.3.mlp.up' -> 'mlp.up')."""
    match = re.match(r"^.*?\.\d+\.(.*)$", module)
    return match.group(1) if match else module


def _leaf(name: str) -> str:
    return ".".join(name.split(".")[-2:])


@pytest.mark.hf
class TestAgainstTransformers:
    @pytest.mark.parametrize("name", catalog_names())
    def test_names_and_sizes_match_the_real_parameters(self, name: str) -> None:
        pytest.importorskip("transformers")
        from memplan.catalog.hf_model import meta_model

        real = dict(meta_model(catalog_record(name)["config"]).named_parameters())
        arch = architecture(load_model(name))
        ours = Counter((_leaf(t.name), t.numel) for b, t in arch.tensors() for _ in range(b.repeat))
        assert ours == Counter((_leaf(n), p.numel()) for n, p in real.items())
        for _, tensor in arch.tensors():
            assert any(n == tensor.name or n.endswith(f".{tensor.name}") for n in real), tensor.name

    @pytest.mark.parametrize("family", FAMILIES)
    def test_lora_names_select_exactly_their_role(self, family: Family) -> None:
        pytest.importorskip("transformers")
        from memplan.catalog.hf_model import meta_model

        name = families()[family].tiny_model
        spec = load_model(name)
        modules = {
            re.sub(r"\.(weight|bias)$", "", n)
            for n, _ in meta_model(catalog_record(name)["config"]).named_parameters()
        }
        role_of = {
            t.name.removesuffix(".weight"): t.role
            for _, t in architecture(spec).tensors()
            if t.role is not None and t.kind is not ParamKind.BIAS
        }
        for role, targets in lora_target_names(spec).items():
            # peft selects a module when its name equals a target or ends with "." + target.
            chosen = {m for m in modules for t in targets if m == t or m.endswith(f".{t}")}
            expected = {m for m in modules if role_of.get(_inside_layer(m)) == role}
            if family == "bert" and role == "down":  # output.dense also ends attention.output.dense
                assert chosen == expected | {
                    m for m in modules if m.endswith("attention.output.dense")
                }
                continue
            assert chosen == expected, (role, targets)

    @pytest.mark.parametrize("family", FAMILIES)
    def test_default_lora_roles_are_peft_defaults(self, family: Family) -> None:
        peft_constants = pytest.importorskip("peft.utils.constants")
        mapping = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        names = lora_module_names(load_model(families()[family].tiny_model))
        ours = {names[role] for role in DEFAULT_LORA_ROLES[family]}
        if family == "phi3":
            assert family not in mapping  # peft asks for target_modules; memplan assumes qkv_proj
            assert ours == {"qkv_proj"}
            return
        if family == "deepseek_v2":
            assert family not in mapping  # peft asks for target_modules; no v_proj to name
            assert ours == {"q_proj", "kv_b_proj"}  # the queries and the per-head keys/values
            return
        if family == "gemma3_mm":
            assert "gemma3" not in mapping  # peft asks for target_modules; memplan names
            assert ours == set(mapping["gemma3_text"])  # the text model's q_proj, v_proj
            return
        if family in ("olmo2", "qwen3_moe"):
            assert family not in mapping  # peft asks for target_modules; memplan takes Llama's
            assert ours == set(mapping["llama"])
            return
        # peft keys its defaults by model_type (gemma3's text model is "gemma3_text").
        key = family if family in mapping else families()[family].model_types[0]
        assert ours == set(mapping[key])
        if family == "t5":
            assert mapping["mt5"] == mapping["t5"]


def test_default_lora_roles_are_linear_roles() -> None:
    valid = set(typing.get_args(LinearRole))
    for roles in DEFAULT_LORA_ROLES.values():
        assert set(roles) <= valid

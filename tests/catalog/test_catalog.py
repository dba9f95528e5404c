"""Every catalog record loads, validates, and counts exactly what transformers builds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.architecture import count_params
from memplan.catalog import catalog_names, catalog_record, load_model
from memplan.errors import MemplanError

from .family_configs import FAMILY_CONFIGS

DATA_DIR = Path(__file__).resolve().parents[2] / "memplan" / "catalog" / "data"
# Recursive on purpose: a record dropped into a subfolder must be tested, not skipped.
RECORD_FILES = sorted(DATA_DIR.rglob("*.json"))
RECORD_KEYS = {"name", "hf_id", "description", "num_params", "config"}

REQUIRED_NAMES = {
    "llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b",
    "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "gemma-2-9b",
    "phi-3-mini", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-neox-20b", "falcon-7b",
    "bloom-7b1", "opt-6.7b", "t5-3b", "flan-t5-xl", "mt5-xxl", "bert-base", "bert-large",
    "tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mistral", "tiny-mixtral", "tiny-t5",
    "tiny-bert", "tiny-gemma2", "tiny-phi3",
}  # fmt: skip

# Widely reproduced totals of the published checkpoints (sum of p.numel() in transformers).
KNOWN_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "gpt2": 124_439_808,
    "gpt-neox-20b": 20_554_567_680,
    "falcon-7b": 6_921_720_704,
    "bert-base": 109_514_298,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-8b": 8_190_735_360,
    # Gemma3ForConditionalGeneration: text model, SigLIP vision tower and projector.
    "gemma-3-4b": 4_300_079_472,
    "gemma-3-12b": 12_187_325_040,
    "gemma-3-27b": 27_432_406_640,
}


def _record(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_catalog_lists_every_data_file_and_the_required_models() -> None:
    assert len(RECORD_FILES) >= 34
    assert catalog_names() == tuple(sorted(p.stem for p in RECORD_FILES))
    assert set(catalog_names()) >= REQUIRED_NAMES


@pytest.mark.parametrize("path", RECORD_FILES, ids=lambda p: p.stem)
def test_record_loads_and_its_layout_counts_its_num_params(path: Path) -> None:
    record = _record(path)
    assert set(record) - {"hf_aliases"} == RECORD_KEYS
    for alias in record.get("hf_aliases", []):
        assert alias.count("/") == 1
        assert load_model(alias).name == path.stem
    assert record["name"] == path.stem
    assert record["description"].strip()
    assert "\n" not in record["description"]
    assert record["hf_id"] is None or record["hf_id"].count("/") == 1
    spec = load_model(path.stem)
    assert spec.name == path.stem
    assert spec.num_params == record["num_params"]
    assert count_params(spec) == record["num_params"]


@pytest.mark.parametrize(("name", "total"), KNOWN_TOTALS.items())
def test_known_totals(name: str, total: int) -> None:
    assert catalog_record(name)["num_params"] == total
    assert count_params(load_model(name)) == total


def test_tiny_models_are_small_enough_for_cpu_runs() -> None:
    for name in (n for n in catalog_names() if n.startswith("tiny-")):
        spec = load_model(name)
        assert spec.hidden_size <= 128, name
        assert spec.num_layers <= 4, name  # 2 layers; T5: 2 encoder + 2 decoder
        assert count_params(spec) < 2_000_000, name


@pytest.mark.hf
class TestAgainstTransformers:
    """The stored counts are what the installed transformers builds (meta device, no weights)."""

    @pytest.mark.parametrize("path", RECORD_FILES, ids=lambda p: p.stem)
    def test_meta_model_matches_record_and_layout(self, path: Path) -> None:
        pytest.importorskip("transformers")
        from memplan.catalog.hf_model import hf_num_params

        record = _record(path)
        built = hf_num_params(record["config"])
        assert built == record["num_params"] == count_params(load_model(path.stem))


# ---------------------------------------------------------------- loading config.json files


def _write(tmp_path: Path, config: dict[str, Any] | str, folder: str = "model") -> Path:
    path = tmp_path / folder / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config if isinstance(config, str) else json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("model_type", FAMILY_CONFIGS)
def test_minimal_config_of_each_family_loads_by_path(tmp_path: Path, model_type: str) -> None:
    path = _write(tmp_path, FAMILY_CONFIGS[model_type], folder=model_type)
    spec = load_model(path)
    assert spec.family == {"mt5": "t5", "gemma3_text": "gemma3", "gemma3": "gemma3_mm"}.get(
        model_type, model_type
    )
    assert spec.name == model_type  # the folder holding config.json
    assert spec.vocab_size == 128
    assert count_params(spec) > 0
    # A folder holding a config.json loads the same spec, as a str path too.
    assert load_model(str(path.parent)) == spec


def test_catalog_record_and_its_config_file_give_the_same_layout(tmp_path: Path) -> None:
    path = _write(tmp_path, catalog_record("mixtral-8x7b")["config"])
    assert count_params(load_model(path)) == 46_702_792_704


# ---------------------------------------------------------------- errors: one line, naming the file


def _error(tmp_path: Path, config: dict[str, Any] | str) -> str:
    path = _write(tmp_path, config)
    with pytest.raises(MemplanError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def _llama(**overrides: Any) -> dict[str, Any]:
    config = {**FAMILY_CONFIGS["llama"], **overrides}
    return {k: v for k, v in config.items() if v is not None}


def test_malformed_json(tmp_path: Path) -> None:
    assert "malformed JSON" in _error(tmp_path, '{"model_type": "llama",')


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    assert "expected a JSON object, got list" in _error(tmp_path, "[1, 2]")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    message = _error(tmp_path, {"model_type": "mamba", "hidden_size": 64})
    assert "unsupported model_type 'mamba'" in message
    assert (
        "supported: bert, bloom, deepseek_v2, falcon, gemma2, gemma3, gemma3_text, gpt2, gpt_neox, "
        "llama" in message
    )


def test_missing_model_type(tmp_path: Path) -> None:
    assert "has no 'model_type'" in _error(tmp_path, {"hidden_size": 64})


def test_missing_hidden_size(tmp_path: Path) -> None:
    assert "config.json has no 'hidden_size'" in _error(tmp_path, _llama(hidden_size=None))


def test_missing_alias_names_the_family_spelling(tmp_path: Path) -> None:
    config = {**FAMILY_CONFIGS["gpt2"]}
    del config["n_embd"]
    assert "config.json has no 'n_embd'" in _error(tmp_path, config)


@pytest.mark.parametrize("value", [0, -4096])
def test_non_positive_size(tmp_path: Path, value: int) -> None:
    assert f"hidden_size must be positive, got {value}" in _error(
        tmp_path, _llama(hidden_size=value)
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num_hidden_layers", "32", "num_hidden_layers must be an integer, got '32'"),
        ("vocab_size", 32000.0, "vocab_size must be an integer, got 32000.0"),
        ("intermediate_size", True, "intermediate_size must be an integer, got True"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
        ("attention_dropout", 1.5, "attention_dropout must be a number in [0, 1), got 1.5"),
    ],
)
def test_wrong_type(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    assert expected in _error(tmp_path, _llama(**{key: value}))


def test_heads_not_divisible_by_kv_heads(tmp_path: Path) -> None:
    message = _error(tmp_path, _llama(num_attention_heads=4, num_key_value_heads=3))
    assert "num_attention_heads=4 is not a multiple of num_key_value_heads=3" in message


def test_hidden_not_divisible_by_heads(tmp_path: Path) -> None:
    message = _error(tmp_path, _llama(num_attention_heads=5))
    assert "hidden_size=64 is not divisible by num_attention_heads=5" in message


def test_unsupported_bert_class(tmp_path: Path) -> None:
    config = {**FAMILY_CONFIGS["bert"], "architectures": ["BertForCustomThing"]}
    assert "unsupported architecture 'BertForCustomThing'" in _error(tmp_path, config)


def test_bad_t5_feed_forward_proj(tmp_path: Path) -> None:
    config = {**FAMILY_CONFIGS["t5"], "feed_forward_proj": "geglu-gated"}
    assert "feed_forward_proj must be 'ACT' or 'gated-ACT'" in _error(tmp_path, config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match=r"cannot read config file .*No such file"):
        load_model(tmp_path / "absent.json")


def test_unknown_catalog_name_suggests_close_names() -> None:
    with pytest.raises(MemplanError) as info:
        load_model("llama-2-7")
    message = str(info.value)
    assert "unknown model 'llama-2-7'" in message
    assert "did you mean llama-2-7b" in message
    assert "\n" not in message


def test_unknown_catalog_name_without_close_names() -> None:
    with pytest.raises(MemplanError, match="see `memplan models`"):
        load_model("zzzz")

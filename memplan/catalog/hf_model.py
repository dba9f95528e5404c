"""Build the transformers model a config.json describes, on the meta device (extra: hf).

This is how every catalog record's ``num_params`` is measured: ``sum(p.numel())`` of the model
built from the record's config, no weights allocated. torch and transformers are imported on
first use, so ``import memplan.catalog`` stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Final

# Classes laid out from config.json 'architectures' (encoder and encoder-decoder families);
# decoder-only families are built as their AutoModelForCausalLM class.
_HEAD_FAMILIES: Final = ("bert", "t5", "mt5")
_DEFAULT_CLASS: Final = {
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
    "mt5": "MT5ForConditionalGeneration",
}
# Class names transformers no longer has, by their current name.
_RENAMED_CLASSES: Final = {"T5WithLMHeadModel": "T5ForConditionalGeneration"}


def hf_class_name(config: Mapping[str, Any]) -> str:
    """The transformers class whose parameters memplan counts for this config."""
    model_type = str(config["model_type"])
    if model_type in _HEAD_FAMILIES:
        name = str((config.get("architectures") or [_DEFAULT_CLASS[model_type]])[0])
        return _RENAMED_CLASSES.get(name, name)
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    return str(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def meta_model(config: Mapping[str, Any]) -> Any:
    """The transformers model of ``config`` (a parsed config.json), built on the meta device."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    auto_config = importlib.import_module("transformers.models.auto.configuration_auto")
    config_class = auto_config.CONFIG_MAPPING[config["model_type"]]
    hf_config = config_class.from_dict(dict(config))
    model_class = getattr(transformers, hf_class_name(config))
    with torch.device("meta"):
        return model_class(hf_config)


def hf_num_params(config: Mapping[str, Any]) -> int:
    """``sum(p.numel() for p in model.parameters())``: tied parameters count once."""
    return int(sum(p.numel() for p in meta_model(config).parameters()))

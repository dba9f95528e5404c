"""Build the transformers model a config.json describes, on the meta device (extra: hf).

This is how every catalog record's ``num_params`` is measured: ``sum(p.numel())`` of the model
built from the record's config, no weights allocated. torch and transformers are imported on
first use, so ``import memplan.catalog`` stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def hf_class_name(config: Mapping[str, Any]) -> str:
    """The transformers class whose parameters memplan counts for this config (its family's)."""
    from memplan.families import family, family_for_model_type

    fam = family_for_model_type(str(config["model_type"])) or family("traced-only")
    return fam.hf_class(config)


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

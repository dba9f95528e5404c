"""Trainable parameters of the peft methods: memplan's count against peft's own.

For each method, peft is applied with its own default configuration (the target modules of
its mapping for the model type, its default ranks) to the transformers model on the meta
device, independently of memplan's ``apply``; ``PeftModel.get_nb_trainable_parameters`` must
equal memplan's analytical count exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memplan.analytic.context import StepContext  # noqa: E402
from memplan.analytic.weights import model_state  # noqa: E402
from memplan.architecture import architecture  # noqa: E402
from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim.models import build_meta_model  # noqa: E402
from memplan.torchsim.runner import third_party_warnings_muted  # noqa: E402

pytestmark = pytest.mark.torch


def _loha() -> Any:
    return peft.LoHaConfig()


# Each method's peft configuration, with peft's defaults (memplan's defaults must be the same).
CONFIGS: dict[str, Callable[[], Any]] = {"loha": _loha}
MODELS = ("llama-3.2-3b", "tiny-llama", "tiny-qwen2", "tiny-bert", "tiny-falcon", "tiny-t5")


def _peft_count(model: str, method: str) -> int:
    spec = load_model(model)
    with third_party_warnings_muted():
        built = build_meta_model(spec, TrainingSetup(method=method))
        peft_model = peft.get_peft_model(built.model, CONFIGS[method]())
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(trainable)


def _memplan_count(model: str, method: str) -> int:
    spec = load_model(model)
    setup = TrainingSetup(method=method)
    state = model_state(architecture(spec), setup, StepContext.build(spec, setup))
    return state.num_trainable_params


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("model", MODELS)
def test_trainable_count_equals_peft(model: str, method: str) -> None:
    assert _memplan_count(model, method) == _peft_count(model, method)


def test_loha_on_llama_3_2_3b() -> None:
    # q_proj 3072 -> 3072 and v_proj 3072 -> 1024 in 28 layers; r=8:
    # w1_a, w2_a (out x 8) and w1_b, w2_b (8 x in) each.
    per_layer = 2 * 8 * (3072 + 3072) + 2 * 8 * (1024 + 3072)
    assert _memplan_count("llama-3.2-3b", "loha") == 28 * per_layer == 4_587_520

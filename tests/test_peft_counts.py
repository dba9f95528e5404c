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


def _lokr() -> Any:
    return peft.LoKrConfig()


def _vera() -> Any:
    return peft.VeraConfig()


# Each method's peft configuration, with peft's defaults (memplan's defaults must be the same).
CONFIGS: dict[str, Callable[[], Any]] = {"loha": _loha, "lokr": _lokr, "vera": _vera}
MODELS = ("llama-3.2-3b", "tiny-llama", "tiny-qwen2", "tiny-bert", "tiny-falcon", "tiny-t5")


def _peft_count(model: str, method: str, config: Any = None) -> int:
    spec = load_model(model)
    with third_party_warnings_muted():
        built = build_meta_model(spec, TrainingSetup(method=method))
        peft_model = peft.get_peft_model(built.model, config or CONFIGS[method]())
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


def test_vera_on_gpt2_conv1d_equals_peft() -> None:
    # VeRA adapts transformers' Conv1D too (fan_in_fan_out); LoHa and LoKr refuse it.
    config = peft.VeraConfig(fan_in_fan_out=True)  # Conv1D stores (in, out)
    assert _memplan_count("tiny-gpt2", "vera") == _peft_count("tiny-gpt2", "vera", config)


def test_vera_on_llama_3_2_3b() -> None:
    # lambda_b (out) and lambda_d (r=256) on q_proj (3072) and v_proj (1024) in 28 layers;
    # the shared vera_A (256 x 3072) and vera_B (3072 x 256) are frozen buffers.
    assert _memplan_count("llama-3.2-3b", "vera") == 28 * (3072 + 256 + 1024 + 256) == 129_024


def test_lokr_factorization_is_peft_s() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from memplan.methods.lokr import factorization

    for dimension in (*range(1, 600), 1024, 3072, 4096, 8192, 11008, 14336, 128256):
        assert factorization(dimension) == peft_factorization(dimension, -1)


def test_lokr_on_llama_3_2_3b() -> None:
    # 3072 = 48 x 64, 1024 = 32 x 32; r=8 < 64/2: w2 is decomposed (w2_a b x 8, w2_b 8 x d).
    q = 48 * 48 + 64 * 8 + 8 * 64  # lokr_w1 (a x c), w2_a, w2_b
    v = 32 * 48 + 32 * 8 + 8 * 64
    assert _memplan_count("llama-3.2-3b", "lokr") == 28 * (q + v) == 157_696


def test_decomposed_lokr_and_autocast_loha_follow_the_traced_step() -> None:
    """Paths the oracle's defaults do not reach, against the real CPU step: LoKr's
    w2_a @ w2_b (r < max(b, d) / 2), LoHa and LoKr under bf16 autocast, VeRA on 4-bit weights
    (peft's bitsandbytes backend clones the base output) and under autocast."""
    from memplan.analytic.predict import predict
    from memplan.torchsim.step import trace_step

    spec = load_model("tiny-llama")
    for method, fields in (
        ("lokr", {"lokr_r": 2}),
        ("loha", {"precision": "bf16-amp"}),
        ("lokr", {"lokr_r": 2, "precision": "bf16-amp"}),
        ("vera", {"quant": "nf4"}),
        ("vera", {"quant": "nf4", "kbit_prep": True, "precision": "bf16-amp"}),
        ("vera", {"precision": "bf16-amp", "grad_ckpt": True}),
    ):
        setup = TrainingSetup(method=method, micro_batch_size=2, seq_len=64, device="cpu", **fields)
        measured = trace_step(spec, setup, mode="cpu").trace.peak()
        predicted = predict(spec, setup).trace.peak()
        assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
        for category, nbytes in measured.breakdown_bytes.items():
            assert abs(predicted.breakdown_bytes[category] - nbytes) <= 0.01 * measured.peak_bytes

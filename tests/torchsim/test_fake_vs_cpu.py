"""A fake-tensor simulation allocates what the same step allocates on real CPU tensors.

Grid: tiny-llama (transformers) and the reference decoder, every registered method it runs,
checkpointing on and off, batch 1 and 2, sequence 32 and 64, eager and SDPA attention, one
optimizer step (load, forward, loss, backward, lazy optimizer state, zero_grad); two steps on
a subset, and every other registered family with every method it runs, one shape each. Peaks
and breakdowns agree within 1% (exactly, today).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.analytic.predict import check_applicable  # noqa: E402
from memplan.catalog import load_model  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.families import families  # noqa: E402
from memplan.methods import method as tuning  # noqa: E402
from memplan.methods import method_names  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import TraceResult, trace_step  # noqa: E402

pytestmark = pytest.mark.torch

SHAPES = list(itertools.product((1, 2), (32, 64), ("eager", "sdpa")))


def _setup(method: str, ckpt: bool, batch: int, seq: int, attention: str) -> TrainingSetup:
    fields: dict[str, Any] = {"method": method, "micro_batch_size": batch, "seq_len": seq}
    trains = TrainingSetup(method=method).trains_weights
    # Prefix tuning cannot run with checkpointing (the method refuses it).
    fields |= {"attention": attention, "grad_ckpt": ckpt and trains and method != "prefix"}
    if method == "qlora":
        fields["optimizer"] = "adamw"  # the paged default keeps states outside the trace
    return TrainingSetup(**fields)


def _runs(model: str, method: str) -> bool:
    try:
        check_applicable(load_model(model), TrainingSetup(method=method))
    except MemplanError:
        return False
    return True


METHODS = tuple(m for m in method_names() if _runs("tiny-llama", m))
OTHERS = [
    pytest.param(fam.tiny_model, method, id=f"{fam.tiny_model}-{method}")
    for fam in families().values()
    if fam.tiny_model != "tiny-llama"
    for method in method_names()
    if _runs(fam.tiny_model, method)
]


def _assert_agree(fake: TraceResult, cpu: TraceResult) -> None:
    fake_peak, cpu_peak = fake.trace.peak(), cpu.trace.peak()
    assert fake_peak.peak_bytes == pytest.approx(cpu_peak.peak_bytes, rel=0.01)
    for category, cpu_bytes in cpu_peak.breakdown_bytes.items():
        fake_bytes = fake_peak.breakdown_bytes[category]
        assert abs(fake_bytes - cpu_bytes) <= 0.01 * max(cpu_bytes, 1), category
    assert fake.trace.final_bytes() == cpu.trace.final_bytes()
    assert (fake.num_params, fake.num_trainable_params) == (
        cpu.num_params,
        cpu.num_trainable_params,
    )


@pytest.mark.parametrize("backend", ["hf", "reference"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize(("batch", "seq", "attention"), SHAPES)
def test_llama_grid(
    backend: str, method: str, ckpt: bool, batch: int, seq: int, attention: str
) -> None:
    spec = load_model("tiny-llama")
    setup = _setup(method, ckpt, batch, seq, attention)
    if backend == "reference" and tuning(method).needs_transformers:
        with pytest.raises(MemplanError, match="needs a transformers"):
            trace_step(spec, setup, mode="fake", backend=backend, steps=1)  # type: ignore[arg-type]
        return
    fake = trace_step(spec, setup, mode="fake", backend=backend, steps=1)  # type: ignore[arg-type]
    cpu = trace_step(spec, setup, mode="cpu", backend=backend, steps=1)  # type: ignore[arg-type]
    _assert_agree(fake, cpu)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_llama_two_steps(method: str, ckpt: bool) -> None:
    spec = load_model("tiny-llama")
    setup = _setup(method, ckpt, 2, 64, "sdpa")
    _assert_agree(trace_step(spec, setup, mode="fake"), trace_step(spec, setup, mode="cpu"))


@pytest.mark.parametrize(("model", "method"), OTHERS)
def test_other_families(model: str, method: str) -> None:
    spec = load_model(model)
    batch, seq, attention = SHAPES[method_names().index(method) % len(SHAPES)]
    setup = _setup(method, method in ("lora", "qlora"), batch, seq, attention)
    _assert_agree(trace_step(spec, setup, mode="fake"), trace_step(spec, setup, mode="cpu"))


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_kbit_prep(ckpt: bool) -> None:
    # peft's prepare_model_for_kbit_training on the quantized meta model, bf16 autocast.
    spec = load_model("tiny-llama")
    fields = _setup("qlora", ckpt, 2, 64, "sdpa").model_dump(exclude={"defaults_from_method"})
    setup = TrainingSetup(**fields | {"kbit_prep": True, "precision": "bf16-amp"})
    _assert_agree(trace_step(spec, setup, mode="fake"), trace_step(spec, setup, mode="cpu"))

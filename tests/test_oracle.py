"""The oracle: the analytical model against real CPU training steps, for everything registered.

The grid is generated from the registries, never hand-listed: every family
(:mod:`memplan.families`, through its tiny catalog model) x every method
(:mod:`memplan.methods`) it supports x checkpointing off/on x eager/SDPA attention x two batch
shapes, and every quantized method once more as the Hugging Face QLoRA recipe runs it
(``kbit_prep``: loaded in bf16, peft's prepare_model_for_kbit_training, bf16 autocast) on one
shape. A new family or method is covered by being registered. For each configuration the
same step is measured on real CPU tensors (memplan.torchsim tracks every storage) and predicted
with ``device="cpu"`` (CPU kernels: dropout masks in the input dtype, the math SDPA path when
attention dropout is on, LayerNorm statistics in the input dtype).

The analytical peak must be within 1% of the measured one, in total and per category. Per
category means each category's bytes at the peak; when two moments of a step come within a
percent of each other the measured and predicted peaks can land on different instants, and
breakdowns taken at different instants compare nothing, so a category also passes when its
high-water mark over the two steps agrees. A category's error is measured against the peak,
so categories of a few hundred bytes (the loss scalar) need not agree to the byte.

Combinations a real run refuses are not in the grid; ``test_refused_combinations_say_why``
checks that the analytical model and the tracer refuse each of them in one line.
The trainable tensors (names and sizes) must be the same in the analytical model and in the
torch model the tracer builds, for every family and method.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import cache
from typing import Any

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.analytic.context import StepContext  # noqa: E402
from memplan.analytic.predict import check_applicable, predict  # noqa: E402
from memplan.analytic.weights import model_state  # noqa: E402
from memplan.architecture import architecture  # noqa: E402
from memplan.catalog import load_model  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.families import families  # noqa: E402
from memplan.methods import method_names  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim.runner import RunRequest, prepare_model  # noqa: E402
from memplan.torchsim.step import trace_step  # noqa: E402
from memplan.trace import ALLOCATED_CATEGORIES, Category, Peak  # noqa: E402

pytestmark = pytest.mark.torch

TOLERANCE = 0.01
SHAPES = ((1, 32), (2, 64))  # (micro-batch, sequence length)
ATTENTION = ("eager", "sdpa")
TINY = {name: fam.tiny_model for name, fam in families().items()}
# The Hugging Face QLoRA recipe (kbit_prep: 16-bit load, prepare_model_for_kbit_training, AMP)
# for every quantized method, on one shape.
KBIT_PREP_PRECISION = "bf16-amp"
KBIT_PREP_SHAPE = (2, 64)


def _setup(
    method: str, ckpt: bool, batch: int, seq: int, attention: str, *, kbit_prep: bool = False
) -> TrainingSetup:
    fields: dict[str, Any] = {"method": method, "micro_batch_size": batch, "seq_len": seq}
    fields |= {"grad_ckpt": ckpt, "attention": attention, "device": "cpu"}
    if kbit_prep:
        fields |= {"kbit_prep": True, "precision": KBIT_PREP_PRECISION}
    return TrainingSetup(**fields)


def _refusal(family: str, method: str, ckpt: bool) -> str | None:
    """Why a real run refuses this combination (None: it runs)."""
    try:
        setup = _setup(method, ckpt, 1, 32, "sdpa")
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"])
    try:
        check_applicable(load_model(TINY[family]), setup)
    except MemplanError as exc:
        return str(exc)
    return None


def _grid() -> list[Any]:
    cases = []
    for family, method, ckpt in itertools.product(TINY, method_names(), (False, True)):
        if _refusal(family, method, ckpt):
            continue
        if ckpt and not TrainingSetup(method=method).trains_weights:
            continue  # checkpointing changes only a step that records a graph
        for attention, (batch, seq) in itertools.product(ATTENTION, SHAPES):
            label = (
                f"{TINY[family]}-{method}-{'ckpt' if ckpt else 'nockpt'}-{attention}-b{batch}s{seq}"
            )
            cases.append(pytest.param(family, method, ckpt, attention, batch, seq, id=label))
    return cases


def _kbit_prep_grid() -> list[Any]:
    cases = []
    for family, method, ckpt in itertools.product(TINY, method_names(), (False, True)):
        if _refusal(family, method, ckpt) or TrainingSetup(method=method).quant.value == "none":
            continue
        batch, seq = KBIT_PREP_SHAPE
        label = f"{TINY[family]}-{method}-kbit-prep-{'ckpt' if ckpt else 'nockpt'}-b{batch}s{seq}"
        cases.append(pytest.param(family, method, ckpt, "sdpa", batch, seq, True, id=label))
    return cases


@cache
def _peaks(
    family: str,
    method: str,
    ckpt: bool,
    attention: str,
    batch: int,
    seq: int,
    kbit_prep: bool = False,
) -> tuple[tuple[Peak, dict[Category, int]], tuple[Peak, dict[Category, int]]]:
    torch.set_num_threads(1)
    spec = load_model(TINY[family])
    setup = _setup(method, ckpt, batch, seq, attention, kbit_prep=kbit_prep)
    measured = trace_step(spec, setup, mode="cpu").trace
    analytical = predict(spec, setup).trace
    return (
        (measured.peak(), measured.category_peaks()),
        (analytical.peak(), analytical.category_peaks()),
    )


@pytest.mark.parametrize(
    ("family", "method", "ckpt", "attention", "batch", "seq", "kbit_prep"),
    [pytest.param(*p.values, False, id=p.id) for p in _grid()] + _kbit_prep_grid(),
)
def test_analytical_equals_measured_within_one_percent(
    family: str, method: str, ckpt: bool, attention: str, batch: int, seq: int, kbit_prep: bool
) -> None:
    (measured, measured_most), (analytical, analytical_most) = _peaks(
        family, method, ckpt, attention, batch, seq, kbit_prep
    )
    assert analytical.peak_bytes == pytest.approx(measured.peak_bytes, rel=TOLERANCE), (
        f"predicted {analytical.peak_bytes:,} B in {analytical.phase.value}, measured "
        f"{measured.peak_bytes:,} B in {measured.phase.value}"
    )
    allowed = TOLERANCE * measured.peak_bytes
    for category in ALLOCATED_CATEGORIES:
        at_peak = abs(analytical.breakdown_bytes[category] - measured.breakdown_bytes[category])
        most = abs(analytical_most[category] - measured_most[category])
        assert at_peak <= allowed or most <= allowed, (
            f"{category.value}: predicted {analytical.breakdown_bytes[category]:,} B at the "
            f"peak and at most {analytical_most[category]:,} B; measured "
            f"{measured.breakdown_bytes[category]:,} B and {measured_most[category]:,} B "
            f"(peak {measured.peak_bytes:,} B)"
        )


# -- memory features of the training stacks ---------------------------------------------------

# Each feature the tracer runs for real, with the methods it is held to on every family: the
# grid grows by families x methods, one shape (torchtune's chunked loss on 126 counted tokens:
# 8 chunks of 16 and 15 rows; optimizer-in-backward through register_post_accumulate_grad_hook;
# DPO through trl's fused LM head on 2 pairs, 4 sequences).
FEATURES: dict[str, dict[str, Any]] = {
    "chunked-loss": {"loss": "chunked"},
    "optimizer-in-backward": {"optimizer_in_backward": True},
    # trl's DPO: full fine-tuning against a reference copy, LoRA against its adapters disabled.
    "dpo": {"objective": "dpo"},
    "dpo-precomputed-ref": {"objective": "dpo", "precomputed_ref": True},
    "dpo-ckpt": {"objective": "dpo", "grad_ckpt": True},
}
FEATURE_METHODS = {
    "chunked-loss": ("full", "lora"),
    "optimizer-in-backward": ("full", "lora"),
    "dpo": ("full", "lora"),
    "dpo-precomputed-ref": ("lora",),
    "dpo-ckpt": ("lora",),
}
FEATURE_SHAPE = (2, 64)


def _feature_setup(method: str, feature: str) -> TrainingSetup:
    batch, seq = FEATURE_SHAPE
    fields = {"method": method, "micro_batch_size": batch, "seq_len": seq, "device": "cpu"}
    return TrainingSetup(**fields, **FEATURES[feature])


def _feature_refusal(family: str, method: str, feature: str) -> str | None:
    try:
        check_applicable(load_model(TINY[family]), _feature_setup(method, feature))
    except MemplanError as exc:
        return str(exc)
    return None


def _feature_cases(*, refused: bool) -> list[Any]:
    return [
        pytest.param(family, method, feature, id=f"{TINY[family]}-{method}-{feature}")
        for feature, methods in FEATURE_METHODS.items()
        for family, method in itertools.product(TINY, methods)
        if not _refusal(family, method, False)
        and bool(_feature_refusal(family, method, feature)) == refused
    ]


@pytest.mark.parametrize(("family", "method", "feature"), _feature_cases(refused=False))
def test_features_analytical_equals_measured_within_one_percent(
    family: str, method: str, feature: str
) -> None:
    torch.set_num_threads(1)
    spec = load_model(TINY[family])
    setup = _feature_setup(method, feature)
    measured = trace_step(spec, setup, mode="cpu").trace
    analytical = predict(spec, setup).trace
    peak, predicted = measured.peak(), analytical.peak()
    assert predicted.peak_bytes == pytest.approx(peak.peak_bytes, rel=TOLERANCE), (
        f"predicted {predicted.peak_bytes:,} B in {predicted.phase.value}, measured "
        f"{peak.peak_bytes:,} B in {peak.phase.value}"
    )
    allowed = TOLERANCE * peak.peak_bytes
    most, predicted_most = measured.category_peaks(), analytical.category_peaks()
    for category in ALLOCATED_CATEGORIES:
        at_peak = abs(predicted.breakdown_bytes[category] - peak.breakdown_bytes[category])
        assert at_peak <= allowed or abs(predicted_most[category] - most[category]) <= allowed, (
            f"{category.value}: predicted {predicted.breakdown_bytes[category]:,} B at the "
            f"peak, measured {peak.breakdown_bytes[category]:,} B"
        )


@pytest.mark.parametrize(("family", "method", "feature"), _feature_cases(refused=True))
def test_refused_features_say_why(family: str, method: str, feature: str) -> None:
    reason = _feature_refusal(family, method, feature)
    assert reason is not None
    assert "\n" not in reason
    with pytest.raises(MemplanError, match=re.escape(reason)):
        prepare_model(RunRequest(load_model(TINY[family]), _feature_setup(method, feature)))


# -- what is refused ------------------------------------------------------------------------


def _refused() -> list[Any]:
    return [
        pytest.param(family, method, ckpt, id=f"{TINY[family]}-{method}-{'ckpt' if ckpt else ''}")
        for family, method, ckpt in itertools.product(TINY, method_names(), (False, True))
        if _refusal(family, method, ckpt)
    ]


@pytest.mark.parametrize(("family", "method", "ckpt"), _refused())
def test_refused_combinations_say_why(family: str, method: str, ckpt: bool) -> None:
    reason = _refusal(family, method, ckpt)
    assert reason is not None
    assert "\n" not in reason
    # The tracer refuses the same setups (it checks the same method and family modules).
    try:
        setup = _setup(method, ckpt, 1, 32, "sdpa")
    except ValidationError:
        return  # refused before any model is built
    with pytest.raises(MemplanError, match=re.escape(reason)):
        prepare_model(RunRequest(load_model(TINY[family]), setup))


# -- trainable tensors ----------------------------------------------------------------------


_LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")  # DoRA adds the magnitude


def _analytical_key(label: str) -> str:
    """A trainable tensor's name as the leaf of its module path: 'q_proj.lora_A',
    'ln_1.bias', 'down.weight' (memplan labels are block.tensor[.part])."""
    parts = label.split(".")
    if parts[-1] in _LORA_PARTS:  # block.module.weight.lora_X
        return f"{parts[-3]}.{parts[-1]}"
    return ".".join(parts[-2:])


def _torch_key(name: str) -> str:
    """The same key for a torch parameter name (peft adds '.default' and '.weight')."""
    parts = [p for p in name.split(".") if p != "default"]
    for part in _LORA_PARTS:
        if part in parts:
            i = parts.index(part)
            return f"{parts[i - 1]}.{part}"
    return ".".join(parts[-2:])


def _trainable_cases() -> list[Any]:
    return [
        pytest.param(family, method, id=f"{TINY[family]}-{method}")
        for family, method in itertools.product(TINY, method_names())
        if not _refusal(family, method, False) and TrainingSetup(method=method).trains_weights
    ]


@pytest.mark.parametrize(("family", "method"), _trainable_cases())
def test_trainable_tensors_are_the_ones_the_torch_model_trains(family: str, method: str) -> None:
    spec = load_model(TINY[family])
    setup = _setup(method, False, 1, 32, "sdpa")
    ctx = StepContext.build(spec, setup)
    state = model_state(architecture(spec), setup, ctx)
    # Elements per tensor name (MoE experts: one 3-D tensor per layer and projection).
    ours: Counter[str] = Counter()
    for group in state.trainable:
        ours[_analytical_key(group.label)] += group.numel * group.count
    model, _ = prepare_model(RunRequest(spec, setup))
    theirs: Counter[str] = Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:
            theirs[_torch_key(name)] += param.numel()
    assert ours == theirs
    assert state.num_trainable_params == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


# -- CUDA semantics -------------------------------------------------------------------------
# The analytical model of a CUDA step against the fake trace with CUDA's kernels
# (memplan.torchsim.cuda_kernels): every family x full / LoRA / QLoRA, each method on one
# (checkpointing, attention) pair so that every family meets checkpointing on and off and both
# attentions, on one shape (the whole CPU grid twice would double the suite's time).
CUDA_METHODS = {"full": (False, "sdpa"), "lora": (True, "eager"), "qlora": (True, "sdpa")}
CUDA_SHAPE = (2, 64)


def _cuda_grid() -> list[Any]:
    cases = []
    for family, (method, (ckpt, attention)) in itertools.product(TINY, CUDA_METHODS.items()):
        if _refusal(family, method, ckpt):
            continue
        label = f"{TINY[family]}-{method}-{'ckpt' if ckpt else 'nockpt'}-{attention}-cuda"
        cases.append(pytest.param(family, method, ckpt, attention, id=label))
    return cases


@cache
def _cuda_peaks(
    family: str, method: str, ckpt: bool, attention: str
) -> tuple[tuple[Peak, dict[Category, int]], tuple[Peak, dict[Category, int]]]:
    spec = load_model(TINY[family])
    batch, seq = CUDA_SHAPE
    setup = _setup(method, ckpt, batch, seq, attention).model_copy(update={"device": "cuda"})
    simulated = trace_step(spec, setup, mode="fake", kernels="cuda").trace
    analytical = predict(spec, setup).trace
    return (
        (simulated.peak(), simulated.category_peaks()),
        (analytical.peak(), analytical.category_peaks()),
    )


@pytest.mark.parametrize(("family", "method", "ckpt", "attention"), _cuda_grid())
def test_analytical_equals_simulated_with_cuda_kernels_within_one_percent(
    family: str, method: str, ckpt: bool, attention: str
) -> None:
    (simulated, simulated_most), (analytical, analytical_most) = _cuda_peaks(
        family, method, ckpt, attention
    )
    assert analytical.peak_bytes == pytest.approx(simulated.peak_bytes, rel=TOLERANCE), (
        f"predicted {analytical.peak_bytes:,} B in {analytical.phase.value}, simulated "
        f"{simulated.peak_bytes:,} B in {simulated.phase.value}"
    )
    allowed = TOLERANCE * simulated.peak_bytes
    for category in ALLOCATED_CATEGORIES:
        at_peak = abs(analytical.breakdown_bytes[category] - simulated.breakdown_bytes[category])
        most = abs(analytical_most[category] - simulated_most[category])
        assert at_peak <= allowed or most <= allowed, (
            f"{category.value}: predicted {analytical.breakdown_bytes[category]:,} B at the "
            f"peak and at most {analytical_most[category]:,} B; simulated "
            f"{simulated.breakdown_bytes[category]:,} B and {simulated_most[category]:,} B "
            f"(peak {simulated.peak_bytes:,} B)"
        )

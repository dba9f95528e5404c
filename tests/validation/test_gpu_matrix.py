"""validation/gpu/matrix.py: the matrix the issue asks for, and the driver run end to end on CPU."""

from __future__ import annotations

import datetime as dt
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from memplan.catalog import load_model
from memplan.plan import plan, resolve_gpu
from memplan.specs import ALL_LINEAR, TrainingSetup
from memplan.verify import load_runs

MATRIX_PY = Path(__file__).resolve().parents[2] / "validation" / "gpu" / "matrix.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_matrix", MATRIX_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


matrix = _load()
CASES = matrix.cases()
MATRIX = [c for c in CASES if "headline" not in c.tags]


def test_at_least_forty_configurations_with_unique_labels() -> None:
    assert len(MATRIX) >= 40
    assert len({c.label for c in CASES}) == len(CASES)


def test_matrix_spans_sizes_methods_precisions_and_checkpointing() -> None:
    sizes = {
        load_model(c.model).name: plan(load_model(c.model), TrainingSetup()).params for c in MATRIX
    }
    assert min(sizes.values()) < 0.6e9
    assert 7e9 < max(sizes.values()) < 9e9
    assert {c.setup["method"] for c in MATRIX} == {"full", "lora", "qlora", "bitfit"}
    assert {c.setup["precision"] for c in MATRIX} == {"bf16", "bf16-amp"}
    assert {c.setup["grad_ckpt"] for c in MATRIX} == {True, False}
    assert len({(c.setup["micro_batch_size"], c.setup["seq_len"]) for c in MATRIX}) >= 5


def test_a_128k_vocabulary_case_where_logits_dominate() -> None:
    logits = [c for c in MATRIX if "logits" in c.tags]
    assert logits
    for case in logits:
        spec = load_model(case.model)
        assert spec.vocab_size >= 128_000
        result = plan(spec, TrainingSetup(**case.setup))
        # The logits outweigh everything else the step creates (the weights are resident).
        transient = {"activations", "temporaries", "gradients", "optimizer_state"}
        other = sum(v for k, v in result.breakdown_bytes.items() if k in transient)
        assert result.breakdown_bytes["logits"] > 3 * other


def test_headline_is_the_65b_qlora_step_capped_to_an_a6000() -> None:
    capped = [c for c in CASES if c.cap_to is not None]
    assert len(capped) == 1
    case = capped[0]
    assert case.model == "llama-65b"
    assert case.cap_to == "rtx-a6000"
    setup = TrainingSetup(**case.setup)
    assert (setup.method, setup.lora_r, setup.optimizer.value) == ("qlora", 64, "paged-adamw")
    assert setup.lora_targets == ALL_LINEAR
    assert (setup.micro_batch_size, setup.seq_len, setup.grad_ckpt) == (1, 512, True)
    assert setup.quant.value == "nf4"


@pytest.mark.parametrize("case", MATRIX, ids=[c.label for c in MATRIX])
def test_every_case_is_predicted_to_fit_an_80gb_h100(case: object) -> None:
    # The matrix measures peaks, not out-of-memory errors: each case fits with room.
    result = plan(load_model(case.model), TrainingSetup(**case.setup), gpu=resolve_gpu("h100-sxm"))
    assert result.fits
    assert result.margin_bytes is not None
    assert result.margin_bytes > 2 * 2**30


def test_results_file_is_named_after_the_gpu_and_date() -> None:
    when = dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)
    assert (
        matrix.results_name("NVIDIA H100 80GB HBM3", when)
        == "nvidia-h100-80gb-hbm3-2026-11-27.json"
    )


@pytest.mark.torch
def test_smoke_run_on_cpu_writes_a_readable_results_file(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    code = matrix.main(
        ["--device", "cpu", "--smoke", "--only", "b1 s512", "--out-dir", str(tmp_path)]
    )
    assert code == 0
    (path,) = tmp_path.glob("cpu-*.json")
    runs, _, device = load_runs(path)
    assert device == "cpu"
    wanted = [c.label for c in CASES if "b1 s512" in c.label]
    measured = [r.label for r in runs]
    if importlib.util.find_spec("bitsandbytes") is None:
        wanted = [w for w in wanted if "qlora" not in w]
    assert measured == wanted
    for run in runs:
        assert run.oom is None
        phases = {s.phase for s in run.samples}
        assert {"load", "forward"} <= phases
        if run.setup["method"] != "bitfit":
            assert {"backward", "optimizer", "zero_grad"} <= phases

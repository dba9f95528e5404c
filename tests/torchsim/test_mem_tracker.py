"""Side by side with PyTorch's own MemTracker (a private API: skipped when it is missing)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim.mem_tracker import measure_with_torch_mem_tracker  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module", autouse=True)
def _mem_tracker_available() -> None:
    pytest.importorskip("torch.distributed._tools.mem_tracker")


@pytest.mark.parametrize(
    ("method", "precision"),
    [("full", "fp32"), ("full", "bf16-amp"), ("lora", "bf16"), ("qlora", "bf16")],
)
def test_tracker_and_mem_tracker_agree_on_the_peak(method: str, precision: str) -> None:
    setup = TrainingSetup(method=method, precision=precision, micro_batch_size=2, seq_len=64)
    if method == "qlora":
        setup = setup.model_copy(update={"grad_ckpt": False})
    comparison = measure_with_torch_mem_tracker(load_model("tiny-llama"), setup)
    assert comparison.memtracker_peak_bytes > 0
    assert abs(comparison.relative_difference) <= 0.01
    assert comparison.speed_ratio > 0

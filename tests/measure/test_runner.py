"""The measurement driver, run on the CPU: the phases it samples, the model it builds, OOM records.

The driver is the same code a CUDA run executes; on the CPU the allocator counters read zero,
so these tests pin its structure (what is built, which phases are sampled, what is recorded).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.measure import cuda  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402

pytestmark = pytest.mark.torch

STEP_PHASES = ["forward", "backward", "optimizer", "zero_grad"]


def cpu_setup(**kwargs: Any) -> TrainingSetup:
    return TrainingSetup(device="cpu", micro_batch_size=2, seq_len=32, **kwargs)


def test_lora_run_samples_load_then_every_phase_of_every_step() -> None:
    run = cuda.run(load_model("tiny-llama"), cpu_setup(method="lora"), device="cpu", steps=2)
    phases = [(s.step, s.phase) for s in run.samples]
    assert phases == [(-1, "load")] + [(step, p) for step in (-1, 0, 1) for p in STEP_PHASES]
    assert run.oom is None
    assert run.model == "tiny-llama"
    assert run.setup["method"] == "lora"
    assert run.environment.device_name == "cpu"
    assert run.environment.torch == torch.__version__


def test_gradient_accumulation_samples_each_micro_batch() -> None:
    setup = cpu_setup(method="full", grad_accum_steps=3)
    run = cuda.run(load_model("tiny-llama"), setup, device="cpu", steps=1, warmup=0)
    backward = [s.micro_batch for s in run.samples if s.phase == "backward"]
    assert backward == [0, 1, 2]
    assert [s.phase for s in run.samples].count("optimizer") == 1


def test_built_lora_model_trains_exactly_the_predicted_parameters() -> None:
    from memplan.architecture import count_params

    spec = load_model("tiny-llama")
    setup = cpu_setup(method="lora", lora_r=8)
    model, _ = cuda.build(spec, setup, "cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # LoRA on q and v (the default): r * (in + out) per adapted matrix, two matrices per layer.
    q_out = spec.num_attention_heads * spec.head_dim
    v_out = spec.num_key_value_heads * spec.head_dim
    per_layer = 8 * (spec.hidden_size + q_out) + 8 * (spec.hidden_size + v_out)
    assert trainable == spec.num_layers * per_layer
    assert sum(p.numel() for p in model.parameters()) == count_params(spec) + trainable
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())


def test_frozen_model_runs_forward_only() -> None:
    run = cuda.run(load_model("tiny-llama"), cpu_setup(method="frozen"), device="cpu", steps=1)
    # Nothing trains: no backward, no optimizer.
    assert {s.phase for s in run.samples} == {"load", "forward"}


def test_out_of_memory_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79 GiB"
        )

    monkeypatch.setattr(cuda, "_step", boom)
    run = cuda.run(load_model("tiny-llama"), cpu_setup(method="lora"), device="cpu", steps=1)
    assert run.oom is not None
    assert run.oom.step == -1
    assert run.oom.requested_bytes == int(2.5 * 2**30)
    assert run.oom.message.startswith("CUDA out of memory")
    assert [s.phase for s in run.samples] == ["load"]


def test_oom_without_a_size_records_none() -> None:
    oom = cuda._oom(torch.cuda.OutOfMemoryError("out of memory"), 3, "backward")
    assert (oom.step, oom.phase, oom.requested_bytes) == (3, "backward", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on CPU-only machines")
def test_measure_on_cuda_without_a_gpu_is_a_one_line_error(run_cli: Any) -> None:
    result = run_cli("measure", "--model", "tiny-llama", "--device", "cuda")
    assert result.code == 2
    assert "no CUDA device" in result.err
    assert "Traceback" not in result.err


def test_qlora_swaps_every_linear_but_the_head() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    spec = load_model("tiny-llama")
    model, _ = cuda.build(spec, cpu_setup(method="qlora"), "cpu")
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # q, k, v, o, gate, up, down in every layer; the LM head stays 16-bit (transformers' rule).
    assert len(four_bit) == 7 * spec.num_layers


def test_sharded_layout_without_a_launcher_is_a_one_line_error(
    run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = run_cli("measure", "--model", "tiny-llama", "--device", "cuda", "--zero", "3")
    assert result.code == 2
    assert "accelerate launch" in result.err


@pytest.mark.parametrize(
    ("visible", "local_rank", "index"),
    [(None, "0", 0), (None, "3", 3), ("4,5,6", "1", 5), ("GPU-uuid", "0", 0)],
)
def test_nvml_index_follows_visible_devices_and_local_rank(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, local_rank: str, index: int
) -> None:
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert cuda._physical_index() == index

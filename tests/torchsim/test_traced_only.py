"""An architecture no family models: ``plan`` refuses it in one line, ``simulate`` traces it.

The model is a tiny GPT-J (transformers knows ``gptj``; no memplan family reads it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.catalog.hf_model import meta_model  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.families import families  # noqa: E402
from memplan.plan import plan  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import trace_step  # noqa: E402

pytestmark = pytest.mark.torch

GPTJ: dict[str, Any] = {
    "model_type": "gptj",
    "architectures": ["GPTJForCausalLM"],
    "n_embd": 64,
    "n_head": 4,
    "n_layer": 2,
    "n_positions": 128,
    "rotary_dim": 8,
    "vocab_size": 256,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


@pytest.fixture
def gptj(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-gptj" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(GPTJ))
    return path


def test_plan_refuses_an_unmodeled_type_naming_the_supported_ones(
    gptj: Path, run_cli: Callable[..., Any]
) -> None:
    run = run_cli("plan", str(gptj), "--gpu", "a100-80gb")
    assert run.code == 2
    assert run.out == ""
    assert len(run.err.strip().splitlines()) == 1
    assert "unsupported model_type 'gptj'" in run.err
    assert "llama" in run.err
    assert "memplan simulate" in run.err


def test_the_api_refuses_to_plan_a_traced_only_spec(gptj: Path) -> None:
    spec = load_model(gptj, traced_only=True)
    with pytest.raises(MemplanError, match="no model family describes model_type 'gptj'"):
        plan(spec, TrainingSetup(method="lora"))


def test_traced_only_is_not_registered() -> None:
    # The oracle grid and the supported lists come from the registry: no traced-only there.
    assert all(not fam.traced_only for fam in families().values())


def test_spec_reads_transformers_own_configuration(gptj: Path) -> None:
    spec = load_model(gptj, traced_only=True)
    assert (spec.hidden_size, spec.num_decoder_layers, spec.num_attention_heads) == (64, 2, 4)
    assert spec.vocab_size == 256
    assert spec.position_embedding == "rope"


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_simulate_traces_it_and_says_so(
    gptj: Path, run_cli: Callable[..., Any], method: str
) -> None:
    run = run_cli(
        "simulate", str(gptj), "--method", method, "--batch", "1", "--seq", "32", "--json"
    )
    assert run.code == 0, run.err
    payload = run.json()
    assert payload["analytical"] is None
    assert payload["difference_bytes"] == {}
    assert payload["assumptions"][0].startswith("traced only: no memplan family describes")
    assert payload["peak_bytes"] > 0
    # sum(p.numel()) of the transformers model (an NF4 weight counts its logical elements),
    # plus the adapters, which are what trains under LoRA
    base = sum(p.numel() for p in meta_model(GPTJ).parameters())
    added = 0 if method == "full" else payload["trainable_params"]
    assert payload["params"] == base + added
    assert 0 < payload["trainable_params"] <= payload["params"]


def test_fake_trace_equals_the_cpu_step(gptj: Path) -> None:
    spec = load_model(gptj, traced_only=True)
    setup = TrainingSetup(method="lora", micro_batch_size=2, seq_len=32, grad_ckpt=False)
    fake = trace_step(spec, setup, mode="fake")
    cpu = trace_step(spec, setup, mode="cpu")
    assert fake.peak_bytes == cpu.peak_bytes
    assert fake.trace.peak().breakdown_bytes == cpu.trace.peak().breakdown_bytes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "adapter"], "method adapter needs its layers described"),
        (["--method", "lora", "--lora-targets", "q,v"], "does not lay out its parameters"),
    ],
)
def test_what_needs_the_layers_is_refused_in_one_line(
    gptj: Path, run_cli: Callable[..., Any], argv: list[str], message: str
) -> None:
    run = run_cli("simulate", str(gptj), *argv)
    assert run.code == 2
    assert len(run.err.strip().splitlines()) == 1
    assert message in run.err


def test_a_type_transformers_does_not_know_is_refused(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 64}))
    run = run_cli("simulate", str(path))
    assert run.code == 2
    assert "transformers does not know model_type 'no-such-model'" in run.err

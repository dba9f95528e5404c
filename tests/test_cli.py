"""The ``memplan`` command line: verdicts, the --json contract, one-line errors with status 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.methods.lora import parse_targets
from memplan.specs import ALL_LINEAR

ROOT = Path(__file__).resolve().parents[1]
CATALOG_FILES = sorted((ROOT / "memplan" / "catalog" / "data").rglob("*.json"))
PROFILE_FILES = sorted((ROOT / "hardware_profiles").glob("*.json"))

# The --json contract of `memplan plan` (README, PlanResult): what scripts may rely on.
CONTRACT_KEYS = {
    "peak_bytes",
    "reserved_bytes",
    "device_bytes",
    "peak_phase",
    "breakdown_bytes",
    "params",
    "trainable_params",
    "cpu_bytes",
    "gpu_capacity_bytes",
    "fits",
    "assumptions",
}

Run = Callable[..., Any]  # the run_cli fixture (conftest): argv -> CliRun(code, out, err)


# -- plan ----------------------------------------------------------------------------------


def test_llama_65b_qlora_fits_an_rtx_a6000(run_cli: Run) -> None:
    result = run_cli("plan", "llama-65b", "--method", "qlora", "--gpu", "rtx-a6000")
    assert result.code == 0
    assert result.err == ""
    first = result.out.splitlines()[0]
    assert first.startswith(("FITS on rtx-a6000", "BORDERLINE on rtx-a6000"))
    assert "GiB" in first
    assert result.out.splitlines()[1].startswith("published qlora runs")


def test_full_65b_does_not_fit(run_cli: Run) -> None:
    result = run_cli("plan", "llama-65b", "--gpu", "rtx-a6000")
    assert result.code == 0
    assert result.out.splitlines()[0].startswith("DOES NOT FIT on rtx-a6000")


def test_json_has_every_key_of_the_contract(run_cli: Run) -> None:
    result = run_cli("plan", "llama-65b", "--method", "qlora", "--gpu", "rtx-a6000", "--json")
    assert result.code == 0
    data = result.json()
    assert set(data) >= CONTRACT_KEYS
    assert sum(data["breakdown_bytes"].values()) == data["peak_bytes"]
    assert data["fits"] is True
    assert data["params"] == 65_285_660_672
    assert data["trainable_params"] == 799_539_200
    assert data["cpu_bytes"] == 0
    assert data["peak_phase"] in ("forward", "loss", "backward", "optimizer")
    assert data["reserved_bytes"] >= data["peak_bytes"]
    assert data["device_bytes"] > data["reserved_bytes"]
    assert data["gpu_capacity_bytes"] > data["device_bytes"]
    assert isinstance(data["assumptions"], list)
    assert all(isinstance(line, str) and line for line in data["assumptions"])
    for key in ("peak_bytes", "reserved_bytes", "device_bytes", "cpu_bytes", "params"):
        assert isinstance(data[key], int)  # bytes stay integers in JSON


@pytest.mark.parametrize(("gpu", "capacity"), [("48GB", 48 * 10**9), ("24GiB", 24 * 2**30)])
def test_gpu_as_a_capacity(run_cli: Run, gpu: str, capacity: int) -> None:
    data = run_cli("plan", "llama-2-7b", "--method", "qlora", "--gpu", gpu, "--json").json()
    assert data["gpu_capacity_bytes"] == capacity
    assert data["fits"] is (data["device_bytes"] - data["paged_bytes"] <= capacity)


def test_without_gpu_fits_is_null(run_cli: Run) -> None:
    result = run_cli("plan", "tiny-llama", "--json")
    assert result.code == 0
    data = result.json()
    assert data["fits"] is None
    assert data["gpu_capacity_bytes"] is None
    assert '"fits": null' in result.out


def test_flags_reach_the_setup(run_cli: Run) -> None:
    data = run_cli(
        "plan", "tiny-llama", "--method", "lora", "--batch", "4", "--seq", "128",
        "--grad-ckpt", "--grad-accum", "2", "--lora-r", "16", "--gpus", "2", "--zero", "2",
        "--json",
    ).json()  # fmt: skip
    setup, parallel = data["setup"], data["parallel"]
    assert (setup["micro_batch_size"], setup["seq_len"], setup["grad_accum_steps"]) == (4, 128, 2)
    assert (setup["grad_ckpt"], setup["lora_r"], setup["method"]) == (True, 16, "lora")
    assert (parallel["num_gpus"], parallel["zero_stage"]) == (2, 2)


def test_a_config_json_path_is_planned(run_cli: Run, tmp_path: Path) -> None:
    record = json.loads((ROOT / "memplan" / "catalog" / "data" / "tiny-llama.json").read_text())
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(record["config"]))
    from_file = run_cli("plan", str(folder / "config.json"), "--json").json()
    from_catalog = run_cli("plan", "tiny-llama", "--json").json()
    assert from_file["model"] == "my-model"
    assert from_file["peak_bytes"] == from_catalog["peak_bytes"]
    assert run_cli("plan", str(folder), "--json").json()["peak_bytes"] == from_file["peak_bytes"]


# -- --lora-targets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "text", "roles"),
    [
        ("tiny-llama", "q,v", ("q", "v")),
        ("tiny-llama", "q_proj,v_proj", ("q", "v")),
        ("tiny-llama", "self_attn.q_proj, v_proj", ("q", "v")),
        ("tiny-bert", "query,value", ("q", "v")),  # BERT module names
        ("tiny-gpt2", "c_attn", ("qkv",)),
        ("tiny-gpt2", "attn.c_proj", ("o",)),  # the attention's, not the MLP's c_proj
        ("tiny-falcon", "query_key_value,dense_h_to_4h", ("qkv", "up")),
        ("tiny-t5", "wi_0,wo", ("gate", "down")),
        ("tiny-llama", "q_proj,q", ("q",)),  # duplicates collapse
        ("tiny-llama", "all-linear", ALL_LINEAR),
        ("tiny-llama", "attn", ("q", "k", "v", "o", "qkv")),
        ("tiny-llama", "mlp", ("gate", "up", "gate_up", "down")),
    ],
)
def test_parse_lora_targets(model: str, text: str, roles: tuple[str, ...]) -> None:
    assert parse_targets(text, load_model(model)) == roles


@pytest.mark.parametrize(
    ("model", "text", "needle"),
    [
        ("tiny-llama", "foo", "tiny-llama has no linear layer 'foo'"),
        ("tiny-gpt2", "q_proj", "tiny-gpt2 has no linear layer 'q_proj'"),
        ("tiny-llama", " , ", "empty"),
        ("tiny-llama", "", "empty"),
    ],
)
def test_parse_lora_targets_rejects(model: str, text: str, needle: str) -> None:
    with pytest.raises(MemplanError, match=needle):
        parse_targets(text, load_model(model))


def test_lora_targets_reach_the_setup(run_cli: Run) -> None:
    data = run_cli(
        "plan",
        "tiny-llama",
        "--method",
        "lora",
        "--lora-targets",
        "q_proj,k_proj,down_proj",
        "--json",
    ).json()
    assert data["setup"]["lora_targets"] == ["q", "k", "down"]
    lines = [a for a in data["assumptions"] if a.startswith("LoRA")]
    assert lines == [lines[0]]
    assert "on down_proj, k_proj, q_proj;" in lines[0]


# -- bad input: one line on stderr, status 2 -----------------------------------------------


def _bad(run_cli: Run, *argv: str) -> str:
    result = run_cli(*argv)
    assert result.code == 2
    assert result.out == ""
    lines: list[str] = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("memplan: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--fsdp",), "PyTorch FSDP FULL_SHARD (model state split 16 ways)"),
        (("--fsdp-strategy", "shard-grad-op"), "PyTorch FSDP SHARD_GRAD_OP (model state split 16"),
        (("--fsdp-strategy", "no-shard"), "FSDP NO_SHARD (every rank holds the whole model state)"),
        (("--fsdp-strategy", "hybrid-shard"), "PyTorch FSDP HYBRID_SHARD (model state split 8"),
        (("--fsdp-strategy", "hybrid-shard", "--gpus-per-node", "4"), "split 4 ways"),
    ],
)
def test_fsdp_strategies_are_named_in_the_assumptions(
    run_cli: Run, flags: tuple[str, ...], words: str
) -> None:
    result = run_cli("plan", "llama-2-7b", "--gpus", "16", *flags, "--json")
    assert result.code == 0, result.err
    assert any(words in line for line in result.json()["assumptions"])


def test_unknown_model_suggests_close_names(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "lama-2-7b")
    assert "unknown model 'lama-2-7b'" in line
    assert "did you mean llama-2-7b" in line


def test_malformed_config_json(run_cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",\n  "hidden_size": }')
    line = _bad(run_cli, "plan", str(path))
    assert str(path) in line
    assert "malformed JSON" in line
    assert "line 2" in line


def test_unsupported_model_type(run_cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mamba", "hidden_size": 768}))
    line = _bad(run_cli, "plan", str(path))
    assert "unsupported model_type 'mamba'" in line
    assert "llama" in line  # lists what is supported


def test_missing_config_file(run_cli: Run, tmp_path: Path) -> None:
    line = _bad(run_cli, "plan", str(tmp_path / "nope.json"))
    assert "cannot read config file" in line
    assert "No such file" in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch", "0"), ("--batch", "-1"), ("--seq", "0"), ("--seq", "-512")]
)
def test_non_positive_batch_and_sequence(run_cli: Run, flag: str, value: str) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", flag, value)
    assert f"invalid {flag}" in line
    assert "greater than 0" in line
    assert f"got {value}" in line


def test_qlora_in_fp32(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--method", "qlora", "--precision", "fp32")
    assert "method=qlora" in line
    assert "fp32" in line


def test_tensor_parallel_degree_not_dividing_the_heads(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--gpus", "3", "--tp", "3")
    assert "tensor_parallel_degree=3 does not divide num_attention_heads=32" in line


def test_tensor_parallel_degree_not_dividing_the_gpus(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--gpus", "4", "--tp", "3")
    assert "does not divide num_gpus=4" in line


def test_bitfit_on_a_model_without_biases(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--method", "bitfit")
    assert "method=bitfit" in line
    assert "llama-2-7b has none" in line


def test_unknown_gpu(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--gpu", "rtx-9999")
    assert "unknown hardware 'rtx-9999'" in line


def test_unknown_gpu_hint_names_a_real_command(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--gpu", "zzz")
    assert "`memplan gpus`" in line


@pytest.mark.parametrize(
    "argv",
    [
        ("plan", "llama-2-7b", "--gpu", "0GB"),
        ("plan", "llama-2-7b", "--method", "nope"),  # argparse errors are one line too
        ("plan", "llama-2-7b", "--batch", "two"),
        ("plan", "llama-2-7b", "--lora-targets", "foo"),
        ("plan", "llama-2-7b", "--fsdp", "--zero", "1", "--gpus", "2"),
        ("plan", "llama-2-7b", "--fsdp-strategy", "no-shard", "--zero", "3", "--gpus", "2"),
        ("plan", "llama-2-7b", "--fsdp-strategy", "sideways", "--gpus", "2"),
        ("plan", "llama-2-7b", "--gpus", "16", "--gpus-per-node", "8"),
        (
            "plan",
            "llama-2-7b",
            "--gpus",
            "16",
            "--fsdp-strategy",
            "hybrid-shard",
            "--gpus-per-node",
            "3",
        ),
        ("plan", "llama-2-7b", "--gpus", "2", "--fsdp", "--offload", "optimizer"),
        ("plan", "llama-2-7b", "--offload", "optimizer"),
        ("plan", "llama-2-7b", "--method", "full", "--quant", "nf4"),
        ("bogus-command",),
        (),
    ],
)
def test_other_bad_input_is_one_line_too(run_cli: Run, argv: tuple[str, ...]) -> None:
    _bad(run_cli, *argv)


# -- models, gpus --------------------------------------------------------------------------


def test_models_lists_every_catalog_entry(run_cli: Run) -> None:
    rows = run_cli("models", "--json").json()
    assert [r["name"] for r in rows] == sorted(p.stem for p in CATALOG_FILES)
    for row in rows:
        record = json.loads(next(p for p in CATALOG_FILES if p.stem == row["name"]).read_text())
        assert row["params"] == record["num_params"]


def test_models_table_shows_every_name(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = run_cli("models").out
    for path in CATALOG_FILES:
        assert f" {path.stem} " in out
    assert "6,738,415,616" in out  # llama-2-7b's parameter count, formatted


def test_gpus_lists_every_hardware_profile(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    names = sorted(json.loads(p.read_text())["name"] for p in PROFILE_FILES)
    assert [p["name"] for p in run_cli("gpus", "--json").json()] == names
    monkeypatch.setenv("COLUMNS", "250")
    out = run_cli("gpus").out
    for name in names:
        assert f" {name} " in out


# -- the installed script ------------------------------------------------------------------


def test_installed_script_runs_a_plan() -> None:
    script = Path(sys.executable).with_name("memplan")
    assert script.exists(), "pip install -e . puts a memplan script beside the interpreter"
    proc = subprocess.run(
        [str(script), "plan", "llama-65b", "--method", "qlora", "--gpu", "rtx-a6000", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fits"] is True
    assert set(data) >= CONTRACT_KEYS
    bad = subprocess.run(
        [str(script), "plan", "llama-2-7b", "--batch", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1


def _commands() -> dict[str, argparse.ArgumentParser]:
    from memplan.cli import build_parser

    parser = build_parser()
    found = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(found.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_flag_has_help_and_the_help_ends_with_two_examples(name: str) -> None:
    command = _commands()[name]
    undocumented = [
        a.option_strings[0] if a.option_strings else a.dest
        for a in command._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert undocumented == []
    examples = command.format_help().split("examples:\n")[1].strip().splitlines()
    assert len(examples) == 2
    assert all(e.strip().startswith(f"memplan {name}") for e in examples)


def test_model_set_changes_the_model_and_recounts(run_cli: Any) -> None:
    tied = run_cli("plan", "llama-3.2-1b", "--json").json()
    untied = run_cli("plan", "llama-3.2-1b", "--model-set", "tie_word_embeddings=false", "--json")
    assert untied.code == 0, untied.err
    spec = load_model("llama-3.2-1b")
    # An untied head is a second vocab x hidden matrix.
    assert untied.json()["params"] - tied["params"] == spec.vocab_size * spec.hidden_size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-set", "family=gpt2"], "'family' is not a model field memplan can change"),
        (["--model-set", "vocab_size=0"], "--model-set vocab_size=0:"),
        (["--model-set", "novalue"], "expected FIELD=VALUE"),
        (["--model-set", "hidden_size=true"], "hidden_size is not a true/false field"),
        (["--cuda-context", "1GiB"], "--cuda-context needs --gpu"),
        (["--gpu", "a100-80gb", "--cuda-context", "lots"], "cannot read memory size 'lots'"),
    ],
)
def test_model_and_context_flags_refuse_bad_values(
    run_cli: Any, argv: list[str], message: str
) -> None:
    run = run_cli("plan", "llama-3.2-1b", *argv)
    assert run.code == 2
    assert run.err.count("\n") == 1
    assert message in run.err


def test_cuda_context_is_the_devices_own(run_cli: Any) -> None:
    run = run_cli("plan", "llama-2-7b", "--gpu", "a100-80gb", "--cuda-context", "1GiB", "--json")
    assert run.json()["cuda_context_bytes"] == 2**30


def test_stacks_lists_every_stack_with_its_sources(run_cli: Run) -> None:
    from memplan.stacks import stacks

    rows = run_cli("stacks", "--json").json()
    assert [r["name"] for r in rows] == list(stacks())
    for row in rows:
        for fields in row["defaults"].values():
            assert all(d["source"] for d in fields.values())


def test_plan_names_its_stack_and_the_defaults_it_gave(run_cli: Run) -> None:
    result = run_cli("plan", "llama-2-7b", "--method", "lora", "--json")
    lines = [a for a in result.json()["assumptions"] if a.startswith("stack hf-trainer")]
    assert len(lines) == 1
    assert "optimizer_impl=fused (transformers TrainingArguments.optim" in lines[0]
    assert result.json()["setup"]["stack"] == "hf-trainer"


def test_unknown_stack_is_one_line(run_cli: Run) -> None:
    line = _bad(run_cli, "plan", "llama-2-7b", "--stack", "nemo")
    assert "nemo" in line


def test_a_stack_sets_sharding_defaults_the_flags_leave_out(run_cli: Run) -> None:
    argv = ("plan", "llama-2-7b", "--method", "qlora", "--stack", "fsdp-qlora", "--gpus", "2")
    offloaded = run_cli(*argv, "--fsdp", "--json").json()
    assert offloaded["parallel"]["offload"] == "optimizer+params"
    assert offloaded["cpu_bytes"] > 0
    explicit = run_cli(*argv, "--fsdp", "--offload", "none", "--json").json()
    assert explicit["parallel"]["offload"] == "none"
    assert explicit["device_bytes"] > offloaded["device_bytes"]
    # unsharded, the stack's offload does not apply
    assert run_cli(*argv[:-2], "--json").json()["parallel"]["offload"] == "none"

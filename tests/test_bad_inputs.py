"""Bad and odd inputs: one line on stderr, exit status 2, nothing on stdout, never a traceback.

Classes covered (each a parametrized case or a hypothesis strategy):

- file contents: non-UTF-8, UTF-16 and binary files, JSON nested 100,000 deep, integers of
  thousands of digits, a FIFO, a device, a folder, a top-level value that is not an object,
  ``model_type`` of the wrong type, names too long for the file system, paths with newlines;
  mutated config.json files (every field replaced by values of every JSON type);
- numbers: sizes far past any device or run, NaN and infinity, negative and zero values, in
  flags, config files and run files;
- output: pictures and JSON files in missing or unwritable folders, folders, unknown suffixes
  (checked before any work: nothing on stdout), unencodable output, closed pipes, COLUMNS=0, a
  bogus MPLBACKEND, Ctrl-C;
- accepted nonsense: settings of another method, LoRA targets a model lacks, empty targets,
  bare numbers as capacities, GPU aliases;
- arbitrary command lines drawn from the real flags with odd values.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan.catalog import catalog_record

Run = Callable[..., Any]  # the run_cli fixture (conftest): argv -> CliRun(code, out, err)
MEMPLAN = [sys.executable, "-m", "memplan.cli"]


@dataclass(frozen=True)
class _Result:
    code: int
    out: str
    err: str


def _run(*argv: str) -> _Result:
    """``memplan.cli.main(argv)`` in-process with its own captured streams (for hypothesis
    tests, where function-scoped fixtures are not reset between examples)."""
    from memplan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return _Result(code, out.getvalue(), err.getvalue())


def _one_line_error(result: Any) -> str:
    assert result.code == 2, (result.code, result.err)
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("memplan: error: ")
    assert "Traceback" not in result.err
    return lines[0]


# -- file contents -------------------------------------------------------------------------

_CONFIG = catalog_record("tiny-llama")["config"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES: dict[str, Callable[[Path], Path]] = {
    "utf16": lambda d: _write(d / "c.json", json.dumps(_CONFIG).encode("utf-16")),
    "latin1": lambda d: _write(d / "c.json", b'{"model_type": "llama\xe9"}'),
    "binary": lambda d: _write(d / "c.json", bytes(range(256)) * 4),
    "deep": lambda d: _write(d / "c.json", b"[" * 100_000 + b"]" * 100_000),
    "huge-int": lambda d: _write(
        d / "c.json", b'{"model_type": "llama", "vocab_size": 9' + b"9" * 5000 + b"}"
    ),
    "array": lambda d: _write(d / "c.json", b"[1, 2]"),
    "string": lambda d: _write(d / "c.json", b'"llama"'),
    "empty": lambda d: _write(d / "c.json", b""),
    "model-type-list": lambda d: _write(d / "c.json", b'{"model_type": ["llama"]}'),
    "model-type-object": lambda d: _write(d / "c.json", b'{"model_type": {"a": 1}}'),
    "nan-size": lambda d: _write(
        d / "c.json", json.dumps({**_CONFIG, "hidden_size": float("nan")}).encode()
    ),
    "layers-1e6": lambda d: _write(
        d / "c.json", json.dumps({**_CONFIG, "num_hidden_layers": 1_000_000}).encode()
    ),
    "folder-without-config": lambda d: d,
    "missing": lambda d: d / "absent.json",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_files(run_cli: Run, tmp_path: Path, case: str) -> None:
    _one_line_error(run_cli("plan", str(BAD_FILES[case](tmp_path))))


def test_fifo_is_refused_not_read(run_cli: Run, tmp_path: Path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    assert "not a regular file" in _one_line_error(run_cli("plan", str(fifo)))


def test_a_device_is_refused(run_cli: Run) -> None:
    assert "not a regular file" in _one_line_error(run_cli("plan", "/dev/zero"))


@pytest.mark.parametrize("name", ["x" * 300, "bad\nname.json", "a\x00b", "../" * 200 + "x"])
def test_odd_names(run_cli: Run, name: str) -> None:
    _one_line_error(run_cli("plan", name))


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)


@given(key=st.sampled_from(sorted(_CONFIG)), value=_JSON_VALUES)
def test_mutated_config_plans_or_fails_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, key: str, value: Any
) -> None:
    path = tmp_path_factory.mktemp("mutated") / "config.json"
    path.write_text(json.dumps({**_CONFIG, key: value}))
    result = _run("plan", str(path), "--json")
    if result.code == 0:
        assert json.loads(result.out)["peak_bytes"] > 0
    else:
        _one_line_error(result)


# -- numbers and flags -----------------------------------------------------------------------

BAD_FLAGS = [
    ("--batch", "-1"),
    ("--batch", "0"),
    ("--batch", "99999999999"),
    ("--seq", "1e3"),
    ("--seq", "nan"),
    ("--lora-r", "1000000000000"),
    ("--lora-alpha", "nan"),
    ("--lora-alpha", "inf"),
    ("--lora-dropout", "1.5"),
    ("--gpu", "1e400GB"),
    ("--gpu", "409"),
    ("--gpu", "-5GB"),
    ("--gpu", "0GB"),
    ("--gpu", "a100"),
    ("--gpus", "0"),
    ("--zero", "7"),
    ("--tp", "3"),
    ("--lora-targets", ""),
    ("--lora-targets", "gate"),
    ("--loss", "chunked:0"),
    ("--loss", "chunked:-2"),
    ("--loss", "chunked:x"),
    ("--loss", "chunked:"),
    ("--loss", "bogus"),
    ("--loss", "cut:4"),
    ("--loss", "chunked:99999999999"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_bad_flags(run_cli: Run, flag: str, value: str) -> None:
    method = ["--method", "lora"] if flag.startswith("--lora") else []
    _one_line_error(run_cli("plan", "gpt2", *method, flag, value))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "full", "--lora-r", "16"], "lora_r configures method lora/"),
        (["--method", "full", "--prefix-len", "5"], "prefix_len configures method prefix"),
        (["--method", "prefix", "--grad-ckpt"], "cannot use grad_ckpt"),
        (["--method", "bitfit"], "has none"),  # tiny-llama has no biases
        # torchtune's recipes: "Gradient accumulation is not supported with optimizer in bwd".
        (["--method", "full", "--optimizer-in-backward", "--grad-accum", "2"], "grad_accum"),
        (["--method", "frozen", "--optimizer-in-backward"], "trains no weights"),
        (["--optimizer-in-backward", "--optimizer", "adafactor"], "adafactor"),
        (["--optimizer-in-backward", "--gpus", "2"], "one GPU"),
        (["--optimizer-in-backward", "--gpus", "4", "--zero", "3"], "one GPU"),
        (["--loss", "chunked", "--fsdp", "--gpus", "2", "--optimizer-in-backward"], "one GPU"),
        # DPO's reference settings, objectives trl runs with other trainers.
        (["--method", "lora", "--precomputed-ref"], "objective=sft has none"),
        (["--method", "lora", "--ref-model", "copy"], "objective=sft has none"),
        (["--objective", "orpo"], "objective=orpo is not modelled"),
        (["--objective", "kto"], "objective=kto is not modelled"),
        (["--objective", "reward"], "objective=reward is not modelled"),
        (["--objective", "dpo", "--method", "full", "--ref-model", "adapters-disabled"], "peft"),
        (["--objective", "dpo", "--precomputed-ref", "--ref-model", "copy"], "does not apply"),
        (["--objective", "dpo", "--method", "qlora", "--ref-model", "copy"], "quantized"),
        (["--objective", "dpo", "--method", "prefix"], "modelled for methods"),
        (["--objective", "dpo", "--loss", "chunked"], "fused LM head"),
        (["--objective", "dpo", "--gpus", "2", "--zero", "3"], "ZeRO, FSDP"),
    ],
)
def test_settings_that_do_not_apply_are_refused(run_cli: Run, argv: list[str], needle: str) -> None:
    assert needle in _one_line_error(run_cli("plan", "tiny-llama", *argv))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-t5", "tiny-gemma2"])
@pytest.mark.parametrize("loss", ["chunked", "chunked:4", "fused-linear", "cut"])
def test_losses_of_causal_lm_heads_only(run_cli: Run, model: str, loss: str) -> None:
    """A masked-LM head, an encoder-decoder head, soft-capped logits: only --loss full."""
    assert "use loss=full" in _one_line_error(run_cli("plan", model, "--loss", loss))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-t5", "tiny-gemma2"])
def test_dpo_needs_a_causal_lm_head(run_cli: Run, model: str) -> None:
    """trl's fused log-prob head: not for a masked-LM, encoder-decoder or soft-capped head."""
    assert "causal LM heads" in _one_line_error(run_cli("plan", model, "--objective", "dpo"))


def test_recommend_token_counts(run_cli: Run) -> None:
    for tokens in ("1e400", "-5M", "0", "lots", "1e30"):
        _one_line_error(run_cli("recommend", "tiny-llama", "--tokens", tokens))


def test_gpu_aliases_are_not_capacities(run_cli: Run) -> None:
    result = run_cli("plan", "llama-2-7b", "--method", "qlora", "--gpu", "4090", "--json")
    assert result.code == 0
    assert result.json()["gpu"] == "rtx-4090"


_FLAG_VALUES: dict[str, st.SearchStrategy[str]] = {
    "--method": st.sampled_from(["full", "lora", "qlora", "adapter", "prefix", "bitfit", "x"]),
    "--precision": st.sampled_from(["fp32", "bf16", "bf16-amp", "fp16", "fp8"]),
    "--quant": st.sampled_from(["none", "nf4", "int8", "int3"]),
    "--batch": st.sampled_from(["1", "4", "0", "-3", "1e2", "4096", "x"]),
    "--seq": st.sampled_from(["1", "128", "100000", "0", "nan"]),
    "--grad-accum": st.sampled_from(["1", "8", "0"]),
    "--lora-r": st.sampled_from(["1", "64", "0", "70000"]),
    "--lora-targets": st.sampled_from(["q,v", "all-linear", "mlp", "nope", ",", "c_attn"]),
    "--gpu": st.sampled_from(["rtx-4090", "4090", "48GB", "a100", "1e9GiB", "0GB", "x"]),
    "--gpus": st.sampled_from(["1", "2", "8", "0", "3"]),
    "--zero": st.sampled_from(["0", "1", "2", "3", "4"]),
    "--tp": st.sampled_from(["1", "2", "3"]),
    "--offload": st.sampled_from(["none", "optimizer", "optimizer+params", "disk"]),
    "--attn": st.sampled_from(["eager", "sdpa", "flash", "slow"]),
    "--optimizer": st.sampled_from(["adamw", "adamw-8bit", "paged-adamw", "sgd", "adam"]),
}


@given(
    model=st.sampled_from(["tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-bert", "nope"]),
    flags=st.dictionaries(st.sampled_from(sorted(_FLAG_VALUES)), st.just(""), max_size=5),
    data=st.data(),
)
def test_arbitrary_plan_command_lines(
    model: str, flags: dict[str, str], data: st.DataObject
) -> None:
    argv = ["plan", model, "--json"]
    for flag in flags:
        argv += [flag, data.draw(_FLAG_VALUES[flag])]
    result = _run(*argv)
    if result.code == 0:
        assert json.loads(result.out)["peak_bytes"] > 0
        assert result.err == ""
    else:
        _one_line_error(result)


# -- run files -----------------------------------------------------------------------------


@given(
    field=st.sampled_from(["allocated_bytes", "max_allocated_bytes", "reserved_bytes", "step"]),
    value=st.one_of(
        st.integers(min_value=-(2**70), max_value=-1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
        st.none(),
    ),
)
def test_mutated_run_files(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: Any
) -> None:
    sample = {"step": 0, "phase": "load", "allocated_bytes": 1, "max_allocated_bytes": 1}
    sample |= {"reserved_bytes": 1, "max_reserved_bytes": 1, field: value}
    run = {
        "model": "tiny-llama",
        "setup": {"method": "lora"},
        "parallel": {},
        "environment": {"device_name": "x", "total_memory_bytes": 1},
        "samples": [sample],
    }
    path = tmp_path_factory.mktemp("run") / "run.json"
    path.write_text(json.dumps(run))
    result = _run("verify", str(path))
    assert result.code in (0, 1, 2), result.err
    if result.code == 2:
        _one_line_error(result)
    assert "Traceback" not in result.err


@pytest.mark.parametrize("content", [b"[]", b"3", b"{}", b'{"runs": 5}', b"\xff\xfe"])
def test_verify_refuses_what_is_not_a_run(run_cli: Run, tmp_path: Path, content: bytes) -> None:
    _one_line_error(run_cli("verify", str(_write(tmp_path / "r.json", content))))


# -- output ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["missing-folder/x.png", "x.jpg", ".", "readonly/x.png"],
)
def test_pictures_are_checked_before_any_work(run_cli: Run, tmp_path: Path, target: str) -> None:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK) and target.startswith("readonly"):
            pytest.skip("running as a user who may write anywhere")
        result = run_cli("plan", "tiny-llama", "--plot", str(tmp_path / target))
        _one_line_error(result)
    finally:
        readonly.chmod(0o700)


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MEMPLAN, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "env",
    [{"PYTHONIOENCODING": "ascii"}, {"COLUMNS": "0"}, {"MPLBACKEND": "bogus"}, {"TERM": "dumb"}],
    ids=["ascii", "columns-0", "mplbackend", "dumb-term"],
)
def test_odd_environments(env: dict[str, str], tmp_path: Path) -> None:
    done = _cli("compare", "tiny-llama", "--plot", str(tmp_path / "c.png"), env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "c.png").exists()


def test_a_closed_pipe_is_quiet() -> None:
    reader = subprocess.Popen([*MEMPLAN, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None
    reader.stdout.read(10)
    reader.stdout.close()
    _, err = reader.communicate(timeout=120)
    assert b"Traceback" not in err
    assert reader.returncode in (0, -signal.SIGPIPE)


def test_ctrl_c_is_one_line_and_130() -> None:
    process = subprocess.Popen(
        [*MEMPLAN, "validate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        process.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("validate finished before the interrupt")
    assert process.returncode == 130
    assert err.strip() == "memplan: error: interrupted"

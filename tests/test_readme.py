"""The README stays true: every command and Python example in it runs, and shown output matches."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", TEXT, flags=re.DOTALL)
# Commands that need the torch/hf extras to run.
NEEDS_TORCH = ("simulate", "measure")


def _commands() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("memplan "):
                out.append(command)
    return out


COMMANDS = _commands()
WRITTEN = {
    a for c in COMMANDS for o, a in itertools.pairwise(shlex.split(c)) if o in ("--out", "--plot")
}


def test_readme_has_the_two_quick_start_commands() -> None:
    quick = BLOCKS[0][1].splitlines()
    assert quick[0] == "pip install . && memplan plan llama-65b --method qlora --gpu rtx-a6000"
    assert quick[1] == 'pip install -e ".[dev,torch,hf]" && pytest -n 2'


def test_every_subcommand_is_shown() -> None:
    shown = {c.split()[1] for c in COMMANDS}
    assert shown >= {"plan", "fit", "recommend", "compare", "validate", "models", "gpus"}
    assert {"simulate", "measure"} <= shown
    assert "memplan verify run.json" in TEXT


def _producer(path: str) -> str | None:
    """The README command that writes ``path`` (``--out path``)."""
    return next((c for c in COMMANDS if f"--out {path}" in c), None)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_runs(command: str, run_cli: Any, tmp_path: Path) -> None:
    argv = shlex.split(command)[1:]
    steps = [argv]
    # A command reading a file another README command writes runs after that one.
    producer = _producer(argv[1]) if len(argv) > 1 else None
    if producer is not None and producer != command:
        steps.insert(0, shlex.split(producer)[1:])
    for step in steps:
        # Files the commands write (and read back) live in a temporary folder.
        step = [str(tmp_path / a) if a in WRITTEN else a for a in step]
        if step[0] in NEEDS_TORCH:
            pytest.importorskip("torch")
            pytest.importorskip("transformers")
            pytest.importorskip("peft")
        result = run_cli(*step)
        assert result.code == 0, result.err
        if "--json" in step:
            result.json()


def test_shown_plan_output_is_what_memplan_prints(run_cli: Any) -> None:
    console = next(body for lang, body in BLOCKS if lang == "console" and body.startswith("$ "))
    lines = console.splitlines()
    argv = shlex.split(lines[0].removeprefix("$ "))[1:]
    printed = run_cli(*argv).out.splitlines()
    shown = [line for line in lines[1:] if line != "..."]
    assert printed[: len(shown)] == shown


def test_python_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    for lang, body in BLOCKS:
        if lang == "python":
            exec(compile(body, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()


def test_linked_files_exist() -> None:
    root = README.parent
    for target in re.findall(r"\]\(([^)#:]+)\)", TEXT):
        assert (root / target).exists(), target


def test_quoted_validation_error_is_current(run_cli: Any) -> None:
    quoted = re.search(r"Median absolute error (\d+\.\d)%", TEXT)
    assert quoted is not None
    summary = run_cli("validate", "--json").json()["summary"]["all"]
    assert quoted.group(1) == f"{100 * summary['median_abs_error']:.1f}"

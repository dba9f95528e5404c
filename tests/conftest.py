"""Shared fixtures: catalog specs, a CLI runner, and the suite's hypothesis profile."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from memplan.catalog import load_model
from memplan.specs import ModelSpec

# Property tests replay whole training steps (milliseconds each): keep the example counts
# modest so the suite stays fast, and never fail on timing (the first call warms caches).
settings.register_profile(
    "memplan",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A longer hunt before a release: HYPOTHESIS_PROFILE=thorough pytest tests
settings.register_profile("thorough", parent=settings.get_profile("memplan"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "memplan"))


@pytest.fixture(scope="session")
def tiny_llama() -> ModelSpec:
    """2 layers, hidden 128, 4 query / 2 key-value heads, vocab 1024 (catalog test model)."""
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def llama_2_7b() -> ModelSpec:
    return load_model("llama-2-7b")


@pytest.fixture(scope="session")
def llama_65b() -> ModelSpec:
    return load_model("llama-65b")


@dataclass(frozen=True)
class CliRun:
    """What one in-process ``memplan`` invocation returned and printed."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """Run ``memplan.cli.main(argv)`` in-process; bad input exits via SystemExit."""
    from memplan.cli import main

    def run(*argv: str) -> CliRun:
        capsys.readouterr()  # drop anything printed before
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run

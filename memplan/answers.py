"""The answers of plan, fit and recommend as JSON, and bad input as one line.

One serialisation behind both the CLI's ``--json`` and the web API (:mod:`memplan.web`), so the
two can never disagree: the same Python API call, the same ``model_dump(mode="json")``, the
same one-line error message.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic import ValidationError

from memplan.errors import MemplanError
from memplan.fit import FitResult
from memplan.plan import GpuTarget, PlanResult, Verdict, plan, resolve_gpu
from memplan.recommend import Change, RecommendResult, changes, cheapest_fixes
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import TrainingSetup

# The CLI flag of each setup and layout field, for messages about a field's value.
FIELD_FLAGS: Final = {
    "micro_batch_size": "--batch",
    "seq_len": "--seq",
    "target_seq_len": "--target-seq",
    "grad_accum_steps": "--grad-accum",
    "grad_ckpt_every": "--grad-ckpt-every",
    "loss_chunks": "--loss chunked:N",
    "attention": "--attn",
    "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "num_gpus": "--gpus",
    "zero_stage": "--zero",
    "tensor_parallel_degree": "--tp",
}


def planned(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    *,
    gpu: str | GpuTarget | None,
    safety: float | None = None,
) -> tuple[PlanResult, list[Change]]:
    """plan() on ``gpu`` and, when it does not fit there, the cheapest changes that would
    make it fit (:func:`memplan.recommend.cheapest_fixes`)."""
    result = plan(spec, setup, parallel, gpu=gpu, safety=safety)
    fixes: list[Change] = []
    if result.verdict == Verdict.NO.value and gpu is not None:
        target = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
        fixes = cheapest_fixes(changes(spec, setup, parallel, target, result))
    return result, fixes


def plan_json(result: PlanResult, fixes: list[Change]) -> dict[str, Any]:
    """``memplan plan --json``: the result, and its fixes when it does not fit."""
    payload = result.model_dump(mode="json")
    if result.verdict == Verdict.NO.value:
        payload["fixes"] = [c.model_dump(mode="json") for c in fixes]
    return payload


def fit_json(result: FitResult) -> dict[str, Any]:
    """``memplan fit --json``."""
    return result.model_dump(mode="json")


def recommend_json(result: RecommendResult) -> dict[str, Any]:
    """``memplan recommend --json``."""
    return result.model_dump(mode="json")


def dumps(payload: dict[str, Any]) -> str:
    """The JSON text ``--json`` prints."""
    return json.dumps(payload, indent=2)


def one_line(message: str) -> str:
    """``message`` as a single printable line (control characters and newlines as spaces)."""
    return message if message.isprintable() else " ".join(message.split())


def validation_field(exc: ValidationError) -> str | None:
    """The field the first error of ``exc`` is about (None: a check across fields)."""
    loc = exc.errors()[0]["loc"]
    return str(loc[0]) if loc else None


def validation_message(exc: ValidationError) -> str:
    """The first error of a setup or layout as one line that names the flag and the value."""
    first = exc.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    field = validation_field(exc)
    if field is None:  # a cross-field check: its message names the fields
        return message
    flag = FIELD_FLAGS.get(field, f"--{field.replace('_', '-')}")
    value = first.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"invalid {flag}: {message}{shown}"


def error_message(exc: MemplanError | ValidationError) -> str:
    """The one line memplan prints for a bad input."""
    if isinstance(exc, ValidationError):
        return one_line(validation_message(exc))
    return one_line(str(exc))

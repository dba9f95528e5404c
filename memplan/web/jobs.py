"""The answers of /api/plan, /api/fit and /api/recommend: the Python API on a request body.

Each answer is ``(HTTP status, JSON object)``: 200 and what ``memplan <command> --json`` prints
(:mod:`memplan.answers`), or 400 and ``{"error": <the CLI's one line>, "field": <its field>}``.
No web framework here: the functions take bytes and return plain data, so the tests call them
directly and :mod:`memplan.web.worker` runs them in a child process it can stop.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal

from pydantic import ValidationError

from memplan.answers import (
    error_message,
    fit_json,
    one_line,
    plan_json,
    planned,
    recommend_json,
)
from memplan.errors import MemplanError
from memplan.files import parse_json_bytes
from memplan.plan import plan
from memplan.web.inputs import (
    MAX_BODY_BYTES,
    FieldError,
    check_keys,
    flag_of,
    gpu_of,
    model_of,
    parallel_of,
    rank_of,
    safety_of,
    setup_of,
    tokens_of,
)

Kind = Literal["plan", "fit", "recommend"]
KINDS: Final[tuple[Kind, ...]] = ("plan", "fit", "recommend")
Answer = tuple[int, dict[str, Any]]

# plan() calls (allocator replays) a sweep runs, as its ``plan_calls`` reports: fit with its
# table 19 and recommend 24 for llama-65b QLoRA; the bound is taken a little above both.
SWEEP_PLAN_CALLS: Final = {"fit": 25, "recommend": 30}


def bad(message: str, field: str | None = None) -> Answer:
    """A refused request: the one-line message and the field it is about."""
    return 400, {"error": one_line(message), "field": field}


def answer(kind: Kind, data: bytes, *, time_limit_s: float) -> Answer:
    """The answer to a request body for ``kind``; a sweep whose plans would take longer than
    ``time_limit_s`` is refused before it starts."""
    if len(data) > MAX_BODY_BYTES:
        return bad(f"request of {len(data):,} bytes: at most {MAX_BODY_BYTES:,}", None)
    try:
        body = check_keys(parse_json_bytes(data, where="request body"))
        return _answer(kind, body, time_limit_s=time_limit_s)
    except FieldError as exc:
        return bad(str(exc), exc.field)
    except (MemplanError, ValidationError) as exc:  # the plan itself: no one field
        return bad(error_message(exc), None)
    except (RecursionError, MemoryError, OverflowError) as exc:
        return bad(f"input too large to handle ({type(exc).__name__})", None)


def _answer(kind: Kind, body: dict[str, Any], *, time_limit_s: float) -> Answer:
    spec = model_of(body)
    setup, parallel = setup_of(body, spec), parallel_of(body)
    gpu = gpu_of(body, required=kind == "fit")
    safety = safety_of(body)
    tokens, rank = tokens_of(body), rank_of(body)
    table = flag_of(body, "table")
    if kind == "plan":
        return 200, plan_json(*planned(spec, setup, parallel, gpu=gpu, safety=safety))
    # One plan() of this model and setup, timed here, prices the sweep's plans.
    started = time.perf_counter()
    plan(spec, setup, parallel, gpu=gpu, safety=safety)
    plan_s = time.perf_counter() - started
    estimate_s = plan_s * SWEEP_PLAN_CALLS[kind]
    if estimate_s > time_limit_s:
        return bad(
            f"{kind} would run about {SWEEP_PLAN_CALLS[kind]} plans of {plan_s:.1f} s each "
            f"(~{estimate_s:.0f} s), over this server's limit of {time_limit_s:g} s: "
            f"run `memplan {kind}` in a shell",
            None,
        )
    if kind == "fit":
        from memplan.fit import fit

        assert gpu is not None  # gpu_of(required=True)
        return 200, fit_json(fit(spec, setup, parallel, gpu=gpu, table=table, safety=safety))
    from memplan.recommend import recommend

    found = recommend(spec, setup, tokens=tokens, rank=rank, gpu=gpu, parallel=parallel)
    return 200, recommend_json(found)

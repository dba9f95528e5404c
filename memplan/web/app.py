"""The Starlette application behind ``memplan serve``, and the uvicorn server that runs it.

Starlette (with uvicorn) is a small ASGI toolkit: routing, JSON responses and static files from
a package, and nothing a one-page tool does not use (no ORM, templates or sessions).

Routes: ``/`` the page; ``/static/*`` its script and style (package data, no CDN);
``/api/choices`` what the page's controls offer; ``POST /api/plan|fit|recommend`` the answers
(:mod:`memplan.web.jobs`), each in a child process under the time limit
(:mod:`memplan.web.worker`), at most ``max_jobs`` at once.
"""

from __future__ import annotations

import socket
import sys
from functools import cache, partial
from importlib import resources
from typing import Any, Final

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from memplan.errors import MemplanError
from memplan.web import worker
from memplan.web.inputs import MAX_BODY_BYTES
from memplan.web.jobs import KINDS, Kind

# A request's answer is computed within this many seconds or refused (plan answers in well
# under a second; fit and recommend sweeps of a 70B model in about ten).
TIME_LIMIT_S: Final = 30.0
MAX_JOBS: Final = 2  # answers computed at once; more wait for a free slot
# The page loads only what this server sends: no other origin is contacted.
_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1", "[::1]")
_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=_HEADERS)


async def _index(request: Request) -> Response:
    page = resources.files("memplan.web").joinpath("static/index.html").read_text()
    return HTMLResponse(page, headers=_HEADERS)


@cache
def choices() -> dict[str, Any]:
    """What the page's controls offer: catalog models, GPU profiles and the setup's options."""
    from memplan.catalog import catalog_names, catalog_record
    from memplan.dtypes import Quantization
    from memplan.hardware import list_profiles
    from memplan.methods import method_names
    from memplan.report import CATEGORY_LABELS
    from memplan.specs import Attention, Offload, Optimizer, Precision
    from memplan.stacks import stacks

    return {
        "models": [
            {
                "name": name,
                "hf_id": catalog_record(name).get("hf_id"),
                "params": catalog_record(name).get("num_params"),
            }
            for name in catalog_names()
        ],
        "gpus": [
            {
                "name": p.name,
                "display_name": p.display_name,
                "usable_memory_bytes": p.usable_memory_bytes,
            }
            for p in list_profiles()
        ],
        "stacks": list(stacks()),
        "methods": list(method_names()),
        "precisions": [p.value for p in Precision],
        "quants": [q.value for q in Quantization],
        "optimizers": [o.value for o in Optimizer],
        "attentions": [a.value for a in Attention],
        "offloads": [o.value for o in Offload],
        "category_labels": CATEGORY_LABELS,
        "limits": {"max_body_bytes": MAX_BODY_BYTES},
    }


async def _choices(request: Request) -> Response:
    return JSONResponse(choices(), headers=_HEADERS)


async def _body(request: Request) -> bytes | None:
    """The request body, or None once it passes MAX_BODY_BYTES (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    *,
    time_limit_s: float = TIME_LIMIT_S,
    max_jobs: int = MAX_JOBS,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The application; ``time_limit_s`` bounds each answer, ``max_jobs`` those running at once;
    ``allowed_hosts``: the Host names it answers (all when None)."""
    limiter = anyio.CapacityLimiter(max_jobs)

    async def api(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in KINDS:
            return _error(404, f"no API {kind!r} (there are {', '.join(KINDS)})")
        data = await _body(request)
        if data is None:
            return _error(413, f"request body over {MAX_BODY_BYTES:,} bytes")
        run = partial(worker.run, _kind(kind), data, time_limit_s=time_limit_s)
        status, payload = await anyio.to_thread.run_sync(run, limiter=limiter)
        return JSONResponse(payload, status_code=status, headers=_HEADERS)

    static = StaticFiles(packages=[("memplan.web", "static")])
    routes = [
        Route("/", _index),
        Route("/api/choices", _choices),
        Route("/api/{kind}", api, methods=["POST"]),
        Mount("/static", static, name="static"),
    ]
    hosts = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)]
    return Starlette(routes=routes, middleware=hosts if allowed_hosts else [])


def _kind(text: str) -> Kind:
    return next(k for k in KINDS if k == text)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (a one-line MemplanError when it cannot be)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise MemplanError(f"--host {host!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise MemplanError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def serve(*, host: str, port: int, time_limit_s: float = TIME_LIMIT_S) -> int:
    """Serve the page on ``host:port`` until interrupted."""
    sock = _listening_socket(host, port)
    worker.start()  # planning modules imported before the first request
    choices()
    # Served on this machine only: other Host names are refused (a DNS-rebinding page).
    local = host in _LOOPBACK
    app = create_app(time_limit_s=time_limit_s, allowed_hosts=[*_LOOPBACK] if local else None)
    bound = sock.getsockname()[1]
    print(f"memplan serve: http://{host}:{bound}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0

"""Each answer runs in a child process that is stopped at the time limit.

A thread cannot be stopped, so an answer that runs long would keep a CPU busy after its request
was refused; a process can be killed. Children are forked from a fork server that imported the
planning modules once (``multiprocessing``'s forkserver start method with a preload), so a child
starts in milliseconds instead of re-importing memplan.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from typing import Final

from memplan.answers import one_line
from memplan.web.jobs import Answer, Kind, answer

_CONTEXT: Final = multiprocessing.get_context("forkserver")
# Imported by the fork server before it forks any child: modules imported, caches filled.
_PRELOAD: Final = ["memplan.web.warm"]


def start() -> None:
    """Start the fork server (planning modules imported) and check that a child answers."""
    _CONTEXT.set_forkserver_preload(_PRELOAD)
    status, _ = run("plan", b'{"model": "tiny-llama"}', time_limit_s=60.0)
    if status != 200:
        raise RuntimeError(f"the planning process answered {status}")


def run(kind: Kind, data: bytes, *, time_limit_s: float) -> Answer:
    """The answer to ``data``, computed in a child process killed after ``time_limit_s``."""
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(target=_child, args=(kind, data, time_limit_s, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(time_limit_s):
            return 503, {
                "error": f"{kind} took longer than this server's limit of {time_limit_s:g} s "
                f"and was stopped: run `memplan {kind}` in a shell",
                "field": None,
            }
        found: Answer = receiver.recv()
        return found
    except EOFError:  # the child ended without answering (killed, out of memory)
        child.join()
        return 500, {
            "error": f"internal error (the {kind} process ended with status {child.exitcode})",
            "field": None,
        }
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()


def _child(kind: Kind, data: bytes, time_limit_s: float, sender: Connection) -> None:
    try:
        result = answer(kind, data, time_limit_s=time_limit_s)
    except Exception as exc:  # a bug: one line for the page, never a traceback
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        result = (
            500,
            {"error": one_line(f"internal error ({type(exc).__name__}: {text})"), "field": None},
        )
    sender.send(result)
    sender.close()

"""How fast is ``memplan serve``? Start-up to the first successful response, and the answer time
of /api/plan for LLaMA-65B QLoRA on an RTX A6000 (the README's first example).

    python scripts/bench_serve.py            # 5 start-ups, 20 questions
    python scripts/bench_serve.py --starts 3 --runs 10

Start-up is timed from launching ``python -m memplan.cli serve`` to the first 200 from
/api/choices (the fork server that computes answers is started before the port answers); the
answer time is the wall time of one POST, median and range over ``--runs``. Nothing here is
optimised: it only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

QUESTION = {"model": "llama-65b", "setup": {"method": "qlora"}, "gpu": "rtx-a6000"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start() -> tuple[subprocess.Popen[bytes], str, float]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "memplan.cli", "serve", "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    while True:
        if proc.poll() is not None:
            sys.exit(f"memplan serve ended with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/choices", timeout=5) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.02)


def _ask(url: str) -> float:
    request = urllib.request.Request(url + "/api/plan", data=json.dumps(QUESTION).encode())
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        payload = json.loads(response.read())
    elapsed = time.perf_counter() - started
    assert payload["verdict"] == "borderline", payload["verdict"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="server start-ups timed")
    parser.add_argument("--runs", type=int, default=20, help="/api/plan questions timed")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    startups, answers = [], []
    for i in range(args.starts):
        proc, url, startup = _start()
        startups.append(startup)
        if i == 0:
            answers = [_ask(url) for _ in range(args.runs)]
        proc.terminate()
        proc.wait(timeout=30)
    for name, values in (
        ("start-up to first response", startups),
        ("/api/plan 65B QLoRA", answers),
    ):
        print(
            f"{name}: median {statistics.median(values):.3f} s "
            f"(min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"
        )


if __name__ == "__main__":
    main()

"""Wall time of ``memplan fit`` and ``memplan recommend``.

Times the Python API in one process (first call, then the median of repeats) and the CLI as a
fresh process (interpreter start and imports included). Run: ``python scripts/bench_fit.py``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from memplan.fit import fit
from memplan.recommend import recommend
from memplan.specs import TrainingSetup
from memplan.throughput import parse_tokens

LORA_8B = TrainingSetup(method="lora")
FULL_70B = TrainingSetup(method="full", seq_len=4096)
FULL_70B_CKPT = TrainingSetup(method="full", seq_len=4096, grad_ckpt=True)
TOKENS = parse_tokens("50M")

# (label, API call, equivalent CLI arguments or None)
CASES: list[tuple[str, Callable[[], Any], list[str] | None]] = [
    (
        "fit llama-3.1-8b lora rtx-4090",
        lambda: fit("llama-3.1-8b", LORA_8B, gpu="rtx-4090"),
        ["fit", "llama-3.1-8b", "--method", "lora", "--gpu", "rtx-4090"],
    ),
    (
        "fit llama-3.1-8b lora rtx-4090 --table",
        lambda: fit("llama-3.1-8b", LORA_8B, gpu="rtx-4090", table=True),
        ["fit", "llama-3.1-8b", "--method", "lora", "--gpu", "rtx-4090", "--table"],
    ),
    (
        "recommend llama-3.1-8b lora --gpu rtx-4090",
        lambda: recommend("llama-3.1-8b", LORA_8B, gpu="rtx-4090"),
        ["recommend", "llama-3.1-8b", "--method", "lora", "--gpu", "rtx-4090"],
    ),
    (
        "recommend llama-2-70b full --seq 4096 --tokens 50M",
        lambda: recommend("llama-2-70b", FULL_70B, tokens=TOKENS),
        ["recommend", "llama-2-70b", "--method", "full", "--seq", "4096", "--tokens", "50M"],
    ),
    (
        "  the same, search only (allocator estimate, no plan() replays)",
        lambda: recommend("llama-2-70b", FULL_70B, tokens=TOKENS, confirm=False),
        None,
    ),
    (
        "recommend llama-2-70b full --seq 4096 --grad-ckpt --tokens 50M",
        lambda: recommend("llama-2-70b", FULL_70B_CKPT, tokens=TOKENS),
        [
            *("recommend", "llama-2-70b", "--method", "full", "--seq", "4096"),
            *("--grad-ckpt", "--tokens", "50M"),
        ],
    ),
    (
        "  the same, search only (allocator estimate, no plan() replays)",
        lambda: recommend("llama-2-70b", FULL_70B_CKPT, tokens=TOKENS, confirm=False),
        None,
    ),
]


def _seconds(call: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call: CPU time is unaffected by other load on the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def _cli_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "memplan.cli", *args], check=True, capture_output=True, text=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm repeats per case")
    args = parser.parse_args()
    header = ("first s", "median s", "CPU s", "replays", "CLI s")
    print(f"{'case':66} " + " ".join(f"{h:>8}" for h in header))
    for label, call, cli in CASES:
        first = _seconds(call)[0]
        runs = [_seconds(call) for _ in range(args.repeats)]
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        replays = getattr(call(), "plan_calls", "-")
        cli_s = f"{_cli_seconds(cli):8.2f}" if cli else f"{'-':>8}"
        print(f"{label:66} {first:8.3f} {wall:8.3f} {cpu:8.3f} {replays!s:>8} {cli_s}")


if __name__ == "__main__":
    main()

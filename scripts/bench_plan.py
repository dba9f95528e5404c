"""How fast is planning? Times the analytical model, the full plan, a sweep and the CLI.

    python scripts/bench_plan.py                 # defaults: 20 runs, 10,000-config sweep
    python scripts/bench_plan.py --runs 5 --sweep 1000

(a) ``predict()`` alone and (b) ``plan()`` (predict + caching-allocator replay + assumptions)
for Llama-2-7B LoRA and LLaMA-65B QLoRA, median of ``--runs``; a sweep of allocated peaks over
models x methods x micro-batch x sequence x checkpointing x precision, (c) one
``predict()`` + ``trace.peak()`` per configuration and (c') ``sweep_peaks()`` per model (one
symbolic trace per setup shape); (d) the cold start of
``memplan plan llama-65b --method qlora --gpu rtx-a6000 --json`` in a fresh process, median
of 5. Nothing here is optimised: it only measures.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from memplan.analytic.predict import predict
from memplan.analytic.sweep import sweep_peaks
from memplan.catalog import catalog_names, load_model
from memplan.plan import plan
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup

CASES = {
    "llama-2-7b lora": ("llama-2-7b", TrainingSetup(method="lora")),
    "llama-65b qlora": ("llama-65b", TrainingSetup(method="qlora")),
}
CLI_ARGV = ["plan", "llama-65b", "--method", "qlora", "--gpu", "rtx-a6000", "--json"]
SWEEP_METHODS = ("full", "lora", "qlora", "frozen")
SWEEP_BATCHES = (1, 2, 4, 8, 16)
SWEEP_SEQS = (256, 512, 1024, 2048, 4096)
SWEEP_VARIANTS = (  # (grad_ckpt, precision of full fine-tuning)
    (False, "bf16-amp"),
    (True, "bf16-amp"),
    (False, "bf16"),
    (True, "bf16"),
)


def _median_seconds(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of ``fn()`` (CPU time is steadier on a busy machine)."""
    fn()  # warm caches (catalog, parsed specs) once, outside the timing
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _sweep_configs(count: int) -> Iterator[tuple[ModelSpec, TrainingSetup]]:
    models = [load_model(n) for n in catalog_names()]
    grid = itertools.product(models, SWEEP_METHODS, SWEEP_BATCHES, SWEEP_SEQS, SWEEP_VARIANTS)
    for spec, method, batch, seq, (ckpt, precision) in itertools.islice(
        itertools.cycle(grid), count
    ):
        fields: dict[str, object] = {
            "method": method,
            "micro_batch_size": batch,
            "seq_len": seq,
            "grad_ckpt": ckpt,
        }
        if method == "full":
            fields["precision"] = precision
        yield spec, TrainingSetup(**fields)


def _sweep(count: int) -> tuple[float, float, int]:
    configs = list(_sweep_configs(count))  # building the setups is not timed
    parallel = ParallelSetup()
    start, start_cpu = time.perf_counter(), time.process_time()
    for spec, setup in configs:
        predict(spec, setup, parallel).trace.peak()
    return time.perf_counter() - start, time.process_time() - start_cpu, len(configs)


def _sweep_grouped(count: int) -> tuple[float, float, int]:
    by_model: dict[str, tuple[ModelSpec, list[TrainingSetup]]] = {}
    for spec, setup in _sweep_configs(count):
        by_model.setdefault(spec.name, (spec, []))[1].append(setup)
    start, start_cpu = time.perf_counter(), time.process_time()
    for spec, setups in by_model.values():
        sweep_peaks(spec, setups)
    return time.perf_counter() - start, time.process_time() - start_cpu, count


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cli_cold_start(runs: int) -> tuple[float, float]:
    script = Path(sys.executable).with_name("memplan")
    argv = [str(script), *CLI_ARGV]
    if not script.exists():
        argv = [sys.executable, "-m", "memplan.cli", *CLI_ARGV]
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), _children_cpu_seconds()
        subprocess.run(argv, check=True, capture_output=True)
        wall.append(time.perf_counter() - start)
        cpu.append(_children_cpu_seconds() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="repetitions per timing (median)")
    parser.add_argument("--sweep", type=int, default=10_000, help="configurations in the sweep")
    parser.add_argument("--cli-runs", type=int, default=5, help="cold CLI starts (median)")
    args = parser.parse_args(argv)

    rows: list[tuple[str, str, str, str]] = []
    median = f"median of {args.runs}"
    for label, (name, setup) in CASES.items():
        spec = load_model(name)
        wall, cpu = _median_seconds(functools.partial(predict, spec, setup), args.runs)
        rows.append((f"(a) predict()  {label}", _ms(wall), _ms(cpu), median))
        run_plan = functools.partial(plan, spec, setup, gpu="rtx-a6000")
        wall, cpu = _median_seconds(run_plan, args.runs)
        rows.append((f"(b) plan()     {label}", _ms(wall), _ms(cpu), median))
    wall, cpu, count = _sweep(args.sweep)
    each = f"{wall / count * 1e3:.2f} ms per config (wall)"
    rows.append(
        (f"(c) sweep of {count:,} x predict() + peak()", f"{wall:,.2f} s", f"{cpu:,.2f} s", each)
    )
    wall, cpu, count = _sweep_grouped(args.sweep)
    each = f"{wall / count * 1e3:.2f} ms per config (wall)"
    rows.append(
        (f"(c') the same {count:,} by sweep_peaks()", f"{wall:,.2f} s", f"{cpu:,.2f} s", each)
    )
    wall, cpu = _cli_cold_start(args.cli_runs)
    rows.append(
        (
            "(d) CLI cold start, llama-65b qlora --json",
            _ms(wall),
            _ms(cpu),
            f"median of {args.cli_runs}",
        )
    )

    print(
        f"memplan planning benchmark: Python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    header = ("what", "wall", "CPU", "")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3]]
        print("  ".join(cells).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time a fake-tensor simulation of a training step (default: Llama-2-70B, LoRA, seq 2048).

    python scripts/bench_simulate.py
    python scripts/bench_simulate.py --model llama-3.1-8b --method full --seq 4096 --no-ckpt

Prints the wall time, the traced layers, the peak (GiB = 2**30 bytes) and its breakdown.
"""

from __future__ import annotations

import argparse
import time

from memplan.catalog import load_model
from memplan.specs import TrainingSetup
from memplan.torchsim import trace_step
from memplan.units import gib


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-70b")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-ckpt", action="store_true", help="no gradient checkpointing")
    parser.add_argument("--no-fold", action="store_true", help="trace every layer")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    spec = load_model(args.model)
    setup = TrainingSetup(
        method=args.method,
        precision=args.precision,
        micro_batch_size=args.batch,
        seq_len=args.seq,
        grad_ckpt=not args.no_ckpt,
    )
    start = time.perf_counter()
    result = trace_step(spec, setup, mode="fake", fold=not args.no_fold)
    wall_s = time.perf_counter() - start
    peak = result.trace.peak()
    print(f"{spec.name} {setup.method} {setup.precision.value} b={args.batch} s={args.seq}")
    print(f"wall time      {wall_s:.2f} s (layers traced: {result.layers_traced})")
    print(f"parameters     {result.num_params:,} ({result.num_trainable_params:,} trainable)")
    print(f"peak           {gib(peak.peak_bytes):.3f} GiB in {peak.phase.value}, step {peak.step}")
    for category, num_bytes in peak.breakdown_bytes.items():
        if num_bytes:
            print(f"  {category.value:18s} {gib(num_bytes):10.3f} GiB")
    for note in result.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()

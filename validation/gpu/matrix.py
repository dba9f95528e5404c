"""The GPU validation matrix: measure real training steps, write one results file.

    python validation/gpu/matrix.py --out-dir validation/results      (on a CUDA machine)

Every case builds its model from the catalog's config with random weights directly on the GPU
(no hub), runs one warm-up and two measured steps through memplan.measure.cuda.run, and is
appended to ``<out-dir>/<gpu>-<date>.json`` as soon as it finishes, so a run cut short keeps
what it measured. The headline case comes first: a Llama-65B-architecture QLoRA step under a
memory cap of what a 48 GB RTX A6000 offers, and the same step uncapped for its peaks.

``--smoke`` swaps every model for a tiny catalog model and shrinks the shapes: the whole
driver then runs on a CPU in seconds (tests/validation/test_gpu_matrix.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Python 3.11 ships no "validation" package: make memplan importable from a bare checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memplan.specs import ALL_LINEAR, TrainingSetup

# The 65B headline: QLoRA paper setup (r=64 on every linear layer, paged AdamW, checkpointing).
HEADLINE_GPU = "rtx-a6000"
HEADLINE = {
    "method": "qlora",
    "lora_r": 64,
    "lora_alpha": 16,
    "lora_targets": ALL_LINEAR,
    "optimizer": "paged-adamw",
    "micro_batch_size": 1,
    "seq_len": 512,
    "grad_ckpt": True,
}

SMOKE_MODELS = {"qwen2.5-0.5b": "tiny-qwen2", "llama-65b": "tiny-llama"}


@dataclass(frozen=True)
class Case:
    """One configuration to measure."""

    label: str
    model: str
    setup: dict[str, Any]
    cap_to: str | None = None  # hardware profile whose usable memory caps the allocator
    tags: tuple[str, ...] = field(default=())


def _case(
    model: str,
    method: str,
    batch: int,
    seq: int,
    ckpt: bool,
    precision: str = "bf16",
    tags: tuple[str, ...] = (),
    **extra: Any,
) -> Case:
    label = f"{model} {method} {precision} b{batch} s{seq}" + (" ckpt" if ckpt else "")
    if "lora_targets" in extra:
        label += " all-linear"
    setup = {
        "method": method,
        "precision": precision,
        "micro_batch_size": batch,
        "seq_len": seq,
        "grad_ckpt": ckpt,
        **extra,
    }
    return Case(label=label, model=model, setup=setup, tags=tags)


def cases() -> list[Case]:
    """The matrix: 0.5B to 8B Llama-style models, four methods, two precisions, ckpt on/off."""
    out = [
        Case(
            "llama-65b qlora r64 paged b1 s512 ckpt (A6000 cap)",
            "llama-65b",
            HEADLINE,
            cap_to=HEADLINE_GPU,
            tags=("headline",),
        ),
        Case("llama-65b qlora r64 paged b1 s512 ckpt", "llama-65b", HEADLINE, tags=("headline",)),
    ]
    # Full fine-tuning, pure bf16 (bf16 weights, gradients and AdamW state).
    for model in ("qwen2.5-0.5b", "llama-3.2-1b"):
        for batch, seq in ((1, 512), (4, 1024)):
            for ckpt in (False, True):
                out.append(_case(model, "full", batch, seq, ckpt))
    # Full fine-tuning with fp32 weights under bf16 autocast (fp32 grads and AdamW state).
    for model in ("qwen2.5-0.5b", "llama-3.2-1b"):
        for ckpt in (False, True):
            out.append(_case(model, "full", 2, 512, ckpt, precision="bf16-amp"))
    # LoRA (q, v; r=8): every size, a short and a long batch.
    for model in ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        for batch, seq in ((1, 512), (4, 2048)):
            for ckpt in (False, True):
                out.append(_case(model, "lora", batch, seq, ckpt))
    # LoRA on every linear layer with fp32 weights under autocast.
    for model in ("llama-3.2-1b", "llama-3.2-3b"):
        out.append(
            _case(model, "lora", 2, 1024, True, precision="bf16-amp", lora_targets=ALL_LINEAR)
        )
    # QLoRA (NF4, double quantization, r=16 on every linear layer).
    for model in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        for batch, seq in ((1, 512), (4, 1024)):
            for ckpt in (False, True):
                out.append(_case(model, "qlora", batch, seq, ckpt))
    # BitFit: Qwen2 has q/k/v biases to train.
    for batch, seq in ((2, 512), (4, 1024)):
        out.append(_case("qwen2.5-0.5b", "bitfit", batch, seq, False))
    out.append(_case("qwen2.5-0.5b", "bitfit", 2, 512, False, precision="bf16-amp"))
    # 128k vocabulary where the logits dominate: fp32 upcast logits of b x s x 128256.
    out.append(_case("llama-3.2-1b", "lora", 8, 2048, True, tags=("logits",)))
    out.append(_case("llama-3.1-8b", "lora", 2, 4096, True, tags=("logits",)))
    return out


def smoke(case: Case) -> Case:
    """The same case on a tiny model with tiny shapes (CPU-sized)."""
    model = SMOKE_MODELS.get(case.model, "tiny-llama")
    setup = {
        **case.setup,
        "micro_batch_size": min(case.setup["micro_batch_size"], 2),
        "seq_len": 32,
    }
    return Case(case.label, model, setup, case.cap_to, case.tags)


def results_name(device_name: str, when: dt.datetime) -> str:
    """``<gpu>-<date>.json``: the device name in lower-case words joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"{slug}-{when:%Y-%m-%d}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="validation/results", help="where the file goes")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny models and shapes (CPU)")
    parser.add_argument("--only", help="measure only cases whose label contains this text")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per case")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start no new case after this many seconds"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import torch

    from memplan.catalog import load_model
    from memplan.measure import cuda as measure
    from memplan.measure.records import MeasuredRun, ResultsFile
    from memplan.plan import resolve_gpu
    from memplan.units import format_bytes

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: no CUDA device is visible to PyTorch (use --device cpu --smoke)")
        return 2
    used = measure.nvml_used() if cuda else None
    # NVML's reading before this process touches CUDA: other processes and driver reserve.
    baseline = used() if used is not None else None
    context = measure.cuda_context_bytes(used)[1] if cuda else None
    env = measure.environment(args.device)
    when = dt.datetime.now(dt.timezone.utc)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / results_name(env.device_name, when)

    todo = [smoke(c) if args.smoke else c for c in cases()]
    if args.only:
        todo = [c for c in todo if args.only in c.label]
    have_bnb = _importable("bitsandbytes")
    runs: list[MeasuredRun] = []
    print(f"{len(todo)} cases on {env.device_name}; writing {path}", flush=True)
    for i, case in enumerate(todo, 1):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {len(todo) - i + 1} cases left out")
            break
        setup = TrainingSetup(**{**case.setup, "device": args.device})
        if setup.quant.value != "none" and not have_bnb:
            print(f"[{i}/{len(todo)}] {case.label}: skipped (bitsandbytes missing)", flush=True)
            continue
        fraction = None
        if case.cap_to is not None and cuda:
            target = resolve_gpu(case.cap_to)
            # What the allocator gets on that card: its usable memory less the CUDA context.
            allocator_bytes = target.capacity_bytes - (context or target.context_bytes)
            fraction = allocator_bytes / env.total_memory_bytes
        run = measure.run(
            load_model(case.model),
            setup,
            model_name=case.model,
            device=args.device,
            steps=args.steps,
            used=used,
            memory_fraction=fraction,
            context_bytes=context,
            label=case.label,
        )
        runs.append(run)
        status = (
            f"OOM in {run.oom.phase}"
            if run.oom
            else f"peak {format_bytes(run.peak_allocated_bytes)}"
        )
        print(f"[{i}/{len(todo)}] {case.label}: {status} ({run.wall_time_s:.1f} s)", flush=True)
        results = ResultsFile(
            created=when.isoformat(timespec="seconds"),
            environment=env,
            nvml_baseline_bytes=baseline,
            runs=runs,
            wall_time_s=time.perf_counter() - start,
        )
        path.write_text(results.model_dump_json(indent=1))
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    if runs and cuda:
        from memplan.report import print_verification
        from memplan.verify import verify_file

        print_verification(*verify_file(path))
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    raise SystemExit(main())

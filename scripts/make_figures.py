"""Generate the README pictures into docs/figures/ from memplan's public API.

    python scripts/make_figures.py            # writes docs/figures/*.png
    python scripts/make_figures.py --out DIR  # somewhere else

Every picture is computed, never drawn by hand: rerun this after the model changes and
review the diff of the PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memplan import compare, plot
from memplan.plan import plan
from memplan.specs import TrainingSetup

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
# The lecture's question: 65B QLoRA on one 48 GB card (QLoRA paper recipe, micro-batch 1).
MODEL_65B, GPU_48GB = "llama-65b", "rtx-a6000"
RECIPE = TrainingSetup(method="qlora", micro_batch_size=1, seq_len=512)


def methods_figure(out: Path) -> Path:
    """Full vs LoRA vs QLoRA for a 7B and a 65B model, against 24/48/80 GB cards."""
    methods = compare.compare(["llama-2-7b", MODEL_65B], ["full", "lora", "qlora"])
    fig = plot.breakdown_figure(
        methods,
        capacities=compare.capacities(),
        title="Full fine-tuning vs LoRA vs QLoRA: memory per GPU (micro-batch 1, 512 tokens)",
    )
    return plot.save(fig, out / "full_lora_qlora.png", dpi=100)


def plan_picture(out: Path) -> Path:
    """65B QLoRA on an RTX A6000: the breakdown at the peak and the two-step timeline."""
    result = plan(MODEL_65B, RECIPE, gpu=GPU_48GB)
    trace = compare.step_traces(MODEL_65B, RECIPE)[compare.ANALYTICAL]
    return plot.save(plot.plan_figure(result, trace), out / "llama-65b_qlora_a6000.png", dpi=100)


def heatmap_picture(out: Path) -> Path:
    """Which micro-batch x sequence length of 65B QLoRA fit an RTX A6000."""
    grid = compare.peak_grid(
        MODEL_65B, RECIPE, batch_sizes=(1, 2, 4), seq_lens=(512, 1024, 2048, 4096), gpu=GPU_48GB
    )
    fig = plot.heatmap_figure(grid, title="llama-65b QLoRA on an RTX A6000: micro-batch x sequence")
    return plot.save(fig, out / "llama-65b_qlora_batch_seq.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the PNGs")
    args = parser.parse_args()
    for make in (methods_figure, plan_picture, heatmap_picture):
        print(make(args.out))


if __name__ == "__main__":
    main()

"""Rich rendering of plan results (display only: every number comes from a PlanResult)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from memplan.plan import PlanResult, Verdict
from memplan.units import format_bytes, gib

# Width of tables written to a pipe or a file: wide enough that no name is ever cut.
PIPED_WIDTH: Final = 400


def stdout_console() -> Console:
    """The console output goes to: the terminal's width, or (piped, redirected) a wide one
    without colours, so tables never truncate names."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPED_WIDTH, color_system=None, soft_wrap=True)


CATEGORY_LABELS: Final = {
    "frozen_weights": "frozen weights",
    "quant_state": "quantization state",
    "trainable_weights": "trainable weights",
    "master_weights": "fp32 master weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits": "logits / loss",
    "temporaries": "temporaries",
}


def _gib(num_bytes: int) -> str:
    return f"{gib(num_bytes):,.2f}"


def verdict(result: PlanResult) -> Text:
    """The verdict with its margin, and how that margin compares with memplan's error."""
    if result.verdict is None:
        return Text(f"per-GPU peak {_gib(result.device_bytes)} GiB (no --gpu given)", style="bold")
    margin = result.margin_bytes or 0
    of = f"{_gib(result.device_bytes)} of {_gib(result.gpu_capacity_bytes or 0)} GiB"
    if result.verdict == Verdict.FITS:
        line = Text(f"FITS on {result.gpu}: {of}, {_gib(margin)} GiB to spare", style="bold green")
    elif result.verdict == Verdict.BORDERLINE:
        safety = result.safety_fraction or 0.0
        line = Text(
            f"BORDERLINE on {result.gpu}: {of}, {_gib(margin)} GiB to spare, less than the "
            f"{safety:.0%} safety margin",
            style="bold yellow",
        )
    elif result.verdict == Verdict.PAGING:
        line = Text(
            f"FITS ONLY BY PAGING on {result.gpu}: {of}; {_gib(result.paged_out_bytes)} of "
            f"{_gib(result.paged_bytes)} GiB paged optimizer state must move to host memory",
            style="bold yellow",
        )
    else:
        line = Text(f"DOES NOT FIT on {result.gpu}: needs {of}, {_gib(-margin)} GiB short")
        line.stylize("bold red")
    if result.accuracy:
        line.append(f"\n{result.accuracy}", style="dim")
    return line


def breakdown_table(result: PlanResult) -> Table:
    """Memory at the peak by category, then the overheads up to what the device shows."""
    table = Table(
        title=f"Memory at the peak ({result.peak_phase}, step {result.peak_step})",
        title_justify="left",
    )
    table.add_column("category")
    table.add_column("GiB", justify="right")
    table.add_column("% of device", justify="right")
    total = max(result.device_bytes, 1)
    for key, label in CATEGORY_LABELS.items():
        value = result.breakdown_bytes.get(key, 0)
        if value:
            table.add_row(label, _gib(value), f"{100 * value / total:.1f}")
    table.add_row(
        "allocated peak",
        _gib(result.peak_bytes),
        f"{100 * result.peak_bytes / total:.1f}",
        style="bold",
    )
    table.add_row(
        "allocator overhead",
        _gib(result.allocator_overhead_bytes),
        f"{100 * result.allocator_overhead_bytes / total:.1f}",
    )
    table.add_row(
        "CUDA context",
        _gib(result.cuda_context_bytes),
        f"{100 * result.cuda_context_bytes / total:.1f}",
    )
    if result.communicator_bytes:
        table.add_row(
            "NCCL communicators",
            _gib(result.communicator_bytes),
            f"{100 * result.communicator_bytes / total:.1f}",
        )
    if result.paged_bytes:
        table.add_row(
            "paged optimizer state",
            _gib(result.paged_bytes),
            f"{100 * result.paged_bytes / total:.1f}",
        )
    table.add_row("device total (nvidia-smi)", _gib(result.device_bytes), "100.0", style="bold")
    if result.gpu_capacity_bytes is not None:
        table.add_row(f"capacity of {result.gpu}", _gib(result.gpu_capacity_bytes), "")
    return table


def summary_lines(result: PlanResult) -> Text:
    setup = result.setup
    lines = [
        f"{result.model}: {result.params:,} parameters, {result.trainable_params:,} trainable "
        f"({100 * result.trainable_params / result.params:.2f}%)",
        f"method {setup['method']}, precision {setup['precision']}, "
        f"optimizer {setup['optimizer']}, "
        f"micro-batch {setup['micro_batch_size']} x seq {setup['seq_len']}",
        f"peak in {result.peak_phase} (step {result.peak_step}) at {result.peak_event}",
        f"bytes per parameter: {result.bytes_per_param:.2f} at the peak, "
        f"{result.model_state_bytes_per_param:.2f} of model state",
    ]
    if result.cpu_bytes:
        lines.append(f"host memory for offloaded state: {_gib(result.cpu_bytes)} GiB per GPU")
    return Text("\n".join(lines))


def fixes_text(result: PlanResult, fixes: Sequence[Any]) -> Text:
    """What would make a run that does not fit fit (recommend's cheapest changes)."""
    if not fixes:
        return Text(f"no single change makes it fit on {result.gpu}: see memplan recommend")
    text = Text(f"cheapest changes that make it fit on {result.gpu}:\n", style="bold")
    for fix in fixes:
        text.append(
            f"- {fix.change}: {_gib(fix.device_bytes)} GiB; speed: {fix.speed}; "
            f"quality: {fix.accuracy}\n"
        )
    return text


def render_plan(result: PlanResult, fixes: Sequence[Any] = ()) -> RenderableType:
    assumptions = Text("\n".join(f"- {a}" for a in result.assumptions), style="dim")
    parts: list[RenderableType] = [verdict(result)]
    if result.verdict == Verdict.NO:
        parts.append(fixes_text(result, fixes))
    return Group(
        *parts,
        summary_lines(result),
        breakdown_table(result),
        Panel(assumptions, title="assumptions", title_align="left"),
    )


def print_plan(
    result: PlanResult, console: Console | None = None, *, fixes: Sequence[Any] = ()
) -> None:
    (console or stdout_console()).print(render_plan(result, fixes))


def comparison_table(traced: PlanResult, analytical: PlanResult) -> Table:
    """Traced (simulated or measured) against analytical, category by category, at each peak."""
    table = Table(
        title=f"{traced.source} vs analytical (each at its own peak)", title_justify="left"
    )
    for col in ("category", traced.source, "analytical", "difference", "%"):
        table.add_column(col, justify="left" if col == "category" else "right")
    rows = [
        (CATEGORY_LABELS[k], traced.breakdown_bytes[k], analytical.breakdown_bytes[k])
        for k in CATEGORY_LABELS
    ]
    rows.append(("allocated peak", traced.peak_bytes, analytical.peak_bytes))
    rows.append(("reserved (allocator model)", traced.reserved_bytes, analytical.reserved_bytes))
    for label, got, want in rows:
        if not got and not want:
            continue
        diff = want - got
        pct = f"{100 * diff / got:+.1f}" if got else ""
        sign = "+" if diff >= 0 else "-"
        table.add_row(
            label, format_bytes(got), format_bytes(want), sign + format_bytes(abs(diff)), pct
        )
    return table


def print_comparison(comparison: Any, console: Console | None = None) -> None:
    """A traced step: its verdict and breakdown, then the analytical prediction beside it."""
    traced: PlanResult = comparison.traced
    analytical: PlanResult | None = comparison.analytical
    wall = getattr(comparison, "wall_time_s", 0.0)
    out = console or stdout_console()
    out.print(verdict(traced))
    out.print(
        Text(
            f"{traced.source} step traced in {wall:.1f} s; peak in {traced.peak_phase} "
            f"(step {traced.peak_step}) at {traced.peak_event}"
        )
    )
    if analytical is None:  # a traced-only model
        out.print(Text(traced.assumptions[0], style="yellow"))
        out.print(breakdown_table(traced))
        return
    out.print(comparison_table(traced, analytical))


def print_verification(
    verifications: list[Any], summary: Any, console: Console | None = None
) -> None:
    """Measured against predicted, one table per run, then the summary."""
    out = console or stdout_console()
    for v in verifications:
        table = Table(title=f"{v.label} ({v.model})", title_justify="left")
        for col in ("quantity", "measured", "predicted", "error %"):
            table.add_column(col, justify="left" if col == "quantity" else "right")
        for c in v.checks:
            table.add_row(
                c.name,
                format_bytes(c.measured_bytes),
                format_bytes(c.predicted_bytes),
                f"{100 * c.error:+.1f}",
            )
        out.print(table)
        if v.oom:
            verdict_text = "predicted to fit" if v.predicted_fits else "predicted not to fit"
            out.print(Text(f"out of memory in {v.oom}; {verdict_text}", style="bold red"))
    medians = ", ".join(f"{k} {100 * e:.1f}%" for k, e in summary.median_abs_error.items())
    worst = ", ".join(f"{k} {100 * e:.1f}%" for k, e in summary.max_abs_error.items())
    out.print(
        Text(
            f"{summary.n_runs} runs on {summary.device}: median |error| {medians or '-'}; "
            f"worst {worst or '-'}"
        )
    )

"""Matplotlib pictures of memplan results: display only, every number comes from the API.

Each helper draws on an ``Axes`` it is given and returns the artists it made, so tests read
the data back (bar heights, line positions) instead of comparing pixels::

    fig = new_figure()
    breakdown_bars(fig.add_subplot(), compare("llama-2-7b"), capacities=capacities())
    save(fig, "methods.png")

Safe on headless machines: this module never imports ``matplotlib.pyplot`` (figures are plain
``Figure`` objects rendered by Agg when saved) and never shows anything. Memory is drawn in
GiB (2**30) and labelled so. One colour per category, the same in every picture
(:data:`CATEGORY_COLORS`).
"""

from __future__ import annotations

import os
import sys


def _import_matplotlib() -> None:
    """A bad MPLBACKEND makes importing matplotlib fail; memplan renders with Agg alone (it
    never opens a window), so the setting is dropped rather than fatal."""
    try:
        import matplotlib
    except ValueError:
        os.environ.pop("MPLBACKEND", None)
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            del sys.modules[name]  # the failed import's half-initialized modules
        import matplotlib  # noqa: F401


_import_matplotlib()

from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Final, Literal  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.collections import FillBetweenPolyCollection, LineCollection, PathCollection  # noqa: E402
from matplotlib.colorbar import Colorbar  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from memplan.compare import Comparison, PeakGrid, ValidationPoint, capacities, gpu_label  # noqa: E402
from memplan.plan import PlanResult  # noqa: E402
from memplan.report import CATEGORY_LABELS  # noqa: E402
from memplan.trace import Category, Event, Phase, Trace  # noqa: E402
from memplan.units import GiB, gib  # noqa: E402

PAGED_OPTIMIZER_STATE: Final = "paged_optimizer_state"  # bnb paged state in unified memory
NCCL_COMMUNICATORS: Final = "nccl_communicators"  # NCCL buffers outside the allocator

# One colour per category, shared by every picture (Paul Tol's colour-blind safe sets).
CATEGORY_COLORS: Final[Mapping[str, str]] = {
    Category.FROZEN_WEIGHTS.value: "#4477AA",
    Category.QUANT_STATE.value: "#88CCEE",
    Category.TRAINABLE_WEIGHTS.value: "#332288",
    Category.MASTER_WEIGHTS.value: "#AA4499",
    Category.GRADIENTS.value: "#EE7733",
    Category.OPTIMIZER_STATE.value: "#CC3311",
    PAGED_OPTIMIZER_STATE: "#EE99AA",
    Category.ACTIVATIONS.value: "#228833",
    Category.LOGITS.value: "#CCBB44",
    Category.TEMPORARIES.value: "#997744",
    Category.ALLOCATOR_OVERHEAD.value: "#BBBBBB",
    Category.CUDA_CONTEXT.value: "#555555",
    NCCL_COMMUNICATORS: "#888888",
}
LABELS: Final[Mapping[str, str]] = {
    **CATEGORY_LABELS,
    PAGED_OPTIMIZER_STATE: "optimizer state (paged)",
    Category.ALLOCATOR_OVERHEAD.value: "allocator overhead",
    Category.CUDA_CONTEXT.value: "CUDA context",
    NCCL_COMMUNICATORS: "NCCL communicators",
}
# Bottom to top of a bar: the allocated categories, then what the device adds on top.
STACK_ORDER: Final[tuple[str, ...]] = (
    *(c.value for c in Category if c not in (Category.CUDA_CONTEXT, Category.ALLOCATOR_OVERHEAD)),
    Category.ALLOCATOR_OVERHEAD.value,
    Category.CUDA_CONTEXT.value,
    NCCL_COMMUNICATORS,
    PAGED_OPTIMIZER_STATE,
)
# Traces overlaid on one timeline: first analytical, then simulated, then measured.
SOURCE_STYLES: Final[tuple[tuple[str, str], ...]] = (
    ("#222222", "-"),
    ("#0077BB", "--"),
    ("#EE3377", ":"),
    ("#009988", "-."),
)
CAPACITY_STYLES: Final[tuple[str, ...]] = ("--", "-.", ":", (0, (5, 1, 1, 1)))  # type: ignore[assignment]
CAPACITY_COLOR: Final = "#333333"
METRIC_COLORS: Final[Mapping[str, str]] = {
    "allocated": "#0077BB",
    "reserved": "#EE3377",
    "nvml": "#009988",
    "nvidia-smi": "#009988",
    "unknown": "#777777",
}
NO_FIT_COLOR: Final = "#DDDDDD"
PAGED_HATCH: Final = "///"  # cells and bars that fit only by paging optimizer state
PAGED_HATCH_COLOR: Final = "#666666"
BOUNDARY_COLOR: Final = "#E0002A"
CLIP_RATIO: Final = 2.5  # clip bars taller than this many times the largest capacity...
CLIP_TOP: Final = 1.5  # ...at this many times it
GIB_AXIS_LABEL: Final = "memory per GPU (GiB = 2³⁰ bytes)"
ALLOCATED_AXIS_LABEL: Final = "allocated peak per GPU (GiB = 2³⁰ bytes)"


def _legend_outside(
    ax: Axes, handles: Sequence[Artist | tuple[Artist, ...]], labels: Sequence[str]
) -> Legend:
    """A legend right of the axes, never over the data (the figure's layout makes room)."""
    return ax.legend(
        list(handles),
        list(labels),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize=8,
    )


def new_figure(width_in: float = 8.0, height_in: float = 4.5) -> Figure:
    """A figure laid out so that legends outside the axes stay inside the picture."""
    return Figure(figsize=(width_in, height_in), layout="constrained")


def save(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` (PNG, SVG or PDF by suffix) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


# ---------------------------------------------------------------------------------------------
# Stacked bars: where the memory of each configuration goes


def device_stack_bytes(result: PlanResult) -> dict[str, int]:
    """The bar of one plan: allocated categories at the peak plus overheads, summing to
    ``result.device_bytes`` (what nvidia-smi would show)."""
    stack = {key: result.breakdown_bytes.get(key, 0) for key in STACK_ORDER}
    stack[Category.ALLOCATOR_OVERHEAD.value] = result.allocator_overhead_bytes
    stack[Category.CUDA_CONTEXT.value] = result.cuda_context_bytes
    stack[NCCL_COMMUNICATORS] = result.communicator_bytes
    stack[PAGED_OPTIMIZER_STATE] = result.paged_bytes
    return stack


@dataclass
class BreakdownArtists:
    """What :func:`breakdown_bars` drew."""

    segments: dict[str, BarContainer]  # category -> one rectangle per configuration
    capacity_lines: dict[str, Line2D]  # GPU label -> horizontal line at its capacity
    positions: list[float]  # x of each bar
    labels: list[str]  # configuration of each bar
    totals: list[Annotation] = field(default_factory=list)  # device total above each bar
    legend: Legend | None = None


def _bars_of(
    data: Comparison | Mapping[str, PlanResult] | PlanResult,
) -> list[tuple[str, str, PlanResult]]:
    if isinstance(data, PlanResult):
        return [("", data.model, data)]
    if isinstance(data, Comparison):
        return [(r.group, r.label, r.result) for r in data.rows]
    return [("", label, result) for label, result in data.items()]


def _positions(groups: Sequence[str], gap: float = 0.6) -> list[float]:
    """One slot per bar, with an extra gap between groups."""
    out: list[float] = []
    x = 0.0
    for i, group in enumerate(groups):
        if i and group != groups[i - 1]:
            x += gap
        out.append(x)
        x += 1.0
    return out


def capacity_lines(
    ax: Axes, capacities: Mapping[str, int], *, text: bool = True
) -> dict[str, Line2D]:
    """Dashed horizontal lines at each GPU's usable memory.

    ``text`` writes each GPU's name at the right end of its line (keep that end free of
    data); otherwise the lines carry their names as legend labels only.
    """
    lines: dict[str, Line2D] = {}
    blend = blended_transform_factory(ax.transAxes, ax.transData)
    for i, (name, capacity_bytes) in enumerate(sorted(capacities.items(), key=lambda kv: kv[1])):
        value = gib(capacity_bytes)
        style = CAPACITY_STYLES[i % len(CAPACITY_STYLES)]
        lines[name] = ax.axhline(
            value,
            color=CAPACITY_COLOR,
            linestyle=style,
            linewidth=1.2,
            zorder=3,
            label=f"{name}: {value:.1f} GiB",
        )
        if not text:
            continue
        ax.text(
            0.995,
            value,
            f"{name}: {value:.1f} GiB",
            transform=blend,
            ha="right",
            va="bottom",
            fontsize=8,
            color=CAPACITY_COLOR,
            zorder=4,
        )
    return lines


def breakdown_bars(
    ax: Axes,
    data: Comparison | Mapping[str, PlanResult] | PlanResult,
    *,
    capacities: Mapping[str, int] | None = None,
    legend: bool = True,
    annotate: bool = True,
    clip: bool | None = None,
    width: float = 0.7,
) -> BreakdownArtists:
    """Stacked bars of per-GPU memory by category, one bar per configuration.

    Each bar sums to the plan's ``device_bytes``: allocated categories at the peak, allocator
    overhead, CUDA context and paged optimizer state. ``capacities`` (label -> bytes) draws a
    line per GPU, e.g. :func:`memplan.compare.capacities`. ``clip`` (default: when a bar is
    over 2.5x the largest capacity) cuts the axis at 1.5x that capacity; clipped bars keep
    their full height as data and show their total with an arrow.
    """
    bars = _bars_of(data)
    groups = [g for g, _, _ in bars]
    x = _positions(groups)
    stacks = [device_stack_bytes(r) for _, _, r in bars]
    bottom = np.zeros(len(bars))
    segments: dict[str, BarContainer] = {}
    for key in STACK_ORDER:
        heights = np.array([gib(s[key]) for s in stacks])
        if not heights.any():
            continue
        segments[key] = ax.bar(
            x,
            heights,
            width,
            bottom=bottom,
            color=CATEGORY_COLORS[key],
            label=LABELS[key],
            hatch="//" if key == PAGED_OPTIMIZER_STATE else None,
            edgecolor="white",
            linewidth=0.4,
            zorder=2,
        )
        bottom = bottom + heights
    tallest = float(bottom.max())
    largest_capacity = max((gib(c) for c in (capacities or {}).values()), default=0.0)
    if clip is None:  # a 1 TB bar would flatten the bars that matter against the GPU lines
        clip = largest_capacity > 0 and tallest > CLIP_RATIO * largest_capacity
    top_gib = CLIP_TOP * largest_capacity if clip else max(tallest, largest_capacity) * 1.1
    totals: list[Annotation] = []
    if annotate:
        for xi, top in zip(x, bottom, strict=True):
            clipped = top > top_gib
            totals.append(
                ax.annotate(
                    f"{top:,.1f}" + (" ↑" if clipped else ""),
                    (xi, top_gib if clipped else top),
                    xytext=(0, -3 if clipped else 2),
                    textcoords="offset points",
                    ha="center",
                    va="top" if clipped else "bottom",
                    fontsize=8,
                    zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.8, "alpha": 0.9},
                )
            )
    labels = [label for _, label, _ in bars]
    shown = [_wrapped(label) for label in labels]
    ax.set_xticks(x, shown, fontsize=9)
    _group_labels(ax, x, groups, max(s.count("\n") + 1 for s in shown))
    # Room on the right for the capacity labels, above the bars for the totals.
    ax.set_xlim(min(x) - 0.6, max(x) + 0.6 + (1.6 if capacities else 0.0))
    ax.set_ylim(0, top_gib)
    lines = capacity_lines(ax, capacities) if capacities else {}
    ax.set_ylabel(GIB_AXIS_LABEL)
    ax.grid(axis="y", color="#EEEEEE", zorder=0)
    ax.set_axisbelow(True)
    artists = BreakdownArtists(segments, lines, list(x), labels, totals)
    if legend:
        handles = [segments[k] for k in reversed(STACK_ORDER) if k in segments]
        artists.legend = _legend_outside(
            ax, handles, [LABELS[k] for k in reversed(STACK_ORDER) if k in segments]
        )
    return artists


def _wrapped(label: str, width: int = 10) -> str:
    """A long bar label broken after its hyphens, so neighbouring labels do not collide.

    >>> _wrapped("paged-adamw-8bit")
    'paged-\\nadamw-8bit'
    """
    lines = [""]
    for part in label.replace("-", "-\0").split("\0"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _group_labels(ax: Axes, x: Sequence[float], groups: Sequence[str], tick_lines: int = 1) -> None:
    """Group names centred under their bars, below the tick labels (``tick_lines`` high)."""
    if not any(groups):
        return
    blend = blended_transform_factory(ax.transData, ax.transAxes)
    start = 0
    for i in range(1, len(groups) + 1):
        if i == len(groups) or groups[i] != groups[start]:
            centre = (x[start] + x[i - 1]) / 2
            ax.annotate(
                groups[start],
                (centre, 0),
                xycoords=blend,
                xytext=(0, -10 - 12 * tick_lines),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=9,
                fontweight="bold",
            )
            start = i


def _plain_log_ticks(axis: Axis) -> None:
    """Ticks at 1, 2, 5 x 10^k (also 3 and 7 within one decade), labelled as plain numbers
    (0.5, 20, 1,000) rather than 2x10^1."""
    low, high = sorted(axis.get_view_interval())
    narrow = low > 0 and high / low < 10
    subs = (1.0, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
    axis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------
# Scaling: per-GPU memory as the model or the GPU count grows

# Series (methods, ZeRO stages, sources) are not categories: Okabe-Ito colours, none of
# which is a category colour, so a line never reads as "optimizer state".
SERIES_COLORS: Final[tuple[str, ...]] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#000000")
SERIES_MARKERS: Final[tuple[str, ...]] = ("o", "s", "^", "D", "v")
_BILLION: Final = 1000**3  # parameters per "B" in model names


@dataclass
class ScalingArtists:
    """What :func:`scaling_lines` drew."""

    lines: dict[str, Line2D]  # series -> (x, per-GPU GiB) per configuration
    capacity_lines: dict[str, Line2D]
    legend: Legend | None = None


def scaling_lines(
    ax: Axes,
    comparison: Comparison,
    *,
    x: Literal["num_gpus", "params"] = "num_gpus",
    series: Literal["group", "label"] = "group",
    capacities: Mapping[str, int] | None = None,
    legend: bool = True,
) -> ScalingArtists:
    """Per-GPU memory (device bytes, GiB) against the GPU count or the model size.

    One line per ``series`` (rows sharing a group, e.g. a ZeRO stage, or a label, e.g. a
    method), log-scaled x.
    """
    by_series: dict[str, list[tuple[float, float]]] = {}
    names: dict[float, str] = {}  # x tick labels
    for row in comparison.rows:
        r = row.result
        key = row.group if series == "group" else row.label
        if x == "num_gpus":
            xv = float(r.parallel["num_gpus"])
            names[xv] = f"{xv:g}"
        else:
            xv = r.params / _BILLION
            names[xv] = f"{r.model}\n{xv:.3g}B"
        by_series.setdefault(key, []).append((xv, gib(r.device_bytes)))
    lines: dict[str, Line2D] = {}
    for i, (name, pts) in enumerate(by_series.items()):
        pts.sort()
        (lines[name],) = ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color=SERIES_COLORS[i % len(SERIES_COLORS)],
            marker=SERIES_MARKERS[i % len(SERIES_MARKERS)],
            linewidth=1.6,
            label=name,
            zorder=3,
        )
    ax.set_xscale("log", base=2 if x == "num_gpus" else 10)
    ticks = sorted(names)
    ax.set_xticks(ticks, [names[t] for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("GPUs (data parallel)" if x == "num_gpus" else "parameters (billions)")
    ax.set_ylabel(GIB_AXIS_LABEL)
    ax.set_yscale("log")
    ax.grid(color="#EEEEEE", zorder=0)
    lines_at = capacity_lines(ax, capacities, text=False) if capacities else {}
    ax.autoscale_view()
    _plain_log_ticks(ax.yaxis)
    artists = ScalingArtists(lines, lines_at)
    if legend:
        handles = [*lines.values(), *reversed(lines_at.values())]
        artists.legend = _legend_outside(ax, handles, [str(h.get_label()) for h in handles])
    return artists


# ---------------------------------------------------------------------------------------------
# Timeline: allocated memory event by event over training steps

Segment = tuple[int, Phase, int]  # (step, phase, n-th run of that phase in the step)


@dataclass
class TimelineArtists:
    """What :func:`timeline` drew."""

    lines: dict[str, Line2D]  # trace label -> total allocated after each event
    areas: dict[str, FillBetweenPolyCollection]  # category -> area (single stacked trace)
    segments: list[Segment]  # phase run drawn on each unit of the x axis
    capacity_lines: dict[str, Line2D]
    legend: Legend | None = None


def _run_keys(events: Sequence[Event]) -> list[Segment]:
    """The phase run each event belongs to (micro-batches repeat forward/backward in a step)."""
    keys: list[Segment] = []
    runs: dict[tuple[int, Phase], int] = {}
    previous: tuple[int, Phase] | None = None
    for event in events:
        key = (event.step, event.phase)
        if key != previous:
            runs[key] = runs.get(key, -1) + 1
            previous = key
        keys.append((event.step, event.phase, runs[key]))
    return keys


def _segments(keyed: Sequence[Sequence[Segment]], step: int | None) -> list[Segment]:
    """Phase runs of all traces in time order (each trace's order kept, shared runs merged)."""
    ordered: list[Segment] = []
    for keys in keyed:
        after = -1
        for key in dict.fromkeys(keys):
            if key in ordered:
                after = ordered.index(key)
            else:
                after += 1
                ordered.insert(after, key)
    return [k for k in ordered if step in (None, k[0])]


def timeline_points(
    events: Sequence[Event], segments: Sequence[Segment], step: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """x (phase-aligned), total allocated bytes and bytes per category after each event.

    Run k of ``segments`` spans x in [k, k+1); its events are spread evenly inside it, so
    traces from different sources line up phase by phase whatever their event counts.
    """
    keys = _run_keys(events)
    deltas = np.fromiter((e.delta_bytes for e in events), np.int64, len(events))
    totals = np.cumsum(deltas)
    categories = np.array([e.category.value for e in events])
    per_category = {
        c.value: np.cumsum(np.where(categories == c.value, deltas, 0)) for c in Category
    }
    index = {key: i for i, key in enumerate(segments)}
    lengths: dict[Segment, int] = {}
    for key in keys:
        lengths[key] = lengths.get(key, 0) + 1
    xs = np.empty(len(events))
    seen: dict[Segment, int] = {}
    for n, key in enumerate(keys):
        i = seen.get(key, 0)
        seen[key] = i + 1
        xs[n] = index.get(key, -1) + i / lengths[key]
    keep = np.array([step in (None, k[0]) for k in keys], dtype=bool)
    return xs[keep], totals[keep], {k: v[keep] for k, v in per_category.items()}


def timeline(
    ax: Axes,
    traces: Trace | Mapping[str, Trace],
    *,
    step: int | None = None,
    stacked: bool | None = None,
    capacities: Mapping[str, int] | None = None,
    legend: bool = True,
) -> TimelineArtists:
    """Allocated memory after every event of one or more traces, phase by phase.

    Several traces (analytical, simulated, measured) are overlaid as lines; a single trace is
    also drawn as areas by category (``stacked``). ``step`` keeps one training step (0: the
    first, which creates optimizer state; 1: steady state); totals still count what earlier
    steps left allocated.
    """
    named = {traces.source: traces} if isinstance(traces, Trace) else dict(traces)
    events = {label: list(t.events()) for label, t in named.items()}
    segments = _segments([_run_keys(e) for e in events.values()], step)
    if stacked is None:
        stacked = len(named) == 1
    lines: dict[str, Line2D] = {}
    areas: dict[str, FillBetweenPolyCollection] = {}
    highest = 0.0
    for i, (label, trace_events) in enumerate(events.items()):
        xs, totals, per_category = timeline_points(trace_events, segments, step)
        y = totals / GiB
        if stacked and i == 0:
            lower = np.zeros(len(xs))
            for key in STACK_ORDER:
                values = per_category.get(key)
                if values is None or not values.any():
                    continue
                upper = lower + values / GiB
                areas[key] = ax.fill_between(
                    xs,
                    lower,
                    upper,
                    step="post",
                    color=CATEGORY_COLORS[key],
                    label=LABELS[key],
                    linewidth=0,
                )
                lower = upper
        color, style = SOURCE_STYLES[i % len(SOURCE_STYLES)]
        (lines[label],) = ax.plot(
            xs,
            y,
            drawstyle="steps-post",
            color=color,
            linestyle=style,
            linewidth=1.3,
            label=f"{label} (total)" if stacked else label,
            zorder=3,
        )
        highest = max(highest, float(y.max()) if len(y) else 0.0)
    _phase_axis(ax, segments)
    lines_at = capacity_lines(ax, capacities, text=False) if capacities else {}
    top = max([highest] + [gib(c) for c in (capacities or {}).values()])
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(GIB_AXIS_LABEL)
    artists = TimelineArtists(lines, areas, segments, lines_at)
    if legend:
        handles: list[Artist] = list(lines.values())
        handles += [areas[k] for k in reversed(STACK_ORDER) if k in areas]
        handles += reversed(lines_at.values())
        artists.legend = _legend_outside(ax, handles, [str(h.get_label()) for h in handles])
    return artists


_STEP_NOTES: Final = {0: " (first: optimizer state created)", 1: " (steady state)"}


def _phase_axis(ax: Axes, segments: Sequence[Segment]) -> None:
    """Phase names under the x axis, light bands per phase, step names along the top."""
    for k in range(len(segments)):
        if k % 2 == 0:
            ax.axvspan(k, k + 1, color="#F4F4F4", zorder=0, linewidth=0)
    ax.set_xticks(
        [k + 0.5 for k in range(len(segments))],
        [p.value.replace("_", " ") + (f" {n + 1}" if n else "") for _, p, n in segments],
        rotation=0 if len(segments) <= 12 else 90,
        fontsize=8,
    )
    ax.tick_params(axis="x", length=0)
    ax.set_xlim(0, max(len(segments), 1))
    steps = sorted({s for s, _, _ in segments})
    blend = blended_transform_factory(ax.transData, ax.transAxes)
    for s in steps:
        ks = [k for k, (step, _, _) in enumerate(segments) if step == s]
        if s != steps[0]:
            ax.axvline(ks[0], color="#888888", linewidth=0.8, zorder=1)
        ax.text(
            (ks[0] + ks[-1] + 1) / 2,
            0.985,
            f"step {s}" + (_STEP_NOTES.get(s, "") if len(steps) > 1 else ""),
            transform=blend,
            ha="center",
            va="top",
            fontsize=8,
            color="#555555",
        )
    ax.set_xlabel("training step, event by event (phases equally wide)", fontsize=9)


# ---------------------------------------------------------------------------------------------
# Heat map: peak memory over micro-batch x sequence length, with the fits/doesn't boundary


@dataclass
class HeatmapArtists:
    """What :func:`peak_heatmap` drew."""

    image: AxesImage  # GiB per cell, [batch][seq]; cells that do not fit are masked
    boundary: LineCollection | None  # cell edges between fitting and non-fitting cells
    cell_texts: list[list[Text]]
    paged_cells: list[Rectangle]  # fit only because paged optimizer state can move to the host
    colorbar: Colorbar | None = None
    legend: Legend | None = None


def fit_boundary(
    fits: Sequence[Sequence[bool]],
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Cell edges (image coordinates, cell (r, c) centred on (c, r)) that separate a cell
    that fits from a neighbour that does not.

    >>> fit_boundary([[True, False]])
    [((0.5, -0.5), (0.5, 0.5))]
    """
    out = []
    rows, cols = len(fits), len(fits[0]) if fits else 0
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and fits[r][c] != fits[r][c + 1]:
                out.append(((c + 0.5, r - 0.5), (c + 0.5, r + 0.5)))
            if r + 1 < rows and fits[r][c] != fits[r + 1][c]:
                out.append(((c - 0.5, r + 0.5), (c + 0.5, r + 0.5)))
    return out


def peak_heatmap(
    ax: Axes,
    grid: PeakGrid,
    *,
    annotate: bool = True,
    colorbar: bool = True,
    legend: bool = True,
) -> HeatmapArtists:
    """Per-GPU memory (GiB) for each micro-batch (rows) and sequence length (columns).

    With a GPU in ``grid``, cells that do not fit are grey and a line separates them from
    those that do; hatched cells fit only because paged optimizer state can move to the host
    (known for grids of device bytes, see :class:`memplan.compare.PeakGrid`).
    """
    values = np.array(grid.cell_bytes, dtype=np.float64) / GiB
    fits = np.array(grid.fits, dtype=bool) if grid.fits is not None else np.ones(values.shape, bool)
    shown = np.ma.masked_array(values, mask=~fits)
    cmap = ListedColormap(_viridis_light()).with_extremes(bad=NO_FIT_COLOR)
    low = float(values.min())
    high = float(values[fits].max()) if fits.any() else float(values.max())
    image = ax.imshow(
        shown, origin="lower", cmap=cmap, norm=Normalize(low, max(high, low * 1.001)), aspect="auto"
    )
    ax.set_xticks(range(len(grid.seq_lens)), [f"{s:,}" for s in grid.seq_lens], fontsize=8)
    ax.set_yticks(range(len(grid.batch_sizes)), [str(b) for b in grid.batch_sizes], fontsize=8)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("micro-batch size")
    if grid.paging is not None:
        paged_only = np.array(grid.paging, dtype=bool)
    else:
        paged_only = np.zeros(values.shape, bool)
    texts: list[list[Text]] = []
    if annotate:
        for r, row in enumerate(values):
            texts.append(
                [
                    ax.text(
                        c,
                        r,
                        f"{v:,.1f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="#222222" if not fits[r, c] or _light(image, v) else "white",
                        zorder=4,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5, "alpha": 0.85}
                        if paged_only[r, c]
                        else None,
                    )
                    for c, v in enumerate(row)
                ]
            )
    boundary = None
    paged: list[Rectangle] = []
    if grid.fits is not None:
        edges = fit_boundary(grid.fits)
        if edges:
            boundary = LineCollection(edges, colors=BOUNDARY_COLOR, linewidths=2.2, zorder=3)
            ax.add_collection(boundary)
        for r, c in zip(*np.nonzero(paged_only), strict=True):
            cell = Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch=PAGED_HATCH)
            cell.set_edgecolor(PAGED_HATCH_COLOR)
            cell.set_linewidth(0)
            ax.add_patch(cell)
            paged.append(cell)
    bar = None
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
        what = GIB_AXIS_LABEL if grid.quantity == "device" else ALLOCATED_AXIS_LABEL
        bar.set_label(what + (", cells that fit" if grid.fits else ""), fontsize=8)
    artists = HeatmapArtists(image, boundary, texts, paged, bar)
    if legend and grid.gpu is not None:
        name = gpu_label(grid.gpu)
        handles: list[Artist] = [
            Line2D([], [], color=BOUNDARY_COLOR, linewidth=2.2, label=f"fit boundary ({name})"),
            Patch(
                facecolor=NO_FIT_COLOR,
                label=f"does not fit in {gib(grid.capacity_bytes or 0):.1f} GiB",
            ),
        ]
        if paged:
            handles.append(
                Patch(
                    fill=False,
                    hatch=PAGED_HATCH,
                    edgecolor=PAGED_HATCH_COLOR,
                    label="fits by paging",
                )
            )
        artists.legend = ax.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(0.0, 1.01),
            ncol=len(handles),
            frameon=False,
            fontsize=8,
        )
    return artists


def _viridis_light() -> list[tuple[float, float, float, float]]:
    """viridis without its darkest quarter, so cell numbers stay readable."""
    from matplotlib import colormaps

    base = colormaps["viridis"]
    return [base(0.25 + 0.75 * i / 255) for i in range(256)]


def _light(image: AxesImage, value: float) -> bool:
    level = float(np.asarray(image.norm(np.array([value])))[0])
    r, g, b, _ = image.cmap(level)
    return 0.299 * r + 0.587 * g + 0.114 * b > 0.5


# ---------------------------------------------------------------------------------------------
# Predicted vs measured


@dataclass
class ScatterArtists:
    """What :func:`prediction_scatter` drew."""

    points: dict[str, PathCollection]  # metric or source -> (measured, predicted) in GiB
    identity: Line2D
    band: FillBetweenPolyCollection
    labels: list[Annotation]
    legend: Legend | None = None


def prediction_scatter(
    ax: Axes,
    points: Sequence[ValidationPoint],
    *,
    band_fraction: float = 0.05,
    by: Literal["metric", "source"] = "metric",
    annotate: bool = False,
    log: bool | None = None,
    legend: bool = True,
) -> ScatterArtists:
    """Predicted against measured peak (GiB) per run, the diagonal and a ±``band_fraction`` band.

    Points are coloured ``by`` what was measured (allocated, reserved, nvidia-smi) or by
    where the measurement comes from. ``log`` (default: when the values span more than 20x)
    draws both axes logarithmically.
    """
    if not points:
        raise ValueError("no validation points to draw")
    measured = np.array([gib(p.measured_bytes) for p in points])
    predicted = np.array([gib(p.predicted_bytes) for p in points])
    low = float(min(measured.min(), predicted.min())) / 1.15
    high = float(max(measured.max(), predicted.max())) * 1.15
    if log is None:
        log = high / low > 20
    xs = np.geomspace(low, high, 200) if log else np.linspace(low, high, 200)
    band = ax.fill_between(
        xs,
        xs * (1 - band_fraction),
        xs * (1 + band_fraction),
        color="#DDEEDD",
        linewidth=0,
        label=f"±{band_fraction:.0%}",
        zorder=1,
    )
    (identity,) = ax.plot(
        xs, xs, color="#555555", linewidth=1, label="predicted = measured", zorder=2
    )
    drawn: dict[str, PathCollection] = {}
    keys = [p.metric if by == "metric" else p.source for p in points]
    for i, key in enumerate(dict.fromkeys(keys)):
        mask = np.array([k == key for k in keys])
        if by == "metric":
            color = METRIC_COLORS.get(key, METRIC_COLORS["unknown"])
        else:
            color = SERIES_COLORS[i % len(SERIES_COLORS)]
        drawn[key] = ax.scatter(
            measured[mask],
            predicted[mask],
            s=28,
            color=color,
            marker=SERIES_MARKERS[i % len(SERIES_MARKERS)] if by == "source" else "o",
            edgecolor="white",
            linewidth=0.5,
            label=f"{key} ({int(mask.sum())})",
            zorder=3,
        )
    labels = []
    if annotate:
        labels = [
            ax.annotate(p.label, (m, q), xytext=(4, 2), textcoords="offset points", fontsize=6)
            for p, m, q in zip(points, measured, predicted, strict=True)
        ]
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    if log:
        _plain_log_ticks(ax.xaxis)
        _plain_log_ticks(ax.yaxis)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("measured peak (GiB)")
    ax.set_ylabel("predicted peak (GiB)")
    ax.grid(color="#EEEEEE", zorder=0)
    artists = ScatterArtists(drawn, identity, band, labels)
    if legend:
        handles = [band, identity, *drawn.values()]
        artists.legend = _legend_outside(ax, handles, [str(h.get_label()) for h in handles])
    return artists


# ---------------------------------------------------------------------------------------------
# Whole figures, for the CLI and scripts


def breakdown_figure(
    data: Comparison | Mapping[str, PlanResult] | PlanResult,
    *,
    capacities: Mapping[str, int] | None = None,
    title: str | None = None,
) -> Figure:
    """One stacked bar per configuration, with GPU capacity lines."""
    num_bars = len(_bars_of(data))
    fig = new_figure(max(6.0, 3.6 + 0.75 * num_bars), 4.6)
    ax = fig.add_subplot()
    breakdown_bars(ax, data, capacities=capacities)
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    return fig


def plan_figure(result: PlanResult, trace: Trace | None = None) -> Figure:
    """The plan's bar against its GPU, and (given its trace) allocated memory over the steps."""
    fig = new_figure(12.5 if trace is not None else 6.5, 4.8)
    caps = capacities([result.gpu]) if result.gpu else None
    bar_data = {result.setup["method"]: result}
    if trace is None:
        breakdown_bars(fig.add_subplot(), bar_data, capacities=caps)
    else:
        left, right = fig.subplots(1, 2, width_ratios=[1, 2.8])
        bars = breakdown_bars(left, bar_data, capacities=caps, legend=False)
        left.set_title("at the peak, as the device shows it", fontsize=9)
        drawn = timeline(right, {"allocated": trace}, capacities=caps, legend=False)
        right.set_title("allocated memory over two training steps", fontsize=9)
        handles: list[Artist | tuple[Artist, ...]] = list(drawn.lines.values())
        for key in reversed(STACK_ORDER):
            if key in bars.segments:
                handles.append(bars.segments[key])
            elif key in drawn.areas:
                handles.append(drawn.areas[key])
        names = [str(h.get_label()) for h in drawn.lines.values()]
        names += [
            LABELS[k] for k in reversed(STACK_ORDER) if k in bars.segments or k in drawn.areas
        ]
        handles += drawn.capacity_lines.values()
        names += [str(line.get_label()) for line in drawn.capacity_lines.values()]
        _legend_outside(right, handles, names)
    fig.suptitle(_plan_title(result), fontsize=11)
    return fig


def _plan_title(result: PlanResult) -> str:
    setup = result.setup
    title = (
        f"{result.model}, {setup['method']}, micro-batch {setup['micro_batch_size']}"
        f" x {setup['seq_len']} tokens"
    )
    if result.gpu is None:
        return title
    verdict = {
        "fits only by paging": "fits only by paging optimizer state to the host",
        "borderline": "fits, within memplan's error (borderline)",
        "does not fit": "does NOT fit",
    }.get(result.verdict or "", "fits")
    return f"{title} on {gpu_label(result.gpu)}: {verdict}"


def timeline_figure(
    traces: Trace | Mapping[str, Trace],
    *,
    step: int | None = None,
    capacities: Mapping[str, int] | None = None,
    title: str | None = None,
) -> Figure:
    fig = new_figure(11.0, 4.6)
    ax = fig.add_subplot()
    timeline(ax, traces, step=step, capacities=capacities)
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    return fig


def heatmap_figure(grid: PeakGrid, *, title: str | None = None) -> Figure:
    fig = new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    peak_heatmap(ax, grid)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def scatter_figure(
    points: Sequence[ValidationPoint],
    *,
    by: Literal["metric", "source"] = "metric",
    title: str | None = None,
) -> Figure:
    fig = new_figure(8.5, 5.5)
    ax = fig.add_subplot()
    prediction_scatter(ax, points, by=by)
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    return fig

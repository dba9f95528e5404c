"""memplan.plot: the data each artist carries equals the numbers it was given, and every
figure saves. Pixels are never compared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex, to_rgba

from memplan import compare, plot
from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.plan import PlanResult, plan
from memplan.specs import TrainingSetup
from memplan.trace import Category, Event, Phase, Repeat, Trace
from memplan.units import GiB

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _values(data: object) -> list[float]:
    """Line data as plain floats."""
    return [float(v) for v in np.asarray(data, dtype=float)]


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def methods() -> compare.Comparison:
    return compare.compare("llama-2-7b", ["full", "lora", "qlora"], gpu="rtx-a6000")


@pytest.fixture(scope="module")
def caps() -> dict[str, int]:
    return compare.capacities(["rtx-4090", "rtx-a6000", "a100-80gb"])


def test_importing_plot_does_not_import_pyplot() -> None:
    code = "import sys, memplan.plot; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_colour_and_label_per_category() -> None:
    for key in plot.STACK_ORDER:
        assert key in plot.CATEGORY_COLORS
        assert key in plot.LABELS
    assert len(set(plot.CATEGORY_COLORS.values())) == len(plot.CATEGORY_COLORS)
    assert set(plot.STACK_ORDER) == set(plot.CATEGORY_COLORS)
    # Nothing else in any picture borrows a category's colour.
    others = [
        *plot.SERIES_COLORS,
        *plot.METRIC_COLORS.values(),
        *(color for color, _ in plot.SOURCE_STYLES),
        plot.NO_FIT_COLOR,
        plot.BOUNDARY_COLOR,
        plot.CAPACITY_COLOR,
    ]
    assert not {c.lower() for c in others} & {c.lower() for c in plot.CATEGORY_COLORS.values()}


def test_device_stack_sums_to_device_bytes(methods: compare.Comparison) -> None:
    for row in methods.rows:
        stack = plot.device_stack_bytes(row.result)
        assert sum(stack.values()) == row.result.device_bytes
        assert stack["paged_optimizer_state"] == row.result.paged_bytes
        assert stack["cuda_context"] == row.result.cuda_context_bytes


def test_bar_heights_are_the_breakdown_in_gib(
    methods: compare.Comparison, caps: dict[str, int], tmp_path: Path
) -> None:
    fig = plot.new_figure()
    ax = fig.add_subplot()
    drawn = plot.breakdown_bars(ax, methods, capacities=caps)
    results = [r.result for r in methods.rows]
    stacks = [plot.device_stack_bytes(r) for r in results]
    bottoms = np.zeros(len(results))
    for key in plot.STACK_ORDER:
        expected = np.array([s[key] / GiB for s in stacks])
        if not expected.any():
            assert key not in drawn.segments
            continue
        rects = drawn.segments[key].patches
        assert [r.get_height() for r in rects] == pytest.approx(expected.tolist(), rel=1e-12)
        assert [r.get_y() for r in rects] == pytest.approx(bottoms.tolist(), rel=1e-12)
        assert {to_hex(r.get_facecolor()) for r in rects} == {plot.CATEGORY_COLORS[key].lower()}
        bottoms += expected
    # Each bar's top is what the device would show.
    assert bottoms.tolist() == pytest.approx([r.device_bytes / GiB for r in results])
    assert [t.get_text() for t in drawn.totals] == [f"{b:,.1f}" for b in bottoms]
    assert drawn.labels == ["full", "lora", "qlora"]
    # Capacity lines sit at each GPU's usable memory.
    assert set(drawn.capacity_lines) == set(caps)
    for name, line in drawn.capacity_lines.items():
        assert _values(line.get_ydata()) == pytest.approx([caps[name] / GiB] * 2)
    # The legend sits outside the axes, so it never covers a bar.
    assert drawn.legend is not None
    assert drawn.legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1
    assert _is_png(plot.save(fig, tmp_path / "bars.png"))


def test_tall_bars_are_clipped_but_keep_their_heights(caps: dict[str, int], tmp_path: Path) -> None:
    both = compare.compare(["llama-2-7b", "llama-65b"], ["full", "qlora"])
    fig = plot.new_figure()
    ax = fig.add_subplot()
    drawn = plot.breakdown_bars(ax, both, capacities=caps)
    largest = max(caps.values()) / GiB
    assert ax.get_ylim()[1] == pytest.approx(plot.CLIP_TOP * largest)
    full_65b = both.rows[2].result
    top = sum(seg.patches[2].get_height() for seg in drawn.segments.values())
    assert top == pytest.approx(full_65b.device_bytes / GiB)
    assert drawn.totals[2].get_text().endswith("↑")
    # Bars of one model stand together; group names under them.
    assert drawn.positions == [0.0, 1.0, 2.6, 3.6]
    texts = {t.get_text() for t in ax.texts}
    assert {"llama-2-7b", "llama-65b"} <= texts
    assert _is_png(plot.save(fig, tmp_path / "clipped.png"))


def _small_trace() -> Trace:
    layer = (
        Event(100, Category.ACTIVATIONS, Phase.FORWARD, 0, "act"),
        Event(50, Category.TEMPORARIES, Phase.FORWARD, 0, "tmp"),
        Event(-50, Category.TEMPORARIES, Phase.FORWARD, 0, "tmp"),
    )
    return Trace(
        "analytical",
        [
            Event(1000, Category.FROZEN_WEIGHTS, Phase.LOAD, 0, "w"),
            Repeat(layer, 3),
            Event(400, Category.LOGITS, Phase.LOSS, 0, "logits"),
            Event(-400, Category.LOGITS, Phase.LOSS, 0, "logits"),
            Event(-300, Category.ACTIVATIONS, Phase.BACKWARD, 0, "act"),
            Event(20, Category.OPTIMIZER_STATE, Phase.OPTIMIZER, 0, "adam"),
        ],
    )


def test_timeline_y_is_the_trace_total_after_each_event(tmp_path: Path) -> None:
    trace = _small_trace()
    fig = plot.new_figure()
    ax = fig.add_subplot()
    drawn = plot.timeline(ax, trace, capacities={"tiny": 2000})
    line = drawn.lines["analytical"]
    expected = [total / GiB for _, total in trace.timeline()]
    assert _values(line.get_ydata()) == pytest.approx(expected)
    assert [(s, p) for s, p, _ in drawn.segments] == [
        (0, Phase.LOAD),
        (0, Phase.FORWARD),
        (0, Phase.LOSS),
        (0, Phase.BACKWARD),
        (0, Phase.OPTIMIZER),
    ]
    # Phase k spans [k, k+1): nine forward events spread over [1, 2).
    xs = np.asarray(_values(line.get_xdata()))
    assert list(xs[:2]) == [0.0, 1.0]
    assert np.all(np.diff(xs) > 0)
    assert xs[-1] < len(drawn.segments)
    # A single trace is also drawn as areas by category, in the category colours; the top
    # of the stack at the peak is the peak.
    assert set(drawn.areas) == {
        "frozen_weights",
        "activations",
        "temporaries",
        "logits",
        "optimizer_state",
    }
    for key, area in drawn.areas.items():
        assert tuple(np.asarray(area.get_facecolor())[0]) == pytest.approx(
            to_rgba(plot.CATEGORY_COLORS[key])
        )
    highest = max(
        float(np.asarray(a.get_paths()[0].vertices)[:, 1].max()) for a in drawn.areas.values()
    )
    assert highest == pytest.approx(trace.peak().peak_bytes / GiB)
    assert _values(drawn.capacity_lines["tiny"].get_ydata()) == pytest.approx([2000 / GiB] * 2)
    assert _is_png(plot.save(fig, tmp_path / "timeline.png"))


def test_timeline_overlays_traces_phase_by_phase(tmp_path: Path) -> None:
    analytical = _small_trace()
    # A "measured" trace with fewer events per phase (sampled at boundaries).
    measured = Trace(
        "measured",
        [
            Event(1000, Category.FROZEN_WEIGHTS, Phase.LOAD),
            Event(310, Category.ACTIVATIONS, Phase.FORWARD),
            Event(-10, Category.ACTIVATIONS, Phase.BACKWARD),
        ],
    )
    fig = plot.new_figure()
    drawn = plot.timeline(fig.add_subplot(), {"analytical": analytical, "measured": measured})
    assert not drawn.areas  # several traces: lines only
    assert _values(drawn.lines["measured"].get_xdata()) == [0.0, 1.0, 3.0]
    assert _values(drawn.lines["measured"].get_ydata()) == pytest.approx(
        [1000 / GiB, 1310 / GiB, 1300 / GiB]
    )
    styles = {(ln.get_color(), ln.get_linestyle()) for ln in drawn.lines.values()}
    assert len(styles) == 2
    assert _is_png(plot.save(fig, tmp_path / "overlay.png"))


def test_timeline_of_one_step_keeps_earlier_memory() -> None:
    trace = predict(load_model("tiny-llama"), TrainingSetup(method="lora", device="cpu")).trace
    fig = plot.new_figure()
    drawn = plot.timeline(fig.add_subplot(), trace, step=1)
    expected = [total / GiB for event, total in trace.timeline() if event.step == 1]
    assert _values(drawn.lines["analytical"].get_ydata()) == pytest.approx(expected)
    assert {s for s, _, _ in drawn.segments} == {1}


def test_timeline_separates_micro_batches_of_one_step() -> None:
    setup = TrainingSetup(method="lora", device="cpu", grad_accum_steps=2)
    trace = predict(load_model("tiny-llama"), setup).trace
    fig = plot.new_figure()
    drawn = plot.timeline(fig.add_subplot(), trace, step=0)
    runs = [(p, n) for _, p, n in drawn.segments]
    assert (Phase.FORWARD, 0) in runs
    assert (Phase.FORWARD, 1) in runs
    assert runs.index((Phase.FORWARD, 1)) > runs.index((Phase.BACKWARD, 0))
    assert np.all(np.diff(np.asarray(_values(drawn.lines["analytical"].get_xdata()))) >= 0)


@pytest.fixture(scope="module")
def grid() -> compare.PeakGrid:
    setup = TrainingSetup(method="lora", grad_ckpt=True)
    return compare.peak_grid(
        "llama-2-7b", setup, batch_sizes=(1, 4, 16), seq_lens=(512, 2048, 8192), gpu="rtx-4090"
    )


def test_heatmap_cells_are_the_grid(grid: compare.PeakGrid, tmp_path: Path) -> None:
    fig = plot.new_figure()
    ax = fig.add_subplot()
    drawn = plot.peak_heatmap(ax, grid)
    data = drawn.image.get_array()
    assert data is not None
    assert np.asarray(data.data) == pytest.approx(np.array(grid.cell_bytes) / GiB)
    assert np.array_equal(np.ma.getmaskarray(np.ma.asarray(data)), ~np.array(grid.fits))
    assert drawn.cell_texts[1][2].get_text() == f"{grid.cell_bytes[1][2] / GiB:,.1f}"
    assert drawn.cell_texts[1][2].get_position() == (2, 1)
    # Both fit and miss occur, and the boundary runs exactly between them.
    assert any(map(any, grid.fits or ()))
    assert not all(map(all, grid.fits or ()))
    assert drawn.boundary is not None
    segments = [tuple(map(tuple, seg)) for seg in drawn.boundary.get_segments()]
    assert segments == plot.fit_boundary(grid.fits or ())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["512", "2,048", "8,192"]
    assert _is_png(plot.save(fig, tmp_path / "heatmap.png"))


def test_fit_boundary_edges() -> None:
    fits = [[True, True, False], [True, False, False]]
    assert plot.fit_boundary(fits) == [
        ((1.5, -0.5), (1.5, 0.5)),
        ((0.5, 0.5), (1.5, 0.5)),
        ((0.5, 0.5), (0.5, 1.5)),
    ]


def test_heatmap_hatches_cells_that_fit_only_by_paging() -> None:
    grid = compare.PeakGrid(
        model="m",
        batch_sizes=(1, 2),
        seq_lens=(512,),
        cell_bytes=((40 * GiB,), (50 * GiB,)),
        capacity_bytes=48 * GiB,
        gpu="48GiB",
        fits=((True,), (True,)),
        paging=((False,), (True,)),
    )
    drawn = plot.peak_heatmap(plot.new_figure().add_subplot(), grid)
    assert drawn.boundary is None
    assert [c.get_xy() for c in drawn.paged_cells] == [(-0.5, 0.5)]
    assert drawn.paged_cells[0].get_hatch() == plot.PAGED_HATCH


def _points() -> list[compare.ValidationPoint]:
    return [
        compare.ValidationPoint("a", 10 * GiB, 10 * GiB, "allocated"),
        compare.ValidationPoint("b", 21 * GiB, 20 * GiB, "allocated"),
        compare.ValidationPoint("c", 30 * GiB, 40 * GiB, "reserved"),
    ]


def test_scatter_points_and_band(tmp_path: Path) -> None:
    points = _points()
    fig = plot.new_figure()
    ax = fig.add_subplot()
    drawn = plot.prediction_scatter(ax, points, annotate=True)
    assert np.asarray(drawn.points["allocated"].get_offsets()).tolist() == [
        [10.0, 10.0],
        [20.0, 21.0],
    ]
    assert np.asarray(drawn.points["reserved"].get_offsets()).tolist() == [[40.0, 30.0]]
    ratios = [y / x for x, y in np.asarray(drawn.band.get_paths()[0].vertices).tolist() if x > 0]
    assert min(ratios) == pytest.approx(0.95)
    assert max(ratios) == pytest.approx(1.05)
    x_id, y_id = drawn.identity.get_data()
    assert _values(x_id) == pytest.approx(_values(y_id))
    assert [t.get_text() for t in drawn.labels] == ["a", "b", "c"]
    assert ax.get_xscale() == "linear"
    assert _is_png(plot.save(fig, tmp_path / "scatter.png"))


def test_scatter_by_source() -> None:
    points = [
        compare.ValidationPoint("a", 10 * GiB, 10 * GiB, "allocated", "peft README"),
        compare.ValidationPoint("b", 12 * GiB, 11 * GiB, "allocated", "litgpt"),
        compare.ValidationPoint("c", 9 * GiB, 8 * GiB, "nvidia-smi", "peft README"),
    ]
    drawn = plot.prediction_scatter(plot.new_figure().add_subplot(), points, by="source")
    assert list(drawn.points) == ["peft README", "litgpt"]
    offsets = np.asarray(drawn.points["peft README"].get_offsets()).tolist()
    assert offsets == [[10.0, 10.0], [8.0, 9.0]]
    assert drawn.legend is not None
    assert [t.get_text() for t in drawn.legend.get_texts()][-2:] == [
        "peft README (2)",
        "litgpt (1)",
    ]


def test_scatter_goes_logarithmic_over_wide_ranges() -> None:
    points = [
        compare.ValidationPoint("small", GiB // 10, GiB // 10),
        compare.ValidationPoint("big", 50 * GiB, 52 * GiB),
    ]
    ax = plot.new_figure().add_subplot()
    plot.prediction_scatter(ax, points, band_fraction=0.1)
    assert ax.get_xscale() == "log"
    assert ax.get_yscale() == "log"


def test_scatter_needs_points() -> None:
    with pytest.raises(ValueError, match="no validation points"):
        plot.prediction_scatter(plot.new_figure().add_subplot(), [])


def test_scaling_lines_follow_the_plans(
    methods: compare.Comparison, caps: dict[str, int], tmp_path: Path
) -> None:
    zero = compare.zero_stages(
        "llama-2-7b", TrainingSetup(method="full"), gpu_counts=(1, 4), stages=(0, 3)
    )
    fig = plot.new_figure()
    drawn = plot.scaling_lines(fig.add_subplot(), zero, capacities=caps)
    assert list(drawn.lines) == ["ZeRO-0", "ZeRO-3"]
    for stage, line in drawn.lines.items():
        rows = [r.result for r in zero.rows if r.group == stage]
        assert _values(line.get_xdata()) == [1.0, 4.0]
        assert _values(line.get_ydata()) == pytest.approx([r.device_bytes / GiB for r in rows])
    assert set(drawn.capacity_lines) == set(caps)
    assert _is_png(plot.save(fig, tmp_path / "zero.png"))
    by_size = plot.scaling_lines(
        plot.new_figure().add_subplot(), methods, x="params", series="label"
    )
    assert list(by_size.lines) == ["full", "lora", "qlora"]
    assert _values(by_size.lines["qlora"].get_xdata()) == [methods.rows[2].result.params / 1e9]


def test_figures_save(methods: compare.Comparison, grid: compare.PeakGrid, tmp_path: Path) -> None:
    result: PlanResult = plan("tiny-llama", TrainingSetup(method="lora"), gpu="1GiB")
    trace = predict(load_model("tiny-llama"), TrainingSetup(method="lora")).trace
    figures = {
        "plan.png": plot.plan_figure(result, trace),
        "plan_bar.png": plot.plan_figure(result),
        "breakdown.svg": plot.breakdown_figure(methods, capacities=compare.capacities()),
        "timeline.png": plot.timeline_figure({"a": trace, "b": trace}, step=0, title="t"),
        "heatmap.png": plot.heatmap_figure(grid, title="h"),
        "scatter.pdf": plot.scatter_figure(_points(), title="s"),
    }
    for name, fig in figures.items():
        path = plot.save(fig, tmp_path / "sub" / name)
        assert path.stat().st_size > 1000
        if name.endswith(".png"):
            assert _is_png(path)
    assert "fits" in figures["plan.png"].get_suptitle()


def test_heatmap_of_allocated_peaks_says_so() -> None:
    grid = compare.PeakGrid(
        model="m",
        batch_sizes=(1, 2),
        seq_lens=(512,),
        cell_bytes=((40 * GiB,), (50 * GiB,)),
        capacity_bytes=48 * GiB,
        gpu="48GiB",
        fits=((True,), (False,)),
        quantity="allocated",
    )
    drawn = plot.peak_heatmap(plot.new_figure().add_subplot(), grid)
    assert drawn.paged_cells == []
    assert drawn.colorbar is not None
    assert drawn.colorbar.ax.get_ylabel().startswith(plot.ALLOCATED_AXIS_LABEL)

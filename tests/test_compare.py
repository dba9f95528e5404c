"""memplan.compare: every row is exactly the plan() of its configuration; and the CLI's
``compare`` subcommand and ``plan --plot``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from memplan import compare
from memplan.errors import MemplanError
from memplan.plan import plan, resolve_gpu
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.specs.training import Optimizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _render(table: Any, width: int = 200) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_compare_plans_each_method_with_its_typical_setup() -> None:
    result = compare.compare("llama-2-7b", ["full", "lora", "qlora"], gpu="rtx-4090")
    assert [r.label for r in result.rows] == ["full", "lora", "qlora"]
    assert all(r.group == "" for r in result.rows)
    for row in result.rows:
        expected = plan("llama-2-7b", TrainingSetup(method=row.label), gpu="rtx-4090")
        assert row.result == expected
    full, lora, qlora = (r.result for r in result.rows)
    # The lecture's ordering, and its verdict on a 24 GB card.
    assert full.device_bytes > lora.device_bytes > qlora.device_bytes
    assert (full.fits, lora.fits, qlora.fits) == (False, True, True)
    assert result.gpu == "rtx-4090"
    assert result.gpu_capacity_bytes == resolve_gpu("rtx-4090").capacity_bytes


def test_compare_models_groups_by_model_and_shares_setup_fields() -> None:
    result = compare.compare(["tiny-llama", "llama-2-7b"], ["lora"], setup={"seq_len": 1024})
    assert [(r.group, r.label) for r in result.rows] == [
        ("tiny-llama", "lora"),
        ("llama-2-7b", "lora"),
    ]
    assert all(r.result.setup["seq_len"] == 1024 for r in result.rows)
    assert list(result.results()) == ["tiny-llama lora", "llama-2-7b lora"]
    assert result.gpu is None
    assert all(r.result.fits is None for r in result.rows)


def test_compare_needs_something_to_compare() -> None:
    with pytest.raises(MemplanError, match="nothing to compare"):
        compare.compare("tiny-llama", [])


def test_varied_revalidates_and_keeps_method_defaults() -> None:
    base = TrainingSetup(method="qlora")
    changed = compare.varied(base, lora_r=8, seq_len=2048)
    assert (changed.lora_r, changed.seq_len) == (8, 2048)
    assert changed.optimizer is Optimizer.PAGED_ADAMW  # still the method's default
    assert "lora_r" not in changed.defaults_from_method
    assert "optimizer" in changed.defaults_from_method
    with pytest.raises(ValueError, match="qlora needs quant"):
        compare.varied(base, quant="none")


def test_what_if_changes_one_field_at_a_time() -> None:
    base = TrainingSetup(method="lora")
    result = compare.what_if(
        "llama-2-7b", base, {"seq_len": [1024, 2048], "grad_ckpt": [True]}, gpu="rtx-4090"
    )
    assert [(r.group, r.label) for r in result.rows] == [
        ("baseline", "as given"),
        ("seq_len", "1024"),
        ("seq_len", "2048"),
        ("grad_ckpt", "True"),
    ]
    baseline, seq_1024, seq_2048, ckpt = (r.result for r in result.rows)
    assert seq_2048 == plan("llama-2-7b", compare.varied(base, seq_len=2048), gpu="rtx-4090")
    assert baseline.peak_bytes < seq_1024.peak_bytes < seq_2048.peak_bytes
    assert ckpt.peak_bytes < baseline.peak_bytes  # checkpointing never adds
    with pytest.raises(MemplanError, match="not a TrainingSetup field"):
        compare.what_if("tiny-llama", base, {"batch": [2]})


def test_zero_stages_are_plans_of_each_layout() -> None:
    setup = TrainingSetup(method="full")
    result = compare.zero_stages("llama-2-7b", setup, gpu_counts=(1, 4), stages=(0, 1, 3))
    assert [(r.group, r.label) for r in result.rows] == [
        ("ZeRO-0", "1 GPU"),
        ("ZeRO-0", "4 GPUs"),
        ("ZeRO-1", "1 GPU"),
        ("ZeRO-1", "4 GPUs"),
        ("ZeRO-3", "1 GPU"),
        ("ZeRO-3", "4 GPUs"),
    ]
    by_name = result.results()
    assert by_name["ZeRO-1 4 GPUs"] == plan(
        "llama-2-7b", setup, ParallelSetup(num_gpus=4, zero_stage=1)
    )
    # Plain data parallelism replicates everything (plus NCCL's communicator on each GPU);
    # sharding shrinks each GPU's share.
    replicated = by_name["ZeRO-0 4 GPUs"]
    assert by_name["ZeRO-0 1 GPU"].reserved_bytes == replicated.reserved_bytes
    assert replicated.device_bytes == (
        by_name["ZeRO-0 1 GPU"].device_bytes + replicated.communicator_bytes
    )
    assert (
        by_name["ZeRO-0 4 GPUs"].device_bytes
        > by_name["ZeRO-1 4 GPUs"].device_bytes
        > by_name["ZeRO-3 4 GPUs"].device_bytes
    )
    zero_state = by_name["ZeRO-0 4 GPUs"].breakdown_bytes["optimizer_state"]
    # Each GPU keeps a quarter of the optimizer state (shards padded per tensor).
    assert by_name["ZeRO-1 4 GPUs"].breakdown_bytes["optimizer_state"] == pytest.approx(
        zero_state / 4, rel=1e-4
    )


def test_capacities_and_gpu_labels() -> None:
    caps = compare.capacities()
    assert list(caps) == ["RTX 4090", "RTX A6000", "A100 80GB SXM4"]
    assert list(caps.values()) == [
        resolve_gpu(g).capacity_bytes for g in compare.DEFAULT_CAPACITY_GPUS
    ]
    assert compare.capacities(["24GiB"]) == {"24GiB": 24 * 2**30}
    assert compare.gpu_label("h100-80gb") == "H100 SXM5 80GB"


def test_peak_grid_cells_are_plans() -> None:
    setup = TrainingSetup(method="lora")
    grid = compare.peak_grid(
        "llama-2-7b", setup, batch_sizes=(1, 8), seq_lens=(256, 4096), gpu="rtx-4090"
    )
    assert (grid.batch_sizes, grid.seq_lens, grid.gpu) == ((1, 8), (256, 4096), "rtx-4090")
    corner = plan(
        "llama-2-7b", compare.varied(setup, micro_batch_size=8, seq_len=4096), gpu="rtx-4090"
    )
    assert grid.cell_bytes[1][1] == corner.device_bytes
    assert grid.fits is not None
    assert grid.fits[1][1] == corner.fits
    assert grid.fits[0][0]
    assert not grid.fits[1][1]
    # Memory grows along both axes.
    assert grid.cell_bytes[0][0] < grid.cell_bytes[0][1] < grid.cell_bytes[1][1]
    assert grid.cell_bytes[0][0] < grid.cell_bytes[1][0]
    no_gpu = compare.peak_grid("tiny-llama", setup, batch_sizes=(1,), seq_lens=(128,))
    assert no_gpu.fits is None
    assert no_gpu.capacity_bytes is None


def test_step_traces_analytical_is_the_prediction() -> None:
    traces = compare.step_traces("tiny-llama", TrainingSetup(method="lora"))
    assert list(traces) == ["analytical"]
    assert (
        traces["analytical"].peak().peak_bytes
        == plan("tiny-llama", TrainingSetup(method="lora")).peak_bytes
    )
    with pytest.raises(MemplanError, match="unknown trace source"):
        compare.step_traces("tiny-llama", TrainingSetup(), ["guessed"])


def test_step_traces_from_torch_agree_with_the_analytical_peak() -> None:
    pytest.importorskip("torch")
    if compare.SIMULATED not in compare.trace_sources():
        pytest.skip("memplan.torchsim is not importable")
    setup = TrainingSetup(method="lora", device="cpu", seq_len=64)
    traces = compare.step_traces("tiny-llama", setup, compare.trace_sources())
    assert list(traces) == ["analytical", "simulated", "measured-cpu"]
    peaks = {name: t.peak().peak_bytes for name, t in traces.items()}
    assert peaks["simulated"] == pytest.approx(peaks["measured-cpu"], rel=0.01)
    assert peaks["analytical"] == pytest.approx(peaks["measured-cpu"], rel=0.03)
    table = _render(compare.trace_table(traces))
    assert "measured-cpu" in table
    assert "peak" in table


def test_validation_points_read_committed_pairs(tmp_path: Path) -> None:
    assert compare.validation_points(tmp_path) == []
    (tmp_path / "results").mkdir()
    (tmp_path / "references" / "cases").mkdir(parents=True)
    run = {
        "device": "H100",
        "runs": [
            {
                "name": "llama-1b-lora",
                "metric": "allocated",
                "measured_bytes": 2_000,
                "predicted_bytes": 2_100,
            },
            {"name": "oom", "measured_bytes": 5_000},  # no prediction: skipped
        ],
    }
    (tmp_path / "results" / "h100-2026.json").write_text(json.dumps(run))
    rows = {
        "rows": [
            {
                "id": "case-1",
                "source": "peft README",
                "metric": "nvidia-smi",
                "measured_bytes": 1_000,
                "predicted_bytes": 900,
            }
        ]
    }
    (tmp_path / "references" / "report.json").write_text(json.dumps(rows))
    (tmp_path / "references" / "cases" / "case-1.json").write_text(json.dumps({"id": "case-1"}))
    points = compare.validation_points(tmp_path)
    assert points == [
        compare.ValidationPoint(
            "llama-1b-lora", 2_100, 2_000, "allocated", "results/h100-2026.json"
        ),
        compare.ValidationPoint("case-1", 900, 1_000, "nvidia-smi", "peft README"),
    ]
    assert [p.error_fraction for p in points] == pytest.approx([0.05, -0.1])
    summary = compare.error_summary(points)
    assert (summary.num_points, summary.within_band, summary.worst) == (2, 1, "case-1")
    assert summary.median_abs_error == pytest.approx(0.075)
    (tmp_path / "results" / "broken.json").write_text("{")
    with pytest.raises(MemplanError, match=r"broken\.json: malformed JSON"):
        compare.validation_points(tmp_path)


def test_validation_points_per_estimator(tmp_path: Path) -> None:
    (tmp_path / "references").mkdir()
    comparison = {
        "summary": {"all": {"cases": 2}},
        "rows": [
            {
                "id": "a",
                "source": "peft README",
                "metric": "allocated",
                "measured_bytes": 1_000,
                "memplan": {"bytes": 1_040, "how": "analytical"},
                "accelerate": {"bytes": 500, "how": "fp16 row"},
            },
            {
                "id": "b",
                "source": "litgpt",
                "metric": "nvidia-smi",
                "measured_bytes": 2_000,
                "memplan": {"bytes": 1_800},
                "accelerate": {"bytes": None},  # could not express the case
            },
        ],
    }
    (tmp_path / "references" / "estimators.json").write_text(json.dumps(comparison))
    memplan_points = compare.validation_points(tmp_path)
    assert [(p.label, p.predicted_bytes, p.measured_bytes) for p in memplan_points] == [
        ("a", 1_040, 1_000),
        ("b", 1_800, 2_000),
    ]
    assert [p.source for p in memplan_points] == ["peft README", "litgpt"]
    accelerate = compare.validation_points(tmp_path, estimator="accelerate")
    assert [(p.label, p.predicted_bytes) for p in accelerate] == [("a", 500)]
    assert compare.validation_points(tmp_path, estimator="llm-analysis") == []
    text = _render(
        compare.error_table({"memplan": memplan_points, "accelerate": accelerate, "x": []})
    )
    assert "memplan" in text
    assert "7.0%" in text  # median of 4% and 10%
    assert "50.0%" in text


def test_the_committed_estimator_comparison_is_read() -> None:
    from memplan.validate import REFERENCES_DIR

    assert (REFERENCES_DIR / "estimators.json").exists()
    points = compare.validation_points()
    assert len(points) >= 50
    assert all(p.measured_bytes > 0 for p in points)


def test_tables_show_every_configuration() -> None:
    result = compare.compare(["tiny-llama", "llama-2-7b"], ["full", "qlora"], gpu="rtx-4090")
    text = _render(compare.comparison_table(result))
    for name in ("tiny-llama", "llama-2-7b", "full", "qlora", "device total", "margin"):
        assert name in text
    full_7b = result.rows[2].result
    assert f"{full_7b.device_bytes / 2**30:,.1f}" in text
    verdicts = _render(compare.verdict_table(result))
    assert "llama-2-7b full" in verdicts
    assert "no" in verdicts
    assert "yes" in verdicts


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_compare_json(run_cli: Callable[..., Any]) -> None:
    run = run_cli(
        "compare",
        "llama-2-7b",
        "--methods",
        "lora,qlora",
        "--seq",
        "1024",
        "--gpu",
        "rtx-4090",
        "--json",
    )
    assert run.code == 0, run.err
    data = run.json()
    assert [r["label"] for r in data["rows"]] == ["lora", "qlora"]
    assert data["gpu"] == "rtx-4090"
    lora = data["rows"][0]["result"]
    expected = plan("llama-2-7b", TrainingSetup(method="lora", seq_len=1024), gpu="rtx-4090")
    assert lora["device_bytes"] == expected.device_bytes
    assert lora["setup"]["seq_len"] == 1024


def test_cli_compare_models_table_and_plot(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "methods.png"
    run = run_cli(
        "compare", "--models", "tiny-llama,llama-2-7b", "--methods", "full,lora", "--plot", str(out)
    )
    assert run.code == 0, run.err
    assert "tiny-llama" in run.out
    assert "device total" in run.out
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out}" in run.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "llama-2-7b", "--method", "lora"], "compare takes --methods"),
        (["compare", "--methods", "lora"], "name a model"),
        (["compare", "llama-2-7b", "--methods", ","], "--methods is empty"),
        (["compare", "llama-2-7b", "--methods", "full,magic"], "invalid --method"),
        (["compare", "no-such-model"], "no-such-model"),
        (["compare", "llama-2-7b", "--plot", "x.jpg"], "end the name in .png, .svg, .pdf"),
        (["plan", "llama-2-7b", "--plot", "picture"], "--plot"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    run_cli: Callable[..., Any], argv: list[str], message: str
) -> None:
    run = run_cli(*argv)
    assert run.code == 2
    assert message in run.err
    assert len(run.err.strip().splitlines()) == 1


def test_cli_plan_plot(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "breakdown.png"
    run = run_cli(
        "plan", "tiny-llama", "--method", "lora", "--gpu", "1GiB", "--json", "--plot", str(out)
    )
    assert run.code == 0, run.err
    assert run.json()["model"] == "tiny-llama"  # stdout stays one JSON object
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_grid_from_fit_keeps_the_table() -> None:
    from memplan.fit import fit

    result = fit("tiny-llama", TrainingSetup(method="lora", seq_len=256), gpu="1GiB", table=True)
    grid = compare.grid_from_fit(result)
    assert result.table is not None
    assert grid.quantity == "allocated"
    assert list(grid.batch_sizes) == result.table.batch_sizes
    assert list(grid.seq_lens) == result.table.seq_lens
    assert [list(row) for row in grid.cell_bytes] == [
        [c.peak_bytes for c in row] for row in result.table.rows
    ]
    assert grid.fits is not None
    assert any(map(any, grid.fits))
    assert grid.capacity_bytes == 2**30
    no_table = fit("tiny-llama", TrainingSetup(method="lora", seq_len=256), gpu="1GiB")
    with pytest.raises(MemplanError, match="no table"):
        compare.grid_from_fit(no_table)


def test_cli_fit_plot_draws_the_table_and_prints_as_before(
    run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    out = tmp_path / "fit.png"
    argv = ["fit", "tiny-llama", "--method", "lora", "--seq", "256", "--gpu", "1GiB", "--json"]
    plain = run_cli(*argv)
    with_plot = run_cli(*argv, "--plot", str(out))
    assert with_plot.code == 0, with_plot.err
    assert with_plot.json()["table"] is None  # --plot alone does not print the table
    assert with_plot.json()["batch"] == plain.json()["batch"]
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_a_method_that_cannot_run_is_an_na_column_not_a_failure(run_cli: Any) -> None:
    run = run_cli("compare", "llama-2-7b", "--methods", "lora,bitfit,qlora", "--gpu", "a100-80gb")
    assert run.code == 0, run.err
    assert "bitfit [1]" in run.out
    assert "[1] method=bitfit trains biases, and llama-2-7b has none" in run.out
    data = run_cli("compare", "llama-2-7b", "--methods", "lora,bitfit", "--json").json()
    assert [r["label"] for r in data["rows"]] == ["lora"]
    assert data["not_applicable"] == [
        {
            "label": "bitfit",
            "group": "",
            "reason": "method=bitfit trains biases, and llama-2-7b has none",
        }
    ]


def test_nothing_applicable_is_one_line(run_cli: Any) -> None:
    run = run_cli("compare", "llama-2-7b", "--methods", "bitfit")
    assert run.code == 2
    assert run.err.count("\n") == 1
    assert "nothing to compare: method=bitfit trains biases" in run.err

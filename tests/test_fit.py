"""fit: the largest micro-batch and sequence length agree with plan() at the boundary."""

from __future__ import annotations

import json

import pytest

from memplan.catalog import load_model
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.fit import (
    BATCH_SEARCH_LIMIT,
    SEQ_SEARCH_LIMIT_TOKENS,
    SEQ_STEP_TOKENS,
    FitResult,
    capacity,
    fit,
    last_true,
    seq_limit,
)
from memplan.plan import device_verdict, plan, resolve_gpu
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.units import GiB

Params = tuple[str, TrainingSetup, ParallelSetup, str]
Case = tuple[Params, FitResult]
# (model, setup, layout, device): methods, a paged optimizer (QLoRA), ZeRO, typed capacities.
CASES: list[Params] = [
    ("tiny-llama", TrainingSetup(method="lora", seq_len=256), ParallelSetup(), "1GiB"),
    ("llama-3.2-1b", TrainingSetup(method="full", seq_len=512), ParallelSetup(), "rtx-4090"),
    ("qwen2.5-0.5b", TrainingSetup(method="qlora", seq_len=512), ParallelSetup(), "4GiB"),
    (
        "llama-3.2-1b",
        TrainingSetup(method="full", precision="bf16", seq_len=512),
        ParallelSetup(num_gpus=4, zero_stage=3),
        "16GB",
    ),
]


def _fits(model: str, setup: TrainingSetup, parallel: ParallelSetup, gpu: str, **kw: int) -> bool:
    result = plan(model, setup.model_copy(update=kw), parallel, gpu=gpu)
    assert result.fits is not None
    return result.fits


@pytest.fixture(scope="module", params=CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    params: Params = request.param
    model, setup, parallel, gpu = params
    return params, fit(model, setup, parallel, gpu=gpu)


def test_largest_batch_fits_and_one_more_does_not(case: Case) -> None:
    (model, setup, parallel, gpu), result = case
    batch = result.batch.largest
    assert batch is not None
    assert batch >= 1
    assert _fits(model, setup, parallel, gpu, micro_batch_size=batch)
    assert not _fits(model, setup, parallel, gpu, micro_batch_size=batch + 1)
    assert result.batch.fitting is not None
    assert result.batch.fitting.micro_batch_size == batch
    assert result.batch.next is not None
    assert not result.batch.next.fits


def test_largest_seq_fits_and_one_step_more_does_not(case: Case) -> None:
    (model, setup, parallel, gpu), result = case
    seq = result.seq.largest
    assert seq is not None
    assert seq % SEQ_STEP_TOKENS == 0
    assert _fits(model, setup, parallel, gpu, seq_len=seq)
    assert not _fits(model, setup, parallel, gpu, seq_len=seq + SEQ_STEP_TOKENS)


def test_reported_points_are_plan_results(case: Case) -> None:
    (model, setup, parallel, gpu), result = case
    direct = plan(model, setup, parallel, gpu=gpu)
    assert result.given.device_bytes == direct.device_bytes
    assert result.given.peak_bytes == direct.peak_bytes
    assert result.given.fits == direct.fits
    assert result.given.margin_bytes == direct.margin_bytes


def test_paged_state_is_its_own_verdict_and_search() -> None:
    # QLoRA's paged AdamW state is in device_bytes; on a device half a paged state short at seq
    # 1024, seq 1024 fits only by paging: plan() says so, and fit reports the largest sequence
    # with and without paging.
    model, setup = "qwen2.5-0.5b", TrainingSetup(method="qlora", seq_len=512)
    at_1024 = plan(model, setup.model_copy(update={"seq_len": 1024}))
    assert at_1024.paged_bytes > 0
    gpu = f"{at_1024.device_bytes - at_1024.paged_bytes // 2}B"
    judged = plan(model, setup.model_copy(update={"seq_len": 1024}), gpu=gpu)
    assert not judged.fits
    assert judged.verdict == "fits only by paging"
    assert judged.margin_bytes is not None
    assert judged.paged_out_bytes == -judged.margin_bytes > 0
    result = fit(model, setup, gpu=gpu)
    assert result.seq_paging is not None
    without, paging = result.seq.largest, result.seq_paging.largest
    assert without is not None
    assert paging is not None
    assert without < 1024 <= paging
    assert _fits(model, setup, ParallelSetup(), gpu, seq_len=without)
    assert not _fits(model, setup, ParallelSetup(), gpu, seq_len=without + SEQ_STEP_TOKENS)
    at_paging = plan(model, setup.model_copy(update={"seq_len": paging}), gpu=gpu)
    assert at_paging.verdict == "fits only by paging"
    beyond = plan(model, setup.model_copy(update={"seq_len": paging + SEQ_STEP_TOKENS}), gpu=gpu)
    assert beyond.verdict == "does not fit"


def test_learned_positions_cap_the_sequence_search() -> None:
    assert seq_limit(load_model("gpt2"))[0] == 1024
    assert seq_limit(load_model("llama-2-7b"))[0] == SEQ_SEARCH_LIMIT_TOKENS
    result = fit("gpt2", TrainingSetup(method="lora"), gpu="24GiB")
    assert result.seq.largest == 1024
    assert result.seq.at_limit
    assert result.seq.next is None
    assert _fits("gpt2", TrainingSetup(method="lora"), ParallelSetup(), "24GiB", seq_len=1024)


def test_table_agrees_with_plan_in_every_cell() -> None:
    setup = TrainingSetup(method="lora", seq_len=256)
    result = fit("tiny-llama", setup, gpu="1GiB", table=True)
    table = result.table
    assert table is not None
    assert table.batch_sizes[0] == 1
    assert table.seq_lens[0] == 256
    for batch, row in zip(table.batch_sizes, table.rows, strict=True):
        for seq, cell in zip(table.seq_lens, row, strict=True):
            assert (cell.micro_batch_size, cell.seq_len) == (batch, seq)
            direct = plan(
                "tiny-llama",
                setup.model_copy(update={"micro_batch_size": batch, "seq_len": seq}),
                gpu="1GiB",
            )
            assert cell.fits == direct.fits, (batch, seq, cell.basis)
            assert cell.peak_bytes == direct.peak_bytes
    # The last row is the first power of two where nothing fits; each row's boundary was planned.
    assert not any(c.fits for c in table.rows[-1])
    assert any(c.basis == "plan" for c in table.rows[0])


def test_nothing_fits_is_reported_not_raised() -> None:
    result = fit("llama-2-7b", TrainingSetup(method="full"), gpu="rtx-4090")
    assert result.batch.largest is None
    assert result.seq.largest is None
    assert result.batch.fitting is None
    assert result.batch.next is not None
    assert result.smallest is not None
    assert not result.smallest.fits
    assert (result.smallest.micro_batch_size, result.smallest.seq_len) == (1, SEQ_STEP_TOKENS)
    assert (
        result.smallest.device_bytes
        == plan(
            "llama-2-7b", TrainingSetup(method="full", seq_len=SEQ_STEP_TOKENS), gpu="rtx-4090"
        ).device_bytes
    )


def test_device_verdict_is_plans_rule() -> None:
    for model, setup, gpu in [
        ("qwen2.5-0.5b", TrainingSetup(method="qlora"), "2GiB"),
        ("qwen2.5-0.5b", TrainingSetup(method="qlora"), "2500MiB"),
        ("tiny-llama", TrainingSetup(method="full"), "600MiB"),
    ]:
        target = resolve_gpu(gpu)
        result = plan(model, setup, gpu=target)
        assert device_verdict(result.reserved_bytes, result.paged_bytes, target) == (
            result.device_bytes,
            result.fits,
        )


def test_unified_memory_capacity_is_plans_and_says_the_share() -> None:
    target = resolve_gpu("m2-ultra-192gb")
    cap = capacity(target)
    assert cap.kind == "unified-memory"
    assert cap.gpu_share_fraction == 0.75
    assert cap.capacity_bytes == target.capacity_bytes
    assert capacity(resolve_gpu("48GB")).kind == "capacity"


def test_last_true_finds_the_edge_of_a_monotone_test() -> None:
    for edge in (0, 1, 2, 3, 7, 8, 100, 1000):
        calls: list[int] = []

        def test(k: int, edge: int = edge, calls: list[int] = calls) -> bool:
            calls.append(k)
            return k <= edge

        assert last_true(test, 1, 1000) == edge
        assert len(calls) <= 2 * 10 + 2  # doubling then bisection: logarithmic
    assert last_true(lambda k: True, 1, BATCH_SEARCH_LIMIT) == BATCH_SEARCH_LIMIT
    assert last_true(lambda k: True, 5, 4) == 4


def test_unknown_gpu_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MemplanError, match="unknown hardware 'rtx-9090'"):
        fit("tiny-llama", gpu="rtx-9090")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "tiny-llama", "--gpu", "rtx-9090"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown hardware 'rtx-9090'" in err


def test_cli_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "tiny-llama", "--method", "lora", "--seq", "256", "--gpu", "1GiB"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    result = fit("tiny-llama", TrainingSetup(method="lora", seq_len=256), gpu="1GiB")
    assert data["batch"]["largest"] == result.batch.largest
    assert data["seq"]["largest"] == result.seq.largest
    assert data["gpu"]["capacity_bytes"] == GiB
    assert main([*args, "--table"]) == 0
    out = capsys.readouterr().out
    assert f"largest micro-batch at seq 256: {result.batch.largest} " in out
    assert f"largest sequence length at micro-batch 1: {result.seq.largest} " in out
    assert "Allocated peak GiB by micro-batch" in out


def test_cli_says_when_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "tiny-llama", "--gpu", "100MiB"]) == 0
    out = capsys.readouterr().out
    assert "Nothing fits on 100MiB: even micro-batch 1 x 128 tokens needs" in out


def test_cli_reports_the_gpu_share_of_unified_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "tiny-llama", "--gpu", "m3-max-128gb"]) == 0
    assert "the GPU may use 75% (gpu_share_fraction)" in capsys.readouterr().out

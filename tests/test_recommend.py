"""recommend: fewest devices per accelerator, rankings, estimates, and changes that fit."""

from __future__ import annotations

import json
from functools import cache

import pytest

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.cli import main
from memplan.hardware import list_profiles, load_profile
from memplan.plan import PlanResult, device_verdict, plan, resolve_gpu
from memplan.recommend import (
    DEVICE_COUNTS,
    LAYOUTS,
    Change,
    RecommendResult,
    changes,
    layouts,
    recommend,
)
from memplan.specs import ModelSpec, Offload, ParallelSetup, TrainingSetup
from memplan.throughput import flops_per_token, training_estimate

MODEL = "llama-3.2-1b"
SETUP = TrainingSetup(method="full", seq_len=2048, grad_ckpt=True)


@pytest.fixture(scope="module")
def result() -> RecommendResult:
    return recommend(MODEL, SETUP, tokens=20_000_000)


@cache
def _plan(parallel: ParallelSetup) -> PlanResult:
    return plan(MODEL, SETUP, parallel)


@cache
def _peak(parallel: ParallelSetup) -> tuple[int, int]:
    prediction = predict(load_model(MODEL), SETUP, parallel)
    return prediction.trace.peak().peak_bytes, prediction.paged_bytes


def _fits(parallel: ParallelSetup, gpu: str) -> bool:
    """plan()'s verdict; skipped (False) where the allocated peak alone exceeds the capacity,
    since plan() reserves at least the allocated peak."""
    target = resolve_gpu(gpu)
    if not device_verdict(*_peak(parallel), target)[1]:
        return False
    result = _plan(parallel)
    return device_verdict(result.reserved_bytes, result.paged_bytes, target)[1]


def test_every_profile_is_listed_once(result: RecommendResult) -> None:
    names = [r.gpu for r in result.by_usd_per_hour]
    assert sorted(names) == sorted(p.name for p in list_profiles())
    assert result.device_counts == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _fewest(gpu: str, *, offload: bool) -> tuple[int, list[int]] | None:
    """Fewest devices that fit by plan(), and the traffic ranks of the layouts that do."""
    apple = load_profile(gpu).kind == "unified-memory"
    for count in DEVICE_COUNTS[:1] if apple else DEVICE_COUNTS:
        ranks = [
            layout.traffic_rank
            for layout, parallel in layouts(count)
            if ((offload and not apple) or layout.offload is Offload.NONE) and _fits(parallel, gpu)
        ]
        if ranks:
            return count, ranks
    return None


def test_fewest_devices_agree_with_plan(result: RecommendResult) -> None:
    for row in result.by_usd_per_hour:
        expected = _fewest(row.gpu, offload=True)
        if expected is None:
            assert row.fewest is None
            continue
        assert row.fewest is not None
        assert row.fewest.num_devices == expected[0], row.gpu
        # Among the layouts that fit on that many devices, the least traffic wins.
        chosen = next(lay for lay in LAYOUTS if lay.label == row.fewest.layout)
        assert chosen.traffic_rank == min(expected[1])
        if row.fewest.parallel["offload"] == "none":
            assert row.without_offload is None
            continue
        alternative = _fewest(row.gpu, offload=False)
        if alternative is None:
            assert row.without_offload is None
            continue
        assert row.without_offload is not None
        assert row.without_offload.parallel["offload"] == "none"
        assert row.without_offload.num_devices == alternative[0]


def test_fewest_without_offload_uses_several_devices(result: RecommendResult) -> None:
    counts = {r.without_offload.num_devices for r in result.by_usd_per_hour if r.without_offload}
    assert max(counts) > 1


def test_picks_fit_by_plan_on_the_device(result: RecommendResult) -> None:
    for row in result.by_usd_per_hour[:4]:
        pick = row.fewest
        assert pick is not None
        direct = plan(MODEL, SETUP, ParallelSetup.model_validate(pick.parallel), gpu=row.gpu)
        assert direct.fits
        assert direct.device_bytes == pick.device_bytes
        assert direct.cpu_bytes == pick.host_bytes
        assert pick.confirmed


def test_memory_depends_only_on_count_and_layout(result: RecommendResult) -> None:
    by_layout: dict[str, set[int]] = {}
    for row in result.by_usd_per_hour:
        if row.fewest is not None:
            key = json.dumps(row.fewest.parallel, sort_keys=True)
            by_layout.setdefault(key, set()).add(row.fewest.device_bytes)
    assert len(by_layout) > 1
    assert all(len(values) == 1 for values in by_layout.values())


def test_ranked_by_dollars_per_hour_then_unpriced_then_not_fitting(result: RecommendResult) -> None:
    rows = result.by_usd_per_hour
    fitting = [r.fewest for r in rows if r.fewest is not None]
    priced = [p.usd_per_hour for p in fitting if p.usd_per_hour is not None]
    assert priced == sorted(priced)
    assert len(priced) >= 5
    states = [(r.fewest is None, r.fewest is None or r.fewest.usd_per_hour is None) for r in rows]
    assert states == sorted(states)  # priced, then unpriced, then nothing fits
    for row in rows:
        pick, profile = row.fewest, load_profile(row.gpu)
        if pick is not None and pick.usd_per_hour is not None:
            assert profile.cheapest_usd_per_gpu_hour is not None
            assert pick.usd_per_hour == pick.num_devices * profile.cheapest_usd_per_gpu_hour


def test_ranked_by_purchase_price(result: RecommendResult) -> None:
    rows = {r.gpu: r for r in result.by_usd_per_hour}
    totals = []
    for name in result.by_purchase_usd:
        pick, profile = rows[name].fewest, load_profile(name)
        assert pick is not None
        assert profile.purchase_price_usd is not None
        assert pick.purchase_usd == pick.num_devices * profile.purchase_price_usd
        totals.append(pick.purchase_usd)
    assert totals == sorted(totals)
    assert len(totals) >= 2
    unranked = [r for r in rows.values() if r.fewest and r.fewest.purchase_usd is not None]
    assert len(unranked) == len(totals)


def test_estimates_use_the_picks_device_count(result: RecommendResult) -> None:
    trainable = _plan(ParallelSetup()).trainable_params
    flops = flops_per_token(_spec(), SETUP, trainable)
    assert result.flops_per_token == flops.total
    for row in result.by_usd_per_hour:
        pick = row.fewest
        if pick is None:
            continue
        profile = load_profile(row.gpu)
        if profile.kind == "unified-memory":
            assert pick.estimate is None  # Apple publishes no matrix TFLOPS
            continue
        if not profile.supports_bf16:
            assert row.dtype == "fp16"
        expected = training_estimate(flops, 20_000_000, profile, pick.num_devices, row.dtype or "")
        assert pick.estimate == expected
        assert pick.estimate_is_lower_bound == (pick.parallel["offload"] != "none")


def _spec() -> ModelSpec:
    return load_model(MODEL)


def test_apple_silicon_is_one_device_without_offload(result: RecommendResult) -> None:
    for row in result.by_usd_per_hour:
        if load_profile(row.gpu).kind == "unified-memory" and row.fewest is not None:
            assert row.fewest.num_devices == 1
            assert row.fewest.parallel["offload"] == "none"


def test_search_without_confirmation_runs_one_replay() -> None:
    quick = recommend(MODEL, SETUP, confirm=False)
    assert quick.plan_calls == 1
    assert all(r.fewest is None or not r.fewest.confirmed for r in quick.by_usd_per_hour)


def _assert_changes_hold(model: str, changes_: list[Change], gpu: str) -> None:
    saved = [c.saved_bytes for c in changes_]
    assert saved == sorted(saved, reverse=True)
    for change in changes_:
        setup = TrainingSetup.model_validate(change.setup)
        parallel = ParallelSetup.model_validate(change.parallel)
        applied = plan(model, setup, parallel, gpu=gpu)
        assert applied.fits == change.fits, change.change
        assert applied.device_bytes == change.device_bytes
        assert change.required_bytes == applied.device_bytes - applied.paged_bytes


@pytest.mark.parametrize(
    ("model", "setup", "parallel", "gpu", "expected"),
    [
        (
            "llama-3.2-1b",
            TrainingSetup(method="full", seq_len=2048),
            ParallelSetup(),
            "rtx-3060-12gb",
            {"activation checkpointing", "8-bit optimizer (adamw-8bit)"},
        ),
        (
            "llama-3.2-1b",
            TrainingSetup(method="lora", micro_batch_size=8, seq_len=1024),
            ParallelSetup(),
            "8GiB",
            {"activation checkpointing"},
        ),
        (
            "llama-3.2-1b",
            TrainingSetup(method="full", precision="bf16", seq_len=512),
            ParallelSetup(num_gpus=4),
            "10GiB",
            {"ZeRO-1 across the 4 devices", "ZeRO-3 across the 4 devices"},
        ),
    ],
)
def test_every_listed_change_holds_when_applied(
    model: str, setup: TrainingSetup, parallel: ParallelSetup, gpu: str, expected: set[str]
) -> None:
    result = recommend(model, setup, gpu=gpu, parallel=parallel, confirm=False)
    assert result.gpu_plan is not None
    assert not result.gpu_plan["fits"]
    names = {c.change for c in result.changes}
    assert expected <= names, names
    if setup.micro_batch_size > 1:
        assert any(name.startswith("micro-batch ") for name in names)
    assert any(c.fits for c in result.changes)
    _assert_changes_hold(model, result.changes, gpu)


def test_lora_to_qlora_keeps_the_adapters() -> None:
    setup = TrainingSetup(method="lora", seq_len=512)
    before = plan("llama-3.2-3b", setup, gpu="6GiB")
    found = changes(load_model("llama-3.2-3b"), setup, ParallelSetup(), resolve_gpu("6GiB"), before)
    qlora = next(c for c in found if c.change.startswith("QLoRA"))
    assert qlora.setup["quant"] == "nf4"
    assert qlora.setup["lora_r"] == 8  # the same adapters, only the base is quantized
    assert qlora.setup["optimizer"] == "adamw"
    assert qlora.setup["grad_ckpt"] is False
    assert qlora.fits
    _assert_changes_hold("llama-3.2-3b", found, "6GiB")


def test_scale_out_is_offered_from_the_ranking(result: RecommendResult) -> None:
    row = next(
        r for r in result.by_usd_per_hour if r.without_offload and r.without_offload.num_devices > 1
    )
    pick = row.without_offload
    assert pick is not None
    before = plan(MODEL, SETUP, gpu=row.gpu)
    assert not before.fits  # one device without offload is too small
    found = changes(
        load_model(MODEL), SETUP, ParallelSetup(), resolve_gpu(row.gpu), before, scale_out=(pick,)
    )
    scale = [c for c in found if c.change == f"{pick.num_devices} devices, {pick.layout}"]
    assert len(scale) == 1
    assert scale[0].fits
    assert scale[0].device_bytes == pick.device_bytes
    _assert_changes_hold(MODEL, found, row.gpu)


def test_a_run_that_fits_lists_no_changes() -> None:
    result = recommend("tiny-llama", TrainingSetup(method="lora"), gpu="rtx-4090", confirm=False)
    assert result.gpu_plan is not None
    assert result.gpu_plan["fits"]
    assert result.changes == []


def test_cli_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["recommend", "tiny-llama", "--method", "lora", "--tokens", "1M"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == 1_000_000
    assert len(data["by_usd_per_hour"]) == len(list_profiles())
    first = data["by_usd_per_hour"][0]
    assert first["fewest"]["num_devices"] == 1
    assert first["fewest"]["estimate"]["tokens"] == 1_000_000
    assert main([*args, "--gpu", "100MiB"]) == 0
    out = capsys.readouterr().out
    assert "Fewest devices (n) that fit, ranked by cloud $/hour" in out
    assert f"{first['gpu']} " in out
    assert "Time and cost are estimates" in out
    assert "On 100MiB: DOES NOT FIT with the given layout" in out


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["recommend", "tiny-llama", "--tokens", "5Q"],
        ["recommend", "tiny-llama", "--gpu", "rtx-9090"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("memplan: error: ")
        assert err.count("\n") == 1

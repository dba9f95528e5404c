"""recommend: every accelerator's layouts on the fewest devices that hold them, ranked by the
job's estimated cost or time; software and machines each accelerator has; changes that fit."""

from __future__ import annotations

import json
from functools import cache

import pytest

from memplan.catalog import load_model
from memplan.cli import main
from memplan.hardware import list_profiles, load_profile
from memplan.plan import PlanResult, device_verdict, plan, resolve_gpu
from memplan.recommend import (
    DEVICE_COUNTS,
    LAYOUTS,
    TOP_ROWS,
    Change,
    Recommendation,
    RecommendResult,
    changes,
    parallel_of,
    recommend,
)
from memplan.specs import Offload, ParallelSetup, TrainingSetup
from memplan.support import layout_needs, machine_fits, missing, setup_needs

MODEL = "llama-3.2-1b"
SETUP = TrainingSetup(method="full", seq_len=2048, grad_ckpt=True)
TOKENS = 20_000_000


@pytest.fixture(scope="module")
def result() -> RecommendResult:
    return recommend(MODEL, SETUP, tokens=TOKENS)


@cache
def _plan(parallel: ParallelSetup) -> PlanResult:
    return plan(MODEL, SETUP, parallel)


def _holds(parallel: ParallelSetup, gpu: str) -> bool:
    """plan()'s verdict on ``gpu``, and the profile's machines (devices joined, host memory)."""
    result = _plan(parallel)
    if not device_verdict(result.reserved_bytes, result.paged_bytes, resolve_gpu(gpu))[1]:
        return False
    return machine_fits(load_profile(gpu), parallel, result.cpu_bytes)


def _row(result: RecommendResult, gpu: str) -> Recommendation:
    return next(r for r in result.rows if r.gpu == gpu)


def test_every_profile_is_listed_once_and_ranked_rows_come_first(result: RecommendResult) -> None:
    names = [r.gpu for r in result.rows]
    assert sorted(names) == sorted(p.name for p in list_profiles())
    ranks = [r.rank for r in result.rows if r.rank is not None]
    assert ranks == list(range(1, len(ranks) + 1))
    assert all(r.pick is not None for r in result.rows[: len(ranks)])
    assert all(r.pick is None and r.rank is None for r in result.rows[len(ranks) :])
    assert result.device_counts == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize("gpu", ["h100-sxm", "l4", "t4", "a10", "tpu-v5e", "rtx-4090"])
def test_each_option_is_its_layout_on_the_fewest_devices_that_hold_it(
    result: RecommendResult, gpu: str
) -> None:
    row = _row(result, gpu)
    profile = load_profile(gpu)
    by_layout = {o.layout: o for o in row.options}
    for layout in LAYOUTS:
        if layout_needs(parallel_of(layout, 2)) and not all(
            profile.supports(f) for f in layout_needs(parallel_of(layout, 2))
        ):
            assert layout.label not in by_layout  # software the accelerator lacks
            continue
        counts = [c for c in DEVICE_COUNTS if c > 1 or layout.single_device]
        counts = [c for c in counts if profile.node.spans(c)]
        fewest = next((c for c in counts if _holds(parallel_of(layout, c), gpu)), None)
        option = by_layout.get(layout.label)
        assert (option.num_devices if option else None) == fewest, layout.label


def test_options_fit_by_plan_and_in_host_memory(result: RecommendResult) -> None:
    for row in result.rows[:6]:
        for option in row.options:
            parallel = ParallelSetup.model_validate(option.parallel)
            direct = plan(MODEL, SETUP, parallel, gpu=row.gpu)
            assert direct.fits
            assert direct.device_bytes == option.device_bytes
            assert direct.cpu_bytes == option.host_bytes
            assert option.confirmed
            node = load_profile(row.gpu).node
            assert option.node_host_bytes == option.host_bytes * node.devices_per_node(
                option.num_devices
            )
            if parallel.offload is not Offload.NONE:
                assert node.host_memory_bytes is not None
                assert option.node_host_bytes <= node.host_memory_bytes


def test_pick_is_the_option_with_the_fewest_device_hours_per_token(result: RecommendResult) -> None:
    for row in result.rows:
        if row.pick is None or row.pick.estimate is None:
            continue
        assert row.pick == row.options[0]
        cost = [o.num_devices / o.estimate.tokens_per_second for o in row.options if o.estimate]
        assert cost == sorted(cost)


def test_ranked_by_estimated_job_cost(result: RecommendResult) -> None:
    assert result.rank_by == "cost"
    assert "estimated job cost" in result.order
    priced = [r.pick.estimate for r in result.rows if r.pick and r.pick.estimate]
    priced = [e for e in priced if e.cost_usd is not None]
    assert len(priced) >= 5
    costs = [e.cost_usd for e in priced]
    assert costs == sorted(costs)
    for est in priced:
        assert est.tokens == TOKENS
        assert est.hours is not None
        assert est.usd_per_hour is not None
        assert est.hours == pytest.approx(TOKENS / est.tokens_per_second / 3600)
        assert est.cost_usd == pytest.approx(est.hours * est.usd_per_hour)
    # Priced rows, then unpriced with an estimate (fastest first), then no estimate at all.
    kinds = []
    for row in result.rows:
        if row.pick is None:
            continue
        est = row.pick.estimate
        kinds.append(0 if est and est.cost_usd is not None else 1 if est else 2)
    assert kinds == sorted(kinds)


def test_ranked_by_time() -> None:
    fast = recommend(MODEL, SETUP, tokens=TOKENS, rank="time", confirm=False)
    assert "time" in fast.order
    speeds = [r.pick.estimate.tokens_per_second for r in fast.rows if r.pick and r.pick.estimate]
    assert speeds == sorted(speeds, reverse=True)
    for row in fast.rows:
        per_token = [1 / o.estimate.tokens_per_second for o in row.options if o.estimate]
        assert per_token == sorted(per_token)


def test_without_tokens_the_order_is_dollars_per_million_tokens() -> None:
    quick = recommend(MODEL, SETUP, confirm=False)
    assert "$ per million tokens" in quick.order
    per_million = [
        r.pick.estimate.usd_per_million_tokens
        for r in quick.rows
        if r.pick and r.pick.estimate and r.pick.estimate.usd_per_million_tokens is not None
    ]
    assert per_million == sorted(per_million)
    assert all(r.pick.estimate.hours is None for r in quick.rows if r.pick and r.pick.estimate)


def test_only_layouts_the_software_runs(result: RecommendResult) -> None:
    for row in result.rows:
        profile = load_profile(row.gpu)
        for option in row.options:
            parallel = ParallelSetup.model_validate(option.parallel)
            assert all(profile.supports(f) for f in layout_needs(parallel)), (row.gpu, option)
    tpu = _row(result, "tpu-v5p")
    assert {o.layout for o in tpu.options} <= {"DDP", "FSDP-grad", "FSDP-full"}
    for name in ("m2-ultra-192gb", "m3-max-128gb", "m4-max-128gb"):  # one Mac, no ZeRO
        for option in _row(result, name).options:
            assert option.num_devices == 1
            assert option.parallel["offload"] == "none"


def test_setups_needing_bitsandbytes_are_not_offered_where_it_does_not_run() -> None:
    qlora = recommend("llama-3.2-1b", TrainingSetup(method="qlora"), confirm=False)
    for name in ("tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "gaudi2", "gaudi3"):
        row = _row(qlora, name)
        assert "bitsandbytes-4bit" in row.unsupported
        assert "README" in row.unsupported["bitsandbytes-4bit"]  # the source
        assert (row.pick, row.options, row.rank) == (None, [], None)
    # QLoRA's default optimizer is paged AdamW: Apple silicon has 4-bit but no bnb optimizers.
    apple = _row(qlora, "m4-max-128gb")
    assert set(apple.unsupported) == {"bitsandbytes-optimizers", "bitsandbytes-paged"}
    for name in ("mi300x", "mi210", "h100-sxm", "t4"):  # bitsandbytes runs on ROCm and CUDA
        assert not _row(qlora, name).unsupported
    assert qlora.rows[-1].unsupported  # not supported: last


def test_host_memory_of_a_node_bounds_offload() -> None:
    a6000 = load_profile("rtx-a6000")  # Lambda 4x A6000: 400 GiB host memory
    parallel = ParallelSetup(num_gpus=4, zero_stage=3, offload="optimizer")
    assert machine_fits(a6000, parallel, 100 * 2**30)
    assert not machine_fits(a6000, parallel, 100 * 2**30 + 1)
    one = ParallelSetup(num_gpus=1, zero_stage=2, offload="optimizer")
    assert not machine_fits(load_profile("rtx-4090"), one, 1)  # host memory unpublished
    assert not machine_fits(a6000, ParallelSetup(num_gpus=8), 0)  # no network between nodes


def test_search_without_confirmation_runs_one_replay() -> None:
    quick = recommend(MODEL, SETUP, confirm=False)
    assert quick.plan_calls == 1
    assert all(not o.confirmed for r in quick.rows for o in r.options)


def test_no_fit_rows_report_the_smallest_need_and_host_memory(result: RecommendResult) -> None:
    for row in result.rows:
        if row.pick is None and not row.unsupported:
            assert row.floor_bytes is not None
            assert row.floor_bytes > 0
    # 16 GB cards: one card per machine; offload would fit the device, but no host memory is
    # published for those machines.
    card = _row(result, "rtx-4080")
    assert card.pick is None
    assert card.host_limited
    offload = ParallelSetup(zero_stage=2, offload="optimizer")
    assert device_verdict(_plan(offload).reserved_bytes, 0, resolve_gpu("rtx-4080"))[1]


def _assert_changes_hold(model: str, changes_: list[Change], gpu: str) -> None:
    saved = [c.saved_bytes for c in changes_]
    assert saved == sorted(saved, reverse=True)
    for change in changes_:
        setup = TrainingSetup.model_validate(change.setup)
        parallel = ParallelSetup.model_validate(change.parallel)
        applied = plan(model, setup, parallel, gpu=gpu)
        target = resolve_gpu(gpu)
        if target.profile is not None:  # the profile's machines must hold it too
            profile = load_profile(target.profile)
            assert not missing(profile, setup_needs(setup) + layout_needs(parallel))
            holds = machine_fits(profile, parallel, applied.cpu_bytes)
            assert bool(change.machine) == (not holds), change.change
        assert change.fits == (applied.fits and not change.machine), change.change
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
        r
        for r in result.rows
        if any(o.num_devices > 1 and o.parallel["offload"] == "none" for o in r.options)
        and not _holds(ParallelSetup(), r.gpu)
    )
    option = next(o for o in row.options if o.num_devices > 1 and o.parallel["offload"] == "none")
    before = plan(MODEL, SETUP, gpu=row.gpu)
    assert not before.fits  # one device without offload is too small
    found = changes(
        load_model(MODEL), SETUP, ParallelSetup(), resolve_gpu(row.gpu), before, scale_out=(option,)
    )
    scale = [c for c in found if c.change == f"{option.num_devices} devices, {option.layout}"]
    assert len(scale) == 1
    assert scale[0].fits
    assert scale[0].device_bytes == option.device_bytes
    _assert_changes_hold(MODEL, found, row.gpu)


def test_changes_need_software_and_machines_the_device_has() -> None:
    setup = TrainingSetup(method="full", seq_len=512)
    tpu = resolve_gpu("tpu-v5e")  # 16 GiB: a 3B full fine-tune does not fit
    before = plan("llama-3.2-3b", setup, gpu="tpu-v5e")
    assert not before.fits
    found = changes(load_model("llama-3.2-3b"), setup, ParallelSetup(), tpu, before)
    names = " ".join(c.change for c in found)
    assert "QLoRA" not in names  # no bitsandbytes on TPUs
    assert "8-bit optimizer" not in names
    assert "DeepSpeed" not in names  # no DeepSpeed on TPUs
    assert "LoRA r=8" in names
    card = resolve_gpu("rtx-4090")  # host memory per machine unpublished: offload cannot be judged
    before = plan("llama-3.1-8b", setup, gpu="rtx-4090")
    found = changes(load_model("llama-3.1-8b"), setup, ParallelSetup(), card, before)
    offload = [c for c in found if "offload" in c.change]
    assert offload
    assert all(not c.fits and "unpublished" in c.machine for c in offload)


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
    assert data["rank_by"] == "cost"
    assert len(data["rows"]) == len(list_profiles())  # JSON keeps every row, with its rank
    first = data["rows"][0]
    assert first["rank"] == 1
    assert first["pick"]["num_devices"] == 1
    assert first["pick"]["estimate"]["tokens"] == 1_000_000
    fitting = [r for r in data["rows"] if r["rank"] is not None]
    assert len(fitting) > TOP_ROWS
    assert main([*args, "--gpu", "100MiB"]) == 0
    out = capsys.readouterr().out
    assert "Accelerators that fit, ranked by estimated job cost" in out
    assert f" {first['gpu']} " in out
    assert f"{len(fitting) - TOP_ROWS} more fit: --all lists them" in out
    assert fitting[TOP_ROWS]["gpu"] + " " not in out.split("more fit")[0].split("limited by")[1]
    assert "Time model (memplan.step_time)" in out
    assert "On 100MiB: DOES NOT FIT with the given layout" in out
    assert main([*args, "--all", "--rank", "time"]) == 0
    everything = capsys.readouterr().out
    assert "more fit" not in everything
    assert "ranked by estimated time" in everything
    assert all(f" {r['gpu']}" in everything for r in fitting)


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["recommend", "tiny-llama", "--tokens", "5Q"],
        ["recommend", "tiny-llama", "--gpu", "rtx-9090"],
        ["recommend", "tiny-llama", "--rank", "speed"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("memplan: error: ")
        assert err.count("\n") == 1

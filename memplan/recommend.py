"""``recommend``: for every accelerator, the fewest devices and the layout that fit a run.

A device's memory under a layout depends only on (device count, layout), not on which
accelerator it is, so each (count, layout) is predicted once and compared with every profile:

1. ``predict()`` gives each candidate's allocated peak (milliseconds). plan() reserves at least
   that much, so ``peak + CUDA context > capacity`` rules a candidate out for a device exactly.
2. One allocator replay (plan() of the given setup on one device) gives the overhead ratio
   reserved / allocated; the remaining candidates are ranked with ``peak x ratio`` (an estimate).
3. Each profile's pick (fewest devices, then the layout with the least traffic) is confirmed with
   plan(); a pick plan() rejects moves on to the next candidate the estimate allows.

Device counts are powers of two up to ``MAX_DEVICES`` (a search bound). For a chosen device that
does not fit, :func:`changes` lists setup changes, each judged by plan().
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.fit import SEQ_STEP_TOKENS, Capacity, boundary_index, capacity
from memplan.hardware import HardwareProfile, list_profiles
from memplan.judge import Judge
from memplan.methods.lora import lora_roles
from memplan.plan import GpuTarget, PlanResult, resolve_gpu
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import Offload, ParallelSetup, Sharding
from memplan.specs.training import Method, Optimizer, TrainingSetup
from memplan.throughput import (
    UTILISATION_FRACTION,
    FlopsPerToken,
    TrainingEstimate,
    compute_dtype,
    flops_per_token,
    training_estimate,
)

MAX_DEVICES: Final = 1024
DEVICE_COUNTS: Final = tuple(1 << i for i in range(MAX_DEVICES.bit_length()))


@dataclass(frozen=True, slots=True)
class Layout:
    """A data-parallel layout, and how much traffic it adds per step (lower is faster)."""

    label: str
    zero_stage: int
    sharding: Sharding
    offload: Offload
    # 0: gradients reduced once per step (2 x params of traffic: DDP, ZeRO-1, ZeRO-2,
    # SHARD_GRAD_OP); 1: parameters also all-gathered in forward and backward (3 x params,
    # Rajbhandari et al. 2020, arXiv:1910.02054, section 7); 2: optimizer state and step on the
    # CPU over PCIe (ZeRO-Offload, Ren et al. 2021, arXiv:2101.06840); 3: parameters too.
    traffic_rank: int
    single_device: bool  # meaningful on one device


_DS, _FSDP = Sharding.DEEPSPEED, Sharding.FSDP
LAYOUTS: Final = (
    Layout("DDP", 0, _DS, Offload.NONE, 0, True),
    Layout("ZeRO-1", 1, _DS, Offload.NONE, 0, False),
    Layout("ZeRO-2", 2, _DS, Offload.NONE, 0, False),
    Layout("FSDP-grad", 2, _FSDP, Offload.NONE, 0, False),  # FSDP SHARD_GRAD_OP
    Layout("ZeRO-3", 3, _DS, Offload.NONE, 1, False),
    Layout("FSDP-full", 3, _FSDP, Offload.NONE, 1, False),  # FSDP FULL_SHARD
    Layout("ZeRO-2+CPU-opt", 2, _DS, Offload.OPTIMIZER, 2, True),
    Layout("ZeRO-3+CPU-opt", 3, _DS, Offload.OPTIMIZER, 2, False),
    Layout("ZeRO-3+CPU-all", 3, _DS, Offload.OPTIMIZER_AND_PARAMS, 3, True),
)
LAYOUT_LEGEND: Final = (
    "DDP: plain data parallelism (one device: no sharding); ZeRO-n: DeepSpeed stage n; "
    "FSDP-grad / FSDP-full: PyTorch FSDP SHARD_GRAD_OP / FULL_SHARD; +CPU-opt: optimizer "
    "state and step on the CPU (ZeRO-Offload); +CPU-all: parameters too (ZeRO-Infinity)"
)


def layouts(count: int) -> Iterator[tuple[Layout, ParallelSetup]]:
    """The layouts searched on ``count`` devices."""
    for layout in LAYOUTS:
        if count > 1 or layout.single_device:
            yield (
                layout,
                ParallelSetup(
                    num_gpus=count,
                    zero_stage=layout.zero_stage,
                    sharding=layout.sharding,
                    offload=layout.offload,
                ),
            )


class Pick(BaseModel):
    """A device count and layout that fits, judged by plan(), with its price."""

    model_config = ConfigDict(frozen=True)

    num_devices: int
    layout: str
    parallel: dict[str, Any]
    device_bytes: int = Field(description="plan().device_bytes per device.")
    margin_bytes: int = Field(description="Capacity minus device bytes.")
    host_bytes: int = Field(description="Host memory per device for offloaded state.")
    confirmed: bool = Field(description="Judged by plan() (False: estimate only).")
    usd_per_hour: float | None = Field(description="num_devices x cheapest cloud $/GPU-hour.")
    purchase_usd: float | None = Field(description="num_devices x typical purchase price.")
    estimate: TrainingEstimate | None = Field(
        default=None, description="Time and cost for --tokens (FLOPs at a fixed utilisation)."
    )
    estimate_is_lower_bound: bool = Field(
        default=False, description="CPU offload: its PCIe traffic is not in the estimate."
    )


class Recommendation(BaseModel):
    """The fewest devices of one accelerator that fit the run, with cost."""

    model_config = ConfigDict(frozen=True)

    gpu: str
    display_name: str
    capacity: Capacity
    dtype: str | None = Field(description="16-bit format on this device (fp16 without bf16).")
    floor_bytes: int = Field(
        description="Smallest allocated peak + CUDA context of any candidate searched: no "
        "layout on this device needs less."
    )
    fewest: Pick | None = Field(description="Fewest devices, any layout; None: nothing fits.")
    without_offload: Pick | None = Field(
        default=None, description="Fewest devices without CPU offload, when fewest offloads."
    )


def _pick(
    judge: Judge,
    setup: TrainingSetup,
    target: GpuTarget,
    candidates: list[tuple[int, Layout, ParallelSetup]],
) -> tuple[int, Layout, ParallelSetup] | None:
    for count, layout, parallel in candidates:
        # The allocated peak alone rules a candidate out without a replay; anything else is
        # judged like plan() judges it (by the estimate only when confirm=False).
        if not judge.cannot_fit(setup, parallel, target) and judge.fits(setup, parallel, target):
            return count, layout, parallel
    return None


def _priced(
    judge: Judge,
    setup: TrainingSetup,
    profile: HardwareProfile,
    target: GpuTarget,
    picked: tuple[int, Layout, ParallelSetup],
    estimate: Callable[[int], TrainingEstimate | None],
) -> Pick:
    count, layout, parallel = picked
    device, host = judge.device_and_host_bytes(setup, parallel, target)
    price, purchase = profile.cheapest_usd_per_gpu_hour, profile.purchase_price_usd
    return Pick(
        num_devices=count,
        layout=layout.label,
        parallel=parallel.model_dump(mode="json"),
        device_bytes=device,
        margin_bytes=target.capacity_bytes - device,
        host_bytes=host,
        confirmed=judge.confirm,
        usd_per_hour=None if price is None else count * price,
        purchase_usd=None if purchase is None else count * purchase,
        estimate=estimate(count),
        estimate_is_lower_bound=layout.offload is not Offload.NONE,
    )


def _usable(profile: HardwareProfile, layout: Layout, count: int) -> bool:
    """Apple silicon trains on one device without offload: DeepSpeed and FSDP have no
    multi-device MPS backend."""
    single = count == 1 and layout.offload is Offload.NONE
    return profile.kind != "unified-memory" or single


def _recommendation(
    judge: Judge,
    setup: TrainingSetup,
    profile: HardwareProfile,
    candidates: list[tuple[int, Layout, ParallelSetup]],
    flops: FlopsPerToken,
    tokens: int | None,
) -> Recommendation:
    target = resolve_gpu(profile.name)
    own = [c for c in candidates if _usable(profile, c[1], c[0])]
    dtype = compute_dtype(setup, profile)

    def estimate(count: int) -> TrainingEstimate | None:
        if tokens is None or dtype is None:
            return None
        return training_estimate(flops, tokens, profile, count, dtype)

    fewest = _pick(judge, setup, target, own)
    alternative = None
    if fewest is not None and fewest[1].offload is not Offload.NONE:
        no_offload = [c for c in own if c[1].offload is Offload.NONE]
        alternative = _pick(judge, setup, target, no_offload)
    return Recommendation(
        gpu=profile.name,
        display_name=profile.display_name,
        capacity=capacity(target),
        dtype=dtype,
        floor_bytes=min(judge.cheap(setup, p).peak_bytes for _, _, p in own) + target.context_bytes,
        fewest=_priced(judge, setup, profile, target, fewest, estimate) if fewest else None,
        without_offload=_priced(judge, setup, profile, target, alternative, estimate)
        if alternative
        else None,
    )


class Change(BaseModel):
    """One change to the setup or layout, judged by plan() on the chosen device."""

    model_config = ConfigDict(frozen=True)

    change: str
    device_bytes: int = Field(description="plan().device_bytes after the change.")
    required_bytes: int = Field(
        description="Device bytes that must stay on the device: device_bytes minus paged "
        "optimizer state (which may move to host memory)."
    )
    saved_bytes: int = Field(description="required_bytes before minus after.")
    fits: bool = Field(description="plan().fits after the change.")
    speed: str = Field(description="What the change costs in time.")
    accuracy: str = Field(description="What it risks in model quality.")
    setup: dict[str, Any]
    parallel: dict[str, Any]


def cheapest_fixes(found: list[Change], count: int = 3) -> list[Change]:
    """The ``count`` cheapest changes that make a run fit: those that leave the model's
    quality alone first, then those on the same devices, then the smallest change that
    suffices (fewest bytes saved beyond what is needed)."""
    fitting = [c for c in found if c.fits]

    def cost(change: Change) -> tuple[bool, int, int]:
        devices = int(change.parallel.get("num_gpus", 1))
        return (not change.accuracy.startswith("none"), devices, change.saved_bytes)

    return sorted(fitting, key=cost)[:count]


class RecommendResult(BaseModel):
    """What ``memplan recommend`` prints."""

    model_config = ConfigDict(frozen=True)

    model: str
    setup: dict[str, Any]
    device_counts: list[int] = Field(description="Device counts searched.")
    tokens: int | None
    flops_per_token: int = Field(description="Forward + backward + recompute FLOPs per token.")
    utilisation_fraction: float = Field(description="Share of dense peak the estimates assume.")
    by_usd_per_hour: list[Recommendation] = Field(
        description="Every profile: fitting and priced by $/hour, then unpriced, then not fitting."
    )
    by_purchase_usd: list[str] = Field(
        description="Profiles that fit and have a purchase price, cheapest total first."
    )
    gpu: str | None = Field(default=None, description="The chosen device, if any.")
    gpu_plan: dict[str, Any] | None = Field(
        default=None, description="plan() of the given setup and layout on the chosen device."
    )
    changes: list[Change] = Field(default_factory=list)
    plan_calls: int = Field(description="Allocator replays (plan() calls) the search ran.")


def _order_by_usd_per_hour(row: Recommendation) -> tuple[bool, bool, float, str]:
    price = row.fewest.usd_per_hour if row.fewest else None
    return (row.fewest is None, price is None, price or 0.0, row.gpu)


def _purchase(row: Recommendation) -> float | None:
    return row.fewest.purchase_usd if row.fewest else None


def recommend(
    model: str | ModelSpec,
    setup: TrainingSetup | None = None,
    *,
    tokens: int | None = None,
    gpu: str | None = None,
    parallel: ParallelSetup | None = None,
    confirm: bool = True,
) -> RecommendResult:
    """Every profile's fewest devices and layout; with ``gpu``, what would make it fit there.

    ``parallel`` is the layout judged on ``gpu`` (one device by default). ``confirm=False``
    stops after the estimate (no plan() per pick): the search alone, for timing it.
    """
    spec = load_model(model) if isinstance(model, str) else model
    setup = setup or TrainingSetup()
    judge = Judge(spec, confirm=confirm)
    # The one replay whose overhead ratio ranks the candidates.
    base = judge.plan(setup, ParallelSetup())
    candidates = [(c, layout, p) for c in DEVICE_COUNTS for layout, p in layouts(c)]
    # Fewest devices first; then least traffic; then the smallest allocated peak.
    candidates.sort(key=lambda c: (c[0], c[1].traffic_rank, judge.cheap(setup, c[2]).peak_bytes))
    flops = flops_per_token(spec, setup, base.trainable_params)
    rows = [_recommendation(judge, setup, p, candidates, flops, tokens) for p in list_profiles()]
    rows.sort(key=_order_by_usd_per_hour)
    priced = sorted((_purchase(r) or 0.0, r.gpu) for r in rows if _purchase(r) is not None)
    gpu_plan, found = None, []
    if gpu is not None:
        target = resolve_gpu(gpu)
        layout = parallel or ParallelSetup()
        result = judge.plan(setup, layout, target)
        gpu_plan = result.model_dump(mode="json")
        if not result.fits:
            row = next((r for r in rows if r.gpu == target.profile), None)
            picks = (row.fewest, row.without_offload) if row is not None else ()
            scale_out = tuple(p for p in picks if p is not None)
            found = changes(spec, setup, layout, target, result, scale_out=scale_out, judge=judge)
    return RecommendResult(
        model=spec.name,
        setup=setup.model_dump(mode="json"),
        device_counts=list(DEVICE_COUNTS),
        tokens=tokens,
        flops_per_token=flops.total,
        utilisation_fraction=UTILISATION_FRACTION,
        by_usd_per_hour=rows,
        by_purchase_usd=[gpu for _, gpu in priced],
        gpu=resolve_gpu(gpu).name if gpu is not None else None,
        gpu_plan=gpu_plan,
        changes=found,
        plan_calls=judge.plan_calls,
    )


# ------------------------------------------------------------------ what would make it fit


@dataclass(frozen=True, slots=True)
class _Edit:
    change: str
    setup: TrainingSetup
    parallel: ParallelSetup
    speed: str
    accuracy: str


def _pct(new: int, old: int) -> str:
    return f"{100 * (new - old) / old:+.0f}%"


def _flops_note(spec: ModelSpec, old: TrainingSetup, new: TrainingSetup, trainable: int) -> str:
    """Compute change per token from the FLOPs model (memplan.throughput)."""
    new_trainable = predict(spec, new).state.num_trainable_params
    before = flops_per_token(spec, old, trainable).total
    after = flops_per_token(spec, new, new_trainable).total
    return f"{_pct(after, before)} FLOPs per token (memplan.throughput)"


def _with(setup: TrainingSetup, **fields: Any) -> TrainingSetup:
    """``setup`` with ``fields`` changed, re-validated."""
    data = {**setup.model_dump(), **fields}
    return TrainingSetup.model_validate(data)


def _switch_method(setup: TrainingSetup, method: Method) -> TrainingSetup:
    """The new method's typical setup, keeping the fields the given setup set explicitly."""
    explicit = setup.model_fields_set - {"defaults_from_method", *setup.defaults_from_method}
    return TrainingSetup(**{**setup.model_dump(include=explicit), "method": method})


def _peft_edits(
    spec: ModelSpec, setup: TrainingSetup, parallel: ParallelSetup, trainable: int
) -> list[_Edit]:
    edits = []
    if setup.method == "full":
        lora = _switch_method(setup, "lora")
        edits.append(
            _Edit(
                f"LoRA r={lora.lora_r} instead of full fine-tuning (frozen "
                f"{lora.precision.weight_dtype.value} base)",
                lora,
                parallel,
                "backward skips frozen weight gradients: "
                + _flops_note(spec, setup, lora, trainable),
                "trains low-rank adapters only: can trail full fine-tuning on tasks far from "
                "pretraining (Biderman et al. 2024, arXiv:2405.09673)",
            )
        )
    if setup.method in ("full", "lora"):
        if setup.method == "lora":  # quantize the base, keep everything else
            roles = tuple(sorted(lora_roles(spec, setup)))
            qlora = _with(setup, method="qlora", quant="nf4", lora_targets=roles)
            label = "QLoRA: 4-bit NF4 base weights under the same adapters"
        else:
            qlora = _switch_method(setup, "qlora")
            ckpt = ", checkpointing" if qlora.grad_ckpt else ""
            label = f"QLoRA (NF4 base, LoRA r={qlora.lora_r}, {qlora.optimizer.value}{ckpt})"
        edits.append(
            _Edit(
                label,
                qlora,
                parallel,
                f"{_flops_note(spec, setup, qlora, trainable)}, plus dequantizing each linear in "
                "forward and again in backward (not counted in FLOPs)",
                "4-bit quantization of the frozen base: QLoRA matched 16-bit LoRA on its "
                "benchmarks (Dettmers et al. 2023, arXiv:2305.14314)",
            )
        )
    return edits


_EIGHT_BIT: Final = {
    Optimizer.ADAMW: Optimizer.ADAMW_8BIT,
    Optimizer.PAGED_ADAMW: Optimizer.PAGED_ADAMW_8BIT,
}
_PAGED: Final = {
    Optimizer.ADAMW: Optimizer.PAGED_ADAMW,
    Optimizer.ADAMW_8BIT: Optimizer.PAGED_ADAMW_8BIT,
}


def _optimizer_edits(setup: TrainingSetup, parallel: ParallelSetup) -> list[_Edit]:
    edits = []
    if setup.optimizer in _EIGHT_BIT:
        edits.append(
            _Edit(
                f"8-bit optimizer ({_EIGHT_BIT[setup.optimizer].value})",
                _with(setup, optimizer=_EIGHT_BIT[setup.optimizer]),
                parallel,
                "negligible (block-wise quantized states)",
                "8-bit Adam states: matched 32-bit Adam in Dettmers et al. 2022, arXiv:2110.02861",
            )
        )
    if setup.optimizer in _PAGED:
        edits.append(
            _Edit(
                f"paged optimizer ({_PAGED[setup.optimizer].value})",
                _with(setup, optimizer=_PAGED[setup.optimizer]),
                parallel,
                "slower only while states page between host and device",
                "none (same optimizer math)",
            )
        )
    return edits


def _layout(parallel: ParallelSetup, **fields: Any) -> ParallelSetup:
    return ParallelSetup.model_validate({**parallel.model_dump(), **fields})


def _layout_edits(parallel: ParallelSetup, setup: TrainingSetup) -> list[_Edit]:
    edits = []
    fsdp = parallel.sharding is Sharding.FSDP
    stages = range(parallel.zero_stage + 1, 4) if parallel.data_parallel_degree > 1 else range(0)
    for stage in (s for s in stages if not (fsdp and s == 1)):
        name = "FULL_SHARD" if fsdp and stage == 3 else "SHARD_GRAD_OP" if fsdp else f"ZeRO-{stage}"
        edits.append(
            _Edit(
                f"{name} across the {parallel.num_gpus} devices",
                setup,
                _layout(parallel, zero_stage=stage),
                "parameters all-gathered in forward and backward: 1.5x traffic (ZeRO, section 7)"
                if stage == 3
                else "same traffic as data parallelism (ZeRO, section 7)",
                "none",
            )
        )
    if parallel.offload is Offload.NONE:
        stage = max(parallel.zero_stage, 2)
        edits.append(
            _Edit(
                f"offload the optimizer to the CPU (DeepSpeed ZeRO-{stage} + offload)",
                setup,
                _layout(parallel, zero_stage=stage, sharding=_DS, offload=Offload.OPTIMIZER),
                "optimizer step on the CPU, gradients and weights over PCIe every step "
                "(ZeRO-Offload, arXiv:2101.06840)",
                "none",
            )
        )
    if parallel.offload is not Offload.OPTIMIZER_AND_PARAMS:
        edits.append(
            _Edit(
                "offload optimizer and parameters to the CPU (DeepSpeed ZeRO-3 + offload)",
                setup,
                _layout(parallel, zero_stage=3, sharding=_DS, offload=Offload.OPTIMIZER_AND_PARAMS),
                "every layer's parameters cross PCIe in forward and backward (ZeRO-Infinity, "
                "arXiv:2104.07857)",
                "none",
            )
        )
    return edits


def _edits(
    spec: ModelSpec, setup: TrainingSetup, parallel: ParallelSetup, trainable: int
) -> list[_Edit]:
    edits = []
    if setup.trains_weights and not setup.grad_ckpt:
        ckpt = _with(setup, grad_ckpt=True, grad_ckpt_every=1)
        edits.append(
            _Edit(
                "activation checkpointing",
                ckpt,
                parallel,
                f"recomputes each layer's forward: {_flops_note(spec, setup, ckpt, trainable)}",
                "none (same math)",
            )
        )
    edits += _peft_edits(spec, setup, parallel, trainable)
    if setup.trains_weights:
        edits += _optimizer_edits(setup, parallel)
    edits += _layout_edits(parallel, setup)
    return edits


def _smaller_batch(
    judge: Judge, setup: TrainingSetup, parallel: ParallelSetup, target: GpuTarget
) -> _Edit | None:
    """Largest divisor of the micro-batch that fits, accumulating to the same effective batch."""
    batch = setup.micro_batch_size
    divisors = [d for d in range(batch - 1, 0, -1) if batch % d == 0]
    tried = [
        _with(setup, micro_batch_size=d, grad_accum_steps=setup.grad_accum_steps * batch // d)
        for d in divisors
    ]
    choice = next(
        (
            s
            for s in tried
            if not judge.cannot_fit(s, parallel, target) and judge.fits(s, parallel, target)
        ),
        tried[-1] if tried else None,
    )
    if choice is None:
        return None
    return _Edit(
        f"micro-batch {choice.micro_batch_size} x {choice.grad_accum_steps} accumulation steps "
        f"(same {batch * setup.grad_accum_steps} sequences per step)",
        choice,
        parallel,
        "smaller matmuls use the device less efficiently; same math per optimizer step",
        "none (same effective batch)",
    )


def _shorter_seq(
    judge: Judge, setup: TrainingSetup, parallel: ParallelSetup, target: GpuTarget
) -> _Edit | None:
    """Longest multiple of SEQ_STEP_TOKENS below the given length that fits."""
    count = (setup.seq_len - 1) // SEQ_STEP_TOKENS
    if count < 1:
        return None

    def at(k: int) -> TrainingSetup:
        return setup.model_copy(update={"seq_len": k * SEQ_STEP_TOKENS})

    k = boundary_index(judge, at, count, parallel, target) or 1
    return _Edit(
        f"sequence length {k * SEQ_STEP_TOKENS} (from {setup.seq_len})",
        at(k),
        parallel,
        "fewer tokens per sequence; more sequences for the same tokens",
        f"examples longer than {k * SEQ_STEP_TOKENS} tokens must be truncated or split",
    )


def changes(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    target: GpuTarget,
    before: PlanResult,
    *,
    scale_out: tuple[Pick, ...] = (),
    judge: Judge | None = None,
) -> list[Change]:
    """Single changes to a run that does not fit on ``target``, ranked by device bytes saved
    (changes that free nothing are left out).

    Each is judged by plan() on ``target``; ``scale_out`` adds the recommended device counts
    above the given one. A chunked loss is not offered: the analytical model has no chunked
    cross-entropy to judge it with.
    """
    judge = judge or Judge(spec)
    edits = _edits(spec, setup, parallel, before.trainable_params)
    edits += [
        e
        for e in (
            _smaller_batch(judge, setup, parallel, target),
            _shorter_seq(judge, setup, parallel, target),
        )
        if e
    ]
    for pick in scale_out:
        if pick.num_devices > parallel.num_gpus:
            edits.append(
                _Edit(
                    f"{pick.num_devices} devices, {pick.layout}",
                    setup,
                    ParallelSetup.model_validate(pick.parallel),
                    f"the work is shared by {pick.num_devices} devices (cost per hour grows)",
                    "none",
                )
            )
    required = before.device_bytes - before.paged_bytes
    out = []
    for edit in edits:
        result = judge.plan(edit.setup, edit.parallel, target)
        out.append(
            Change(
                change=edit.change,
                device_bytes=result.device_bytes,
                required_bytes=result.device_bytes - result.paged_bytes,
                saved_bytes=required - (result.device_bytes - result.paged_bytes),
                fits=bool(result.fits),
                speed=edit.speed,
                accuracy=edit.accuracy,
                setup=result.setup,
                parallel=result.parallel,
            )
        )
    # A change that frees nothing (e.g. an 8-bit optimizer for a few adapter weights) is noise.
    return sorted((c for c in out if c.saved_bytes > 0), key=lambda c: -c.saved_bytes)

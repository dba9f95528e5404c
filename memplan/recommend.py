"""``recommend``: the accelerators and layouts that run a job cheapest (or fastest).

For every accelerator profile:

1. the layouts its software runs (:mod:`memplan.support`: DeepSpeed, FSDP, CPU offload) and the
   setup's own needs (bitsandbytes, flash-attn); an accelerator lacking one for the setup is
   listed as not supported, with the source that says so;
2. for each layout, the fewest devices that fit: in device memory (a device's memory under a
   layout depends only on the device count and the layout, so each is predicted and planned
   once and compared with every profile; the allocated peak rules a candidate out without a
   replay), in its machines (devices that can be joined: one node, or nodes with a network)
   and, with offload, in the node's host memory;
3. each such option's time per token from :mod:`memplan.step_time` (compute, collectives, host
   transfers, CPU optimizer), and from it the cost of the job: devices x $/GPU-hour x hours;
4. the best option by the ranking (cost: device-hours per token, which orders options as the
   job's dollars do; time: tokens per second) is the accelerator's pick.

Device memory is plan()'s verdict (``confirm=False``: the allocator estimate alone, for timing
the search).

Profiles are ranked by the job's estimated cost (``rank="cost"``: $ per million tokens, the same
order as the cost of any token count) or time (``rank="time"``). Device counts are powers of two
up to ``MAX_DEVICES`` (a search bound). For a chosen device that does not fit, :func:`changes`
lists setup changes, each judged by plan().
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.fit import SEQ_STEP_TOKENS, Capacity, boundary_index, capacity
from memplan.hardware import HardwareProfile, SoftwareFeature, list_profiles, load_profile
from memplan.judge import Judge
from memplan.methods.lora import lora_roles
from memplan.plan import GpuTarget, PlanResult, resolve_gpu
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import Offload, ParallelSetup, Sharding
from memplan.specs.training import Method, Objective, Optimizer, TrainingSetup
from memplan.step_time import CPU_ADAM_PARAMS_PER_S, TimeEstimate, time_estimate
from memplan.support import layout_needs, machine_fits, missing, setup_needs
from memplan.throughput import (
    UTILISATION_FRACTION,
    FlopsPerToken,
    compute_dtype,
    flops_per_token,
)
from memplan.units import gib

MAX_DEVICES: Final = 1024
DEVICE_COUNTS: Final = tuple(1 << i for i in range(MAX_DEVICES.bit_length()))
TOP_ROWS: Final = 10  # rows the text report shows without --all

Rank = Literal["cost", "time"]


@dataclass(frozen=True, slots=True)
class Layout:
    """A data-parallel layout recommend searches."""

    label: str
    zero_stage: int
    sharding: Sharding
    offload: Offload
    single_device: bool  # meaningful on one device


_DS, _FSDP = Sharding.DEEPSPEED, Sharding.FSDP
LAYOUTS: Final = (
    Layout("DDP", 0, _DS, Offload.NONE, True),
    Layout("ZeRO-1", 1, _DS, Offload.NONE, False),
    Layout("ZeRO-2", 2, _DS, Offload.NONE, False),
    Layout("FSDP-grad", 2, _FSDP, Offload.NONE, False),  # FSDP SHARD_GRAD_OP
    Layout("ZeRO-3", 3, _DS, Offload.NONE, False),
    Layout("FSDP-full", 3, _FSDP, Offload.NONE, False),  # FSDP FULL_SHARD
    Layout("ZeRO-2+CPU-opt", 2, _DS, Offload.OPTIMIZER, True),
    Layout("ZeRO-3+CPU-opt", 3, _DS, Offload.OPTIMIZER, False),
    Layout("ZeRO-3+CPU-all", 3, _DS, Offload.OPTIMIZER_AND_PARAMS, True),
)
LAYOUT_LEGEND: Final = (
    "DDP: plain data parallelism (one device: no sharding); ZeRO-n: DeepSpeed stage n; "
    "FSDP-grad / FSDP-full: PyTorch FSDP SHARD_GRAD_OP / FULL_SHARD; +CPU-opt: optimizer "
    "state and step on the CPU (ZeRO-Offload); +CPU-all: parameters too (ZeRO-Infinity)"
)


def parallel_of(layout: Layout, count: int) -> ParallelSetup:
    return ParallelSetup(
        num_gpus=count,
        zero_stage=layout.zero_stage,
        sharding=layout.sharding,
        offload=layout.offload,
    )


def layouts(count: int) -> Iterator[tuple[Layout, ParallelSetup]]:
    """The layouts searched on ``count`` devices."""
    for layout in LAYOUTS:
        if count > 1 or layout.single_device:
            yield layout, parallel_of(layout, count)


class Option(BaseModel):
    """A layout on the fewest devices of one accelerator that hold it, with time and price."""

    model_config = ConfigDict(frozen=True)

    num_devices: int
    layout: str
    parallel: dict[str, Any]
    device_bytes: int = Field(description="plan().device_bytes per device (~ if not confirmed).")
    margin_bytes: int = Field(description="Capacity minus device bytes.")
    host_bytes: int = Field(description="Host memory per device for offloaded state.")
    node_host_bytes: int = Field(description="host_bytes x the devices sharing a node.")
    confirmed: bool = Field(description="Judged by plan() (False: allocator estimate only).")
    usd_per_hour: float | None = Field(description="num_devices x cheapest cloud $/GPU-hour.")
    purchase_usd: float | None = Field(description="num_devices x typical purchase price.")
    estimate: TimeEstimate | None = Field(
        description="Throughput, time and cost (memplan.step_time); None without a peak rate."
    )


class Recommendation(BaseModel):
    """One accelerator: its best option by the ranking, and every layout's fewest devices."""

    model_config = ConfigDict(frozen=True)

    rank: int | None = Field(description="Place in the ranking; None when nothing fits.")
    gpu: str
    display_name: str
    capacity: Capacity
    dtype: str | None = Field(description="16-bit format on this device (fp16 without bf16).")
    unsupported: dict[str, str] = Field(
        description="Software the setup needs that this accelerator lacks: feature -> source."
    )
    floor_bytes: int | None = Field(
        description="Smallest allocated peak + CUDA context of any layout searched on this "
        "device: none needs less (None when unsupported)."
    )
    host_limited: bool = Field(
        default=False,
        description="Some layout fit in device memory but needed more host memory per node "
        "than the profile's node has (or publishes).",
    )
    pick: Option | None = Field(description="Best option by the ranking; None: nothing fits.")
    options: list[Option] = Field(
        description="Each runnable layout on the fewest devices that hold it, best first."
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
    fits: bool = Field(
        description="plan().fits after the change, and (on a profile) its machines hold it."
    )
    machine: str = Field(
        default="", description="Why the profile's machines cannot hold it, if they cannot."
    )
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
    rank_by: Rank
    order: str = Field(description="How the rows are ordered, in words.")
    flops_per_token: int = Field(description="Forward + backward + recompute FLOPs per token.")
    utilisation_fraction: float = Field(description="Share of dense peak the estimates assume.")
    cpu_adam_params_per_s: float = Field(description="DeepSpeedCPUAdam rate of one node's CPU.")
    rows: list[Recommendation] = Field(
        description="Every profile: ranked rows first, then fitting without an estimate, then "
        "not fitting, then not supported."
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


_NEVER: Final = float("inf")


def _option_key(rank: Rank) -> Any:
    """Order of one accelerator's options: device-seconds per token (cost; the price per
    device-hour is the same for all of them) or seconds per token (time); options without an
    estimate last, fewest devices first."""

    def key(option: Option) -> tuple[float, int, str]:
        est = option.estimate
        if est is None:
            return (_NEVER, option.num_devices, option.layout)
        devices = option.num_devices if rank == "cost" else 1
        return (devices / est.tokens_per_second, option.num_devices, option.layout)

    return key


def _row_key(rank: Rank) -> Any:
    def key(row: Recommendation) -> tuple[int, float, str]:
        pick = row.pick
        if row.unsupported:
            return (5, 0.0, row.gpu)
        if pick is None:
            return (4, 0.0, row.gpu)
        est = pick.estimate
        if est is None:  # no peak rate: by $/hour, unpriced last
            return (3, pick.usd_per_hour if pick.usd_per_hour is not None else _NEVER, row.gpu)
        if rank == "time":
            return (0, 1 / est.tokens_per_second, row.gpu)
        if est.usd_per_million_tokens is not None:
            return (0, est.usd_per_million_tokens, row.gpu)
        return (2, 1 / est.tokens_per_second, row.gpu)  # unpriced: fastest first

    return key


def order_text(rank: Rank, tokens: int | None) -> str:
    if rank == "time":
        return "ranked by estimated time (tokens per second), fastest first"
    job = (
        "estimated job cost = devices x $/GPU-hour x hours"
        if tokens is not None
        else "estimated $ per million tokens (the order of a job's cost for any --tokens)"
    )
    return f"ranked by {job}; unpriced accelerators after, fastest first"


@dataclass
class _Search:
    """One accelerator's search: judge, setup, and what the estimates need."""

    judge: Judge
    setup: TrainingSetup
    profile: HardwareProfile
    target: GpuTarget
    flops: FlopsPerToken
    tokens: int | None
    dtype: str | None
    host_limited: bool = False  # a layout fit in device memory but not in a node's host memory

    def runnable(self, count: int) -> list[tuple[Layout, ParallelSetup]]:
        if not self.profile.node.spans(count):
            return []
        return [
            (layout, parallel)
            for layout, parallel in layouts(count)
            if not missing(self.profile, layout_needs(parallel))
        ]

    def holds(self, parallel: ParallelSetup) -> bool:
        """Fits in device memory (plan()'s verdict; the allocated peak alone rules a candidate
        out without a replay) and in the profile's machines, host memory included."""
        judge, setup, target = self.judge, self.setup, self.target
        if judge.cannot_fit(setup, parallel, target) or not judge.fits(setup, parallel, target):
            return False
        _, host = judge.device_and_host_bytes(setup, parallel, target)
        held = machine_fits(self.profile, parallel, host)
        self.host_limited |= not held
        return held

    def option(self, layout: Layout, parallel: ParallelSetup) -> Option:
        judge, profile = self.judge, self.profile
        device, host = judge.device_and_host_bytes(self.setup, parallel, self.target)
        count = parallel.num_gpus
        price, purchase = profile.cheapest_usd_per_gpu_hour, profile.purchase_price_usd
        estimate = None
        if self.dtype is not None:
            moved = judge.cheap(self.setup, parallel).moved
            estimate = time_estimate(
                self.flops, self.setup, parallel, moved, profile, self.dtype, self.tokens
            )
        return Option(
            num_devices=count,
            layout=layout.label,
            parallel=parallel.model_dump(mode="json"),
            device_bytes=device,
            margin_bytes=self.target.capacity_bytes - device,
            host_bytes=host,
            node_host_bytes=host * profile.node.devices_per_node(count),
            confirmed=judge.confirm,
            usd_per_hour=None if price is None else count * price,
            purchase_usd=None if purchase is None else count * purchase,
            estimate=estimate,
        )

    def fewest(self, layout: Layout) -> Option | None:
        """The layout on the fewest devices that hold it."""
        for count in DEVICE_COUNTS:
            if not (count > 1 or layout.single_device):
                continue
            if not self.profile.node.spans(count):
                break
            parallel = parallel_of(layout, count)
            if self.holds(parallel):
                return self.option(layout, parallel)
        return None


def _recommendation(search: _Search, rank: Rank) -> Recommendation:
    profile, setup, judge = search.profile, search.setup, search.judge
    lacking = missing(profile, setup_needs(setup))
    floor, options = None, []
    if not lacking:
        usable = [lay for lay in LAYOUTS if not missing(profile, layout_needs(parallel_of(lay, 2)))]
        peaks = [
            judge.cheap(setup, p).peak_bytes
            for count in DEVICE_COUNTS
            for _, p in search.runnable(count)
        ]
        floor = min(peaks) + search.target.context_bytes if peaks else None
        found = (search.fewest(layout) for layout in usable)
        options = sorted((o for o in found if o is not None), key=_option_key(rank))
    return Recommendation(
        rank=None,
        gpu=profile.name,
        display_name=profile.display_name,
        capacity=capacity(search.target),
        dtype=search.dtype,
        unsupported=lacking,
        floor_bytes=floor,
        host_limited=search.host_limited,
        pick=options[0] if options else None,
        options=options,
    )


def _purchase(row: Recommendation) -> float | None:
    return row.pick.purchase_usd if row.pick else None


def recommend(
    model: str | ModelSpec,
    setup: TrainingSetup | None = None,
    *,
    tokens: int | None = None,
    rank: Rank = "cost",
    gpu: str | None = None,
    parallel: ParallelSetup | None = None,
    confirm: bool = True,
) -> RecommendResult:
    """Every profile's best layout and device count for the job, ranked by cost or time; with
    ``gpu``, what would make the given layout fit there.

    ``parallel`` is the layout judged on ``gpu`` (one device by default). ``confirm=False``
    stops after the estimate (no plan() per pick): the search alone, for timing it.
    """
    spec = load_model(model) if isinstance(model, str) else model
    setup = setup or TrainingSetup()
    judge = Judge(spec, confirm=confirm)
    # The one replay whose overhead ratio the estimates use.
    base = judge.plan(setup, ParallelSetup())
    flops = flops_per_token(spec, setup, base.trainable_params)
    rows = []
    for profile in list_profiles():
        target = resolve_gpu(profile.name)
        dtype = compute_dtype(setup, profile)
        search = _Search(judge, setup, profile, target, flops, tokens, dtype)
        rows.append(_recommendation(search, rank))
    rows.sort(key=_row_key(rank))
    ranked = [
        row.model_copy(update={"rank": place})
        for place, row in enumerate((r for r in rows if r.pick is not None), start=1)
    ]
    rows = ranked + [r for r in rows if r.pick is None]
    priced = sorted((_purchase(r) or 0.0, r.gpu) for r in rows if _purchase(r) is not None)
    gpu_plan, found = None, []
    if gpu is not None:
        target = resolve_gpu(gpu)
        layout = parallel or ParallelSetup()
        result = judge.plan(setup, layout, target)
        gpu_plan = result.model_dump(mode="json")
        if not result.fits:
            row = next((r for r in rows if r.gpu == target.profile), None)
            scale_out = tuple(row.options) if row is not None else ()
            found = changes(spec, setup, layout, target, result, scale_out=scale_out, judge=judge)
    return RecommendResult(
        model=spec.name,
        setup=setup.model_dump(mode="json"),
        device_counts=list(DEVICE_COUNTS),
        tokens=tokens,
        rank_by=rank,
        order=order_text(rank, tokens),
        flops_per_token=flops.total,
        utilisation_fraction=UTILISATION_FRACTION,
        cpu_adam_params_per_s=CPU_ADAM_PARAMS_PER_S,
        rows=rows,
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
    filled = {*setup.defaults_from_method, *setup.defaults_from_stack}
    explicit = setup.model_fields_set - {"defaults_from_method", "defaults_from_stack", *filled}
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
    # Modelled without sharding only (predict.check_parallel): optimizer in backward, DPO.
    if setup.optimizer_in_backward or setup.objective is Objective.DPO:
        return []
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
    """Largest divisor of the micro-batch that fits, accumulating to the same effective batch
    (none when the optimizer steps in backward: it cannot accumulate)."""
    if setup.optimizer_in_backward:
        return None
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


def _needs(edit: _Edit) -> tuple[SoftwareFeature, ...]:
    return setup_needs(edit.setup) + layout_needs(edit.parallel)


def _machine(profile: HardwareProfile, parallel: ParallelSetup, host_bytes: int) -> str:
    """Why ``profile``'s machines cannot hold the layout ('' when they can)."""
    if machine_fits(profile, parallel, host_bytes):
        return ""
    node = profile.node
    if not node.spans(parallel.num_gpus):
        return f"{profile.name} machines join at most {node.gpus_per_node} devices"
    need = gib(host_bytes * node.devices_per_node(parallel.num_gpus))
    if node.host_memory_bytes is None:
        return f"needs {need:,.0f} GiB of host memory per node; {profile.name}'s is unpublished"
    return (
        f"needs {need:,.0f} GiB of host memory per node, more than {node.system}'s "
        f"{gib(node.host_memory_bytes):,.0f} GiB"
    )


def changes(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    target: GpuTarget,
    before: PlanResult,
    *,
    scale_out: tuple[Option, ...] = (),
    judge: Judge | None = None,
) -> list[Change]:
    """Single changes to a run that does not fit on ``target``, ranked by device bytes saved
    (changes that free nothing are left out).

    Each is judged by plan() on ``target``; ``scale_out`` adds the recommended device counts
    above the given one. On a hardware profile, changes needing software it lacks are left
    out (:mod:`memplan.support`), and one its machines cannot hold (host memory for offload,
    devices per node) does not fit. A different loss (``--loss``) is not offered: it changes the
    training code, not a setting of it; ``plan --loss`` judges one.
    """
    judge = judge or Judge(spec)
    profile = load_profile(target.profile) if target.profile is not None else None
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
    if profile is not None:
        edits = [e for e in edits if not missing(profile, _needs(e))]
    required = before.device_bytes - before.paged_bytes
    out = []
    for edit in edits:
        result = judge.plan(edit.setup, edit.parallel, target)
        machine = "" if profile is None else _machine(profile, edit.parallel, result.cpu_bytes)
        out.append(
            Change(
                change=edit.change,
                device_bytes=result.device_bytes,
                required_bytes=result.device_bytes - result.paged_bytes,
                saved_bytes=required - (result.device_bytes - result.paged_bytes),
                fits=bool(result.fits) and not machine,
                machine=machine,
                speed=edit.speed,
                accuracy=edit.accuracy,
                setup=result.setup,
                parallel=result.parallel,
            )
        )
    # A change that frees nothing (e.g. an 8-bit optimizer for a few adapter weights) is noise.
    return sorted((c for c in out if c.saved_bytes > 0), key=lambda c: -c.saved_bytes)

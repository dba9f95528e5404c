"""Rich rendering of ``fit`` and ``recommend`` results (display only: every number comes from a
FitResult or RecommendResult)."""

from __future__ import annotations

from typing import Any, Final

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.fit import Boundary, Capacity, FitResult, FitTable, Point
from memplan.hardware import load_profile
from memplan.recommend import (
    LAYOUT_LEGEND,
    TOP_ROWS,
    Change,
    Option,
    Recommendation,
    RecommendResult,
)
from memplan.report import stdout_console
from memplan.units import gib


def _gib(num_bytes: int) -> str:
    return f"{gib(num_bytes):,.2f}"


def _setup_line(model: str, setup: dict[str, Any]) -> str:
    return (
        f"{model}: {setup['method']}, {setup['precision']}, {setup['optimizer']}, "
        f"micro-batch {setup['micro_batch_size']} x seq {setup['seq_len']}"
        + (", activation checkpointing" if setup["grad_ckpt"] else "")
    )


def capacity_lines(cap: Capacity) -> Text:
    """Where the capacity comes from, and what plan() adds on top of the allocator."""
    if cap.kind == "capacity":
        lines = [f"device: {cap.name} = {_gib(cap.capacity_bytes)} GiB (as given)"]
    else:
        lines = [f"device: {cap.name}: {_gib(cap.usable_memory_bytes)} GiB usable (profile)"]
    if cap.kind == "unified-memory":
        lines.append(
            f"unified memory: the GPU may use {100 * cap.gpu_share_fraction:.0f}% "
            f"(gpu_share_fraction); judged capacity {_gib(cap.capacity_bytes)} GiB"
        )
    lines.append(
        f"plan() adds a CUDA context of {_gib(cap.context_bytes)} GiB to the allocator's reserve"
    )
    return Text("\n".join(lines))


def _verdict(p: Point) -> str:
    if p.margin_bytes >= 0:
        spare = f"{_gib(p.device_bytes)} GiB on the device, {_gib(p.margin_bytes)} GiB to spare"
        return spare + (" (borderline)" if p.verdict == "borderline" else "")
    if p.verdict == "fits only by paging":
        return (
            f"{_gib(p.device_bytes)} GiB, {_gib(-p.margin_bytes)} GiB over: fits only by paging "
            f"{_gib(p.paged_out_bytes)} GiB of optimizer state to the host"
        )
    return f"needs {_gib(p.device_bytes)} GiB, {_gib(-p.margin_bytes)} GiB short"


_CELL_MARK: Final = {(True, False): "+", (False, True): "~", (False, False): "-"}


def _boundary_lines(b: Boundary, other: str) -> list[str]:
    what = "micro-batch" if b.axis == "micro_batch_size" else "sequence length"
    if b.largest is None or b.fitting is None:
        first = b.next
        need = f" ({_verdict(first)})" if first else ""
        return [f"largest {what} {other}: none, not even {b.step}{need}"]
    bound = " (the search bound; more may fit)" if b.at_limit else ""
    lines = [f"largest {what} {other}: {b.largest}{bound} - {_verdict(b.fitting)}"]
    if b.next is not None:
        lines.append(f"  {b.largest + b.step}: {_verdict(b.next)}")
    return lines


def _table(table: FitTable) -> Table:
    out = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    out.add_column("batch", justify="right")
    for seq in table.seq_lens:
        out.add_column(str(seq), justify="right")
    for batch, row in zip(table.batch_sizes, table.rows, strict=True):
        out.add_row(
            str(batch),
            *(Text(f"{gib(c.peak_bytes):,.1f} {_CELL_MARK[(c.fits, c.by_paging)]}") for c in row),
        )
    return out


def render_fit(result: FitResult) -> RenderableType:
    seq_of = f"at seq {result.setup['seq_len']}"
    batch_of = f"at micro-batch {result.setup['micro_batch_size']}"
    given = result.given
    lines = [
        f"given micro-batch {given.micro_batch_size} x seq {given.seq_len}: "
        f"{given.verdict.upper()}, {_verdict(given)}",
        *_boundary_lines(result.batch, seq_of),
        *_boundary_lines(result.seq, batch_of),
        *(
            line
            for b, other in ((result.batch_paging, seq_of), (result.seq_paging, batch_of))
            if b is not None
            for line in _boundary_lines(b, f"{other}, paging optimizer state to the host")
        ),
        f"sequence lengths: multiples of {result.seq.step} up to {result.seq.limit}, "
        f"{result.seq_limit_reason}; trained context {result.max_position_embeddings}",
    ]
    parts: list[RenderableType] = [
        Text(_setup_line(result.model, result.setup), style="bold"),
        capacity_lines(result.gpu),
    ]
    if result.smallest is not None and not result.smallest.fits:
        parts.append(
            Text(
                f"Nothing fits on {result.gpu.name}: even micro-batch 1 x {result.smallest.seq_len}"
                f" tokens {_verdict(result.smallest)}. `memplan recommend` lists devices and "
                "changes that fit.",
                style="bold red",
            )
        )
    parts.append(Text("\n".join(lines)))
    if result.table is not None:
        parts.append(
            Text(
                "Allocated peak GiB by micro-batch (rows) x sequence length (columns); "
                "+ fits, ~ fits only by paging optimizer state to the host, - does not:"
            )
        )
        parts.append(_table(result.table))
        parts.append(
            Text(
                "+/~/- as plan() judges it (reserved memory + CUDA context): by plan() itself at "
                "each row's boundary, elsewhere following from it (memory grows with sequence "
                "length) or from the allocated peak alone exceeding capacity.",
                style="dim",
            )
        )
    return Group(*parts)


def print_fit(result: FitResult, console: Console | None = None) -> None:
    (console or stdout_console()).print(render_fit(result))


# ------------------------------------------------------------------------------ recommend


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _estimate_cells(result: RecommendResult, pick: Option) -> list[str]:
    est = pick.estimate
    if est is None:
        return ["-", "-", "-"]
    if result.tokens is not None:
        hours = "-" if est.hours is None else f"{est.hours:,.1f}"
        return [hours, _money(est.cost_usd), est.step.bound]
    return [f"{est.tokens_per_second:,.0f}", _usd(est.usd_per_million_tokens), est.step.bound]


def _ranking(result: RecommendResult, rows: list[Recommendation]) -> Table:
    title = f"Accelerators that fit, {result.order}"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    timing = ["est. h", "est. $"] if result.tokens is not None else ["tok/s", "$/M tok"]
    columns = ["#", "accelerator", "n x layout", "GiB/dev", "host/node", "$/hour"]
    for col in [*columns, *timing, "limited by"]:
        left = col in ("accelerator", "n x layout", "limited by")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for row in rows:
        pick = row.pick
        assert pick is not None
        approx = "" if pick.confirmed else "~"
        cells = [
            str(row.rank),
            row.gpu + ("*" if row.dtype == "fp16" else ""),
            f"{pick.num_devices} x {pick.layout}",
            f"{approx}{gib(pick.device_bytes):.1f}",
            f"{gib(pick.node_host_bytes):.0f}" if pick.node_host_bytes else "-",
            _usd(pick.usd_per_hour),
        ]
        table.add_row(*cells, *_estimate_cells(result, pick))
    return table


def _rankings(result: RecommendResult, show_all: bool) -> list[RenderableType]:
    fitting = [r for r in result.rows if r.pick is not None]
    shown = fitting if show_all else fitting[:TOP_ROWS]
    out: list[RenderableType] = [_ranking(result, shown)]
    if len(shown) < len(fitting):
        out.append(Text(f"{len(fitting) - len(shown)} more fit: --all lists them, --json has all"))
    out.append(
        Text(
            "GiB/dev: plan() device bytes per device (~: estimate); host/node: GiB of offloaded "
            "state in one node's host memory; limited by: the largest term of the step time; "
            f"*: no bf16 on this device, the run uses fp16 (same bytes). {LAYOUT_LEGEND}.",
            style="dim",
        )
    )
    return out


def _time_model(result: RecommendResult) -> Text:
    return Text(
        "Time model (memplan.step_time), per device per optimizer step: compute = "
        f"{result.flops_per_token:,} FLOPs per token (6N training, 8N with checkpointing, 4N + "
        "adapters for frozen bases, plus attention) at "
        f"{100 * result.utilisation_fraction:.0f}% of the dense 16-bit peak; collectives over the "
        "node's device link (NVLink, Infinity Fabric, ICI, RoCE, or PCIe) or, across nodes, its "
        "network: ring all-gather / reduce-scatter move (N-1)/N of the data per device, "
        "all-reduce 2(N-1)/N (DDP: gradients once a step; ZeRO-1/2: gradients and updated "
        "weights; ZeRO-3 / FSDP-full: weights gathered in forward and in backward, gradients "
        "reduce-scattered); CPU offload: 16-bit gradients to the host and updated weights back "
        "over the host link (ZeRO-Offload), weights fetched in forward and backward (+CPU-all), "
        f"DeepSpeedCPUAdam at {result.cpu_adam_params_per_s / 1e9:.2f}e9 parameters/s per node. "
        "Overlap: FSDP and ZeRO-3 overlap communication with compute (a pass takes the larger), "
        "DDP its all-reduce with the last backward; ZeRO-1/2 communication, the CPU step and "
        "the copy back add. Link peaks; no GPU optimizer step, 4-bit dequantization, data "
        "loading or latency: within a factor of 2.5 of published runs, on the slow side "
        "(tests/test_step_time.py).",
        style="dim",
    )


def _by_purchase(result: RecommendResult) -> Text:
    rows = {r.gpu: r for r in result.rows}
    parts = []
    for rank, name in enumerate(result.by_purchase_usd, start=1):
        pick = rows[name].pick
        assert pick is not None
        parts.append(f"{rank}. {name} ({pick.num_devices}) ${pick.purchase_usd or 0:,.0f}")
    body = "; ".join(parts) if parts else "no fitting accelerator has a purchase price"
    return Text(f"ranked by purchase price (devices x typical price): {body}")


def _unsupported(result: RecommendResult) -> Text | None:
    groups: dict[str, list[str]] = {}
    for row in result.rows:
        if row.unsupported:
            groups.setdefault(", ".join(row.unsupported), []).append(row.gpu)
    if not groups:
        return None
    lines = ["Not offered: the setup needs software these accelerators lack (sources: --json):"]
    lines += [f"  {', '.join(names)}: no {features}" for features, names in groups.items()]
    return Text("\n".join(lines), style="yellow")


def _host_memory(row: Recommendation) -> str:
    node = load_profile(row.gpu).node
    host = node.host_memory_bytes
    return f"{row.gpu} ({'unpublished' if host is None else f'{gib(host):,.0f}'})"


def _no_fit(result: RecommendResult) -> Text | None:
    missing = [r for r in result.rows if r.pick is None and not r.unsupported]
    if not missing:
        return None
    lines = ["Nothing fits on as many devices as their machines join (node sizes and networks "]
    lines[0] += "in the profiles):"
    by_host = [r for r in missing if r.host_limited]
    if by_host:
        lines.append(
            "  fits in device memory only by offloading more than a node's host memory (GiB): "
            + ", ".join(_host_memory(r) for r in by_host)
        )
    by_device = [r for r in missing if not r.host_limited]
    for floor in sorted({r.floor_bytes or 0 for r in by_device}):
        names = ", ".join(
            f"{r.gpu} ({gib(r.capacity.capacity_bytes):.0f})"
            for r in by_device
            if (r.floor_bytes or 0) == floor
        )
        lines.append(f"  needs >= {_gib(floor)} GiB per device (allocated peak + context): {names}")
    return Text("\n".join(lines), style="yellow")


def _changes(result: RecommendResult) -> RenderableType:
    plan = result.gpu_plan or {}
    device, capacity = plan.get("device_bytes", 0), plan.get("gpu_capacity_bytes", 0)
    if plan.get("fits"):
        return Text(
            f"On {result.gpu}: FITS with the given layout, {_gib(device)} of {_gib(capacity)} GiB",
            style="bold green",
        )
    lines = [
        Text(
            f"On {result.gpu}: DOES NOT FIT with the given layout ({_gib(device)} GiB of "
            f"{_gib(capacity)}). Single changes, ranked by memory saved, each judged by plan():",
            style="bold red",
        )
    ]
    for rank, change in enumerate(result.changes, start=1):
        lines.append(_change_text(rank, change))
    return Group(*lines)


def _change_text(rank: int, change: Change) -> Text:
    pageable = change.device_bytes - change.required_bytes
    paged = f" ({_gib(pageable)} pageable)" if pageable else ""
    verdict = "FITS" if change.fits else "does not fit"
    text = Text(f"{rank:>2}. {change.change}: ")
    text.append(verdict, style="green" if change.fits else "red")
    machine = f" ({change.machine})" if change.machine else ""
    text.append(
        f", {_gib(change.device_bytes)} GiB{paged}{machine}, saves {_gib(change.saved_bytes)} "
        f"GiB\n    speed: {change.speed}\n    accuracy: {change.accuracy}"
    )
    return text


def render_recommend(result: RecommendResult, *, show_all: bool = False) -> RenderableType:
    counts = result.device_counts
    parts: list[RenderableType] = [
        Text(_setup_line(result.model, result.setup), style="bold"),
        Text(
            f"device counts searched: {', '.join(map(str, counts))} (each layout on the fewest "
            "that fit); per-device memory from plan() (reserved + CUDA context + paged state)"
            + (f"; {result.tokens:,} training tokens" if result.tokens is not None else "")
        ),
        *_rankings(result, show_all),
        _time_model(result),
        _by_purchase(result),
    ]
    for note in (_unsupported(result), _no_fit(result)):
        if note is not None:
            parts.append(note)
    if result.gpu is not None:
        parts.append(_changes(result))
    return Group(*parts)


def print_recommend(
    result: RecommendResult, console: Console | None = None, *, show_all: bool = False
) -> None:
    (console or stdout_console()).print(render_recommend(result, show_all=show_all))

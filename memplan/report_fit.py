"""Rich rendering of ``fit`` and ``recommend`` results (display only: every number comes from a
FitResult or RecommendResult)."""

from __future__ import annotations

from typing import Any, Final

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.fit import Boundary, Capacity, FitResult, FitTable, Point
from memplan.recommend import LAYOUT_LEGEND, Change, Pick, Recommendation, RecommendResult
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


def _estimate_cells(pick: Pick) -> list[str]:
    estimate = pick.estimate
    if estimate is None:
        return ["-", "-"]
    prefix = ">=" if pick.estimate_is_lower_bound else ""
    cost = "-" if estimate.cost_usd is None else f"{prefix}{estimate.cost_usd:,.0f}"
    return [f"{prefix}{estimate.hours:,.1f}", cost]


def _pick_table(
    title: str, result: RecommendResult, picks: list[tuple[Recommendation, Pick]]
) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["accelerator", "n x layout", "GiB/dev", "host", "$/hour"]
    if result.tokens is not None:
        columns += ["est. h", "est. $"]
    for col in columns:
        left = col in ("accelerator", "n x layout")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for row, pick in picks:
        approx = "" if pick.confirmed else "~"
        cells = [
            row.gpu + ("*" if row.dtype == "fp16" else ""),
            f"{pick.num_devices} x {pick.layout}",
            f"{approx}{gib(pick.device_bytes):.1f}",
            f"{gib(pick.host_bytes):.0f}" if pick.host_bytes else "-",
            _usd(pick.usd_per_hour),
        ]
        if result.tokens is not None:
            cells += _estimate_cells(pick)
        table.add_row(*cells)
    return table


def _rankings(result: RecommendResult) -> list[RenderableType]:
    fewest = [(r, r.fewest) for r in result.by_usd_per_hour if r.fewest is not None]
    out: list[RenderableType] = [
        _pick_table(
            "Fewest devices (n) that fit, ranked by cloud $/hour = n x cheapest $/GPU-hour "
            "(unpriced last)",
            result,
            fewest,
        )
    ]
    no_offload = [(r, r.without_offload) for r in result.by_usd_per_hour if r.without_offload]
    no_offload.sort(key=lambda rp: (rp[1].usd_per_hour is None, rp[1].usd_per_hour or 0.0))
    if no_offload:
        out.append(
            _pick_table(
                "Where the fewest devices need CPU offload: fewest without offload",
                result,
                no_offload,
            )
        )
    out.append(
        Text(
            f"GiB/dev: plan() device bytes per device (~: estimate); host: GiB of offloaded "
            "state in host memory per device; "
            f"*: no bf16 on this device, the run uses fp16 (same bytes). {LAYOUT_LEGEND}.",
            style="dim",
        )
    )
    return out


def _by_purchase(result: RecommendResult) -> Text:
    rows = {r.gpu: r for r in result.by_usd_per_hour}
    parts = []
    for rank, name in enumerate(result.by_purchase_usd, start=1):
        pick = rows[name].fewest
        assert pick is not None
        parts.append(f"{rank}. {name} ({pick.num_devices}) ${pick.purchase_usd or 0:,.0f}")
    body = "; ".join(parts) if parts else "no fitting accelerator has a purchase price"
    return Text(f"ranked by purchase price (devices x typical price): {body}")


def _no_fit(result: RecommendResult) -> Text | None:
    missing = [r for r in result.by_usd_per_hour if r.fewest is None]
    if not missing:
        return None
    floors = sorted({r.floor_bytes for r in missing})
    lines = [
        f"Nothing fits on up to {result.device_counts[-1]} devices (Apple silicon: one device) "
        "of these; the least any searched layout needs per device is its allocated peak + "
        "CUDA context (activations, temporaries and gathered layers are not sharded):"
    ]
    for floor in floors:
        names = ", ".join(
            f"{r.gpu} ({gib(r.capacity.capacity_bytes):.0f})"
            for r in missing
            if r.floor_bytes == floor
        )
        lines.append(f"  needs >= {_gib(floor)} GiB: {names}")
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
    text.append(
        f", {_gib(change.device_bytes)} GiB{paged}, saves {_gib(change.saved_bytes)} GiB\n"
        f"    speed: {change.speed}\n    accuracy: {change.accuracy}"
    )
    return text


def _estimate_note(result: RecommendResult) -> Text:
    return Text(
        f"Time and cost are estimates: {result.flops_per_token:,} FLOPs per token (6N for "
        "training, 8N with checkpointing, 4N + adapters for frozen bases, plus attention; "
        f"memplan.throughput) at {100 * result.utilisation_fraction:.0f}% of the dense 16-bit "
        "peak; communication and offload traffic are not modelled (>=: a lower bound).",
        style="dim",
    )


def render_recommend(result: RecommendResult) -> RenderableType:
    counts = result.device_counts
    parts: list[RenderableType] = [
        Text(_setup_line(result.model, result.setup), style="bold"),
        Text(
            f"device counts searched: {', '.join(map(str, counts))}; per-device memory from "
            "plan() (reserved + CUDA context + paged state)"
        ),
        *_rankings(result),
        _by_purchase(result),
    ]
    missing = _no_fit(result)
    if missing is not None:
        parts.append(missing)
    if result.tokens is not None:
        parts.append(_estimate_note(result))
    if result.gpu is not None:
        parts.append(_changes(result))
    return Group(*parts)


def print_recommend(result: RecommendResult, console: Console | None = None) -> None:
    (console or stdout_console()).print(render_recommend(result))

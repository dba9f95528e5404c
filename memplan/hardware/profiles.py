"""Accelerator profiles: memory, bandwidth, throughput and prices, loaded from shipped data.

One JSON file per accelerator lives in the top-level ``hardware_profiles/`` folder; the wheel ships
it as the package ``memplan.hardware_profiles``. Every number in a file carries its source: the
spec ``sources``, the exact ``usable_memory_bytes`` (what the driver reports, see
``usable_memory_basis``), and each price with its own source and date.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from memplan.errors import MemplanError

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = [
    "SOFTWARE_FEATURES",
    "CloudOffer",
    "HardwareProfile",
    "Node",
    "SoftwareFeature",
    "Support",
    "list_profiles",
    "load_profile",
    "profile_files",
]

_SLUG_PATTERN: Final = r"^[a-z0-9]+(?:[-.][a-z0-9]+)*$"
# An instance price divided by its GPU count must match the per-GPU price to a tenth of a cent.
_PER_GPU_PRICE_TOLERANCE_USD: Final = 0.001

Vendor = Literal["nvidia", "amd", "intel", "google", "apple"]
Kind = Literal["discrete", "unified-memory", "tpu"]
UsableMemoryBasis = Literal["nvidia-smi", "rocm-smi", "hl-smi", "metal", "derived"]
# Software a fine-tuning setup or layout may need, each a feature of one library as the
# accelerator's stack offers it (bitsandbytes' README lists features per backend).
SoftwareFeature = Literal[
    "bitsandbytes-4bit",  # NF4/FP4 Linear4bit: QLoRA
    "bitsandbytes-int8",  # LLM.int8() Linear8bitLt
    "bitsandbytes-optimizers",  # bitsandbytes optimizers: 8-bit AdamW, Lion
    "bitsandbytes-paged",  # paged optimizers (state in CUDA/HIP managed memory)
    "deepspeed",  # DeepSpeed ZeRO stages 1-3
    "deepspeed-offload",  # ZeRO-Offload / ZeRO-Infinity: state and step on the host CPU
    "fsdp",  # PyTorch FSDP (SHARD_GRAD_OP, FULL_SHARD)
    "flash-attn",  # the flash-attn 2 kernels (attn_implementation="flash_attention_2")
]
SOFTWARE_FEATURES: Final[tuple[SoftwareFeature, ...]] = get_args(SoftwareFeature)
# Node values that carry a number and so need a source.
_NODE_VALUES: Final = (
    "gpus_per_node",
    "host_memory_bytes",
    "host_link_bytes_per_s",
    "intra_node_bytes_per_s",
    "inter_node_bytes_per_s",
)


class CloudOffer(BaseModel):
    """One on-demand rental offer for this accelerator, with where and when the price was read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str = Field(min_length=1, description="Cloud or marketplace, e.g. 'AWS', 'Lambda'.")
    instance: str = Field(
        min_length=1, description="Instance type or product name as the provider lists it."
    )
    gpus_per_instance: PositiveInt = Field(description="Accelerators in one instance.")
    usd_per_hour: PositiveFloat = Field(description="On-demand price of the whole instance, USD/h.")
    usd_per_gpu_hour: PositiveFloat = Field(
        description="usd_per_hour / gpus_per_instance: the price of one accelerator-hour, USD."
    )
    source: str = Field(min_length=1, description="URL or document the price was read from.")
    date: dt.date = Field(
        description="Date the source states for the price (or the date it was read)."
    )

    @model_validator(mode="after")
    def _per_gpu_price_matches(self) -> CloudOffer:
        expected = self.usd_per_hour / self.gpus_per_instance
        if abs(expected - self.usd_per_gpu_hour) > _PER_GPU_PRICE_TOLERANCE_USD:
            raise ValueError(
                f"usd_per_gpu_hour={self.usd_per_gpu_hour} but usd_per_hour / gpus_per_instance "
                f"= {expected:.4f} for {self.provider} {self.instance}"
            )
        return self


class Support(BaseModel):
    """Whether one software feature runs on this accelerator, and where that is stated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    available: bool = Field(description="The feature runs on this accelerator's stack.")
    source: str = Field(min_length=1, description="Document that says so (URL and what it says).")


class Node(BaseModel):
    """The machine the accelerator is rented or bought in: how many share it, its host memory,
    and the links a training step uses (each number with its source in ``sources``).

    Bandwidths are per direction. ``intra_node_bytes_per_s`` is what one device can send to its
    peers in the node at once (NVLink/NVSwitch, Infinity Fabric, ICI, RoCE, or PCIe for cards
    without a device link); ``inter_node_bytes_per_s`` is the whole node's network, shared by its
    devices. A value no source publishes is null, and memplan plans conservatively without it:
    no host offload without ``host_memory_bytes``, no run across nodes without
    ``inter_node_bytes_per_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str = Field(min_length=1, description="The reference machine, e.g. 'AWS p5.48xlarge'.")
    gpus_per_node: PositiveInt = Field(description="Accelerators in one node.")
    host_memory_bytes: PositiveInt | None = Field(
        default=None, description="Host (CPU) memory of one node, bytes; null: unpublished."
    )
    host_link: str | None = Field(
        default=None, description="Host-device link of one accelerator, e.g. 'PCIe 5.0 x16'."
    )
    host_link_bytes_per_s: PositiveInt | None = Field(
        default=None, description="Host-device bandwidth of one accelerator, one direction."
    )
    intra_node_bytes_per_s: PositiveInt | None = Field(
        default=None,
        description="Collective bandwidth of one accelerator to its node peers, one direction; "
        "null exactly when the node has one accelerator.",
    )
    inter_node_bytes_per_s: PositiveInt | None = Field(
        default=None,
        description="Network bandwidth of one node to other nodes, one direction, all its NICs "
        "together; null: no multi-node system is published for this accelerator.",
    )
    sources: dict[str, str] = Field(
        description="Source of each value given, keyed by field name (system included)."
    )

    @model_validator(mode="after")
    def _sourced(self) -> Node:
        given = {"system"} | {name for name in _NODE_VALUES if getattr(self, name) is not None}
        missing = sorted(given - {k for k, v in self.sources.items() if v.strip()})
        if missing:
            raise ValueError(f"node values without a source: {', '.join(missing)}")
        extra = sorted(set(self.sources) - given)
        if extra:
            raise ValueError(f"sources for values the node does not give: {', '.join(extra)}")
        if (self.gpus_per_node == 1) != (self.intra_node_bytes_per_s is None):
            raise ValueError(
                f"intra_node_bytes_per_s must be null exactly when gpus_per_node is 1 "
                f"(gpus_per_node={self.gpus_per_node})"
            )
        if (self.host_link is None) != (self.host_link_bytes_per_s is None):
            raise ValueError("host_link and host_link_bytes_per_s must be given together")
        return self

    def collective_bytes_per_s(self, num_devices: int) -> int | None:
        """Per-device bandwidth of a ring over ``num_devices``; None when they cannot be joined.

        A ring within one node runs at the device link; across nodes every device also sends
        through the node's network, shared by the node's devices, and the slower link sets the
        pace (NCCL's rings cross each node boundary once per ring).
        """
        if num_devices <= 1:
            return None
        if num_devices <= self.gpus_per_node:
            return self.intra_node_bytes_per_s
        if self.inter_node_bytes_per_s is None:
            return None
        per_device = self.inter_node_bytes_per_s // self.gpus_per_node
        return min(per_device, self.intra_node_bytes_per_s or per_device)

    def spans(self, num_devices: int) -> bool:
        """Whether ``num_devices`` of this accelerator can be joined into one run."""
        return num_devices == 1 or self.collective_bytes_per_s(num_devices) is not None

    def devices_per_node(self, num_devices: int) -> int:
        """Devices of a ``num_devices`` run that share one node (nodes are filled first)."""
        return min(num_devices, self.gpus_per_node)


class HardwareProfile(BaseModel):
    """What one accelerator (one device as software sees it) offers a training run.

    Capacities are exact ``int`` bytes. ``memory_bytes`` is the vendor's headline capacity in the
    unit the vendor means (``memory_unit``); ``usable_memory_bytes`` is what the driver reports as
    the device total, which is what a plan must fit into (before the CUDA context and allocator).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_SLUG_PATTERN, description="Lowercase slug, equal to the file name.")
    display_name: str = Field(min_length=1, description="Product name as the vendor writes it.")
    vendor: Vendor = Field(description="Who makes the accelerator.")
    kind: Kind = Field(
        description="discrete: own device memory; unified-memory: shares system RAM with the "
        "CPU (Apple silicon); tpu: Google TPU, one chip."
    )
    aliases: tuple[str, ...] = Field(
        default=(), description="Other names users type for it, lowercase, e.g. '4090'."
    )
    memory_bytes: PositiveInt = Field(
        description="Headline memory capacity in bytes, as the vendor means it (see memory_unit)."
    )
    memory_unit: Literal["GB", "GiB"] = Field(
        description="What the vendor's 'GB' means for memory_bytes: GiB (2**30, JEDEC memory "
        "sizes: HBM/GDDR/LPDDR capacities) or GB (10**9)."
    )
    usable_memory_bytes: PositiveInt = Field(
        description="Device memory total that software sees (nvidia-smi / NVML memory.total, "
        "rocm-smi VRAM Total, hl-smi memory.total, Metal recommendedMaxWorkingSetSize), bytes."
    )
    usable_memory_basis: UsableMemoryBasis = Field(
        description="Where usable_memory_bytes comes from: a tool's report, or 'derived' "
        "(memory_note says how)."
    )
    memory_note: str = Field(
        min_length=1,
        description="How usable_memory_bytes was obtained (source of the report, or derivation) "
        "and what changes it (ECC, driver, OS limits).",
    )
    memory_type: str = Field(min_length=1, description="HBM3, GDDR6X, LPDDR5 ...")
    memory_bandwidth_bytes_per_s: PositiveInt = Field(
        description="Peak device-memory bandwidth from the vendor's datasheet, bytes/s."
    )
    bf16_tflops: PositiveFloat | None = Field(
        description="Dense (no 2:4 sparsity) bf16 matrix throughput with fp32 accumulation, "
        "TFLOP/s; null when unsupported or not published."
    )
    fp16_tflops: PositiveFloat | None = Field(
        description="Dense fp16 matrix throughput with fp32 accumulation (what mixed-precision "
        "training uses), TFLOP/s; null when not published."
    )
    fp8_tflops: PositiveFloat | None = Field(
        description="Dense fp8 matrix throughput, TFLOP/s; null where fp8 is unsupported."
    )
    compute_note: str = Field(
        default="",
        description="Where the TFLOP/s come from when not read straight off a datasheet.",
    )
    supports_bf16: bool = Field(
        description="bf16 arithmetic in hardware (False for Volta, Turing and older parts)."
    )
    interconnect: str = Field(
        min_length=1, description="Device-to-device link, e.g. 'NVLink 4 900 GB/s', 'PCIe 4.0 x16'."
    )
    gpu_share_fraction: float = Field(
        gt=0.0,
        le=1.0,
        description="Share of memory_bytes the accelerator may use by default: 1.0 for discrete "
        "devices; the OS GPU wired-memory limit for unified memory (macOS: ~0.75).",
    )
    purchase_price_usd: PositiveFloat | None = Field(
        default=None,
        description="Typical list or launch price of one unit, USD; null if unsourced.",
    )
    purchase_price_source: str | None = Field(
        default=None, description="URL or document the purchase price was read from."
    )
    purchase_price_date: dt.date | None = Field(
        default=None, description="Date the purchase-price source states (or was read)."
    )
    cloud: tuple[CloudOffer, ...] = Field(
        default=(), description="On-demand rental offers, each with its own source and date."
    )
    sources: tuple[str, ...] = Field(
        min_length=1, description="URLs or documents the specs were read from."
    )
    node: Node = Field(description="The machine it comes in: device count, host memory, links.")
    software: dict[SoftwareFeature, Support] = Field(
        description="Each software feature a setup may need: available or not, with its source."
    )

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        price_fields = (
            self.purchase_price_usd,
            self.purchase_price_source,
            self.purchase_price_date,
        )
        if any(v is None for v in price_fields) and any(v is not None for v in price_fields):
            raise ValueError(
                f"{self.name}: purchase_price_usd, purchase_price_source and purchase_price_date "
                "must be given together"
            )
        if not self.supports_bf16 and self.bf16_tflops is not None:
            raise ValueError(f"{self.name}: bf16_tflops={self.bf16_tflops} but supports_bf16=false")
        if self.kind != "unified-memory" and self.gpu_share_fraction != 1.0:
            raise ValueError(
                f"{self.name}: gpu_share_fraction={self.gpu_share_fraction} must be 1.0 for "
                f"kind={self.kind!r}"
            )
        if self.usable_memory_bytes > self.memory_bytes:
            raise ValueError(
                f"{self.name}: usable_memory_bytes={self.usable_memory_bytes} exceeds "
                f"memory_bytes={self.memory_bytes}"
            )
        if any(alias != alias.lower() or not alias for alias in self.aliases):
            raise ValueError(f"{self.name}: aliases must be non-empty lowercase: {self.aliases}")
        missing = [f for f in SOFTWARE_FEATURES if f not in self.software]
        if missing:
            raise ValueError(f"{self.name}: software lacks {', '.join(missing)}")
        return self

    def supports(self, feature: SoftwareFeature) -> bool:
        """Whether ``feature`` runs on this accelerator (see ``software``)."""
        return self.software[feature].available

    @property
    def cheapest_usd_per_gpu_hour(self) -> float | None:
        """Lowest per-accelerator hourly price among the cloud offers, or None without offers."""
        return min((offer.usd_per_gpu_hour for offer in self.cloud), default=None)


def _profiles_dir() -> Traversable:
    """The shipped profile folder: the source tree's own folder in a checkout (an editable
    install may map the package data to another checkout), else the installed package data."""
    source_tree = Path(__file__).resolve().parents[2] / "hardware_profiles"
    if (source_tree / "__init__.py").is_file():
        return source_tree
    try:
        return resources.files("memplan.hardware_profiles")
    except ModuleNotFoundError:  # neither installed nor a checkout: report the folder looked for
        return source_tree


def profile_files() -> Iterator[Traversable]:
    """Every ``*.json`` profile file shipped with memplan, sorted by name."""
    return iter(
        sorted(
            (entry for entry in _profiles_dir().iterdir() if entry.name.endswith(".json")),
            key=lambda entry: entry.name,
        )
    )


def _parse(entry: Traversable) -> HardwareProfile:
    try:
        profile = HardwareProfile.model_validate(json.loads(entry.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as exc:
        first_line = str(exc).splitlines()[0]
        raise MemplanError(f"hardware profile {entry.name}: {first_line}") from exc
    if entry.name != f"{profile.name}.json":
        raise MemplanError(f"hardware profile {entry.name} is named {profile.name!r} inside")
    return profile


@cache
def list_profiles() -> tuple[HardwareProfile, ...]:
    """All built-in hardware profiles, sorted by name."""
    return tuple(_parse(entry) for entry in profile_files())


@cache
def _index() -> dict[str, HardwareProfile]:
    index: dict[str, HardwareProfile] = {}
    for profile in list_profiles():
        for key in (profile.name, *profile.aliases):
            if key in index:
                raise MemplanError(
                    f"hardware name {key!r} is claimed by both {index[key].name} and {profile.name}"
                )
            index[key] = profile
    return index


def load_profile(name_or_alias: str) -> HardwareProfile:
    """The profile named ``name_or_alias`` (a name or an alias, case-insensitive).

    >>> load_profile("A100-80GB").name
    'a100-80gb-sxm'
    """
    key = name_or_alias.strip().lower()
    profile = _index().get(key)
    if profile is None:
        close = suggestions(key)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `memplan gpus`"
        raise MemplanError(f"unknown hardware {name_or_alias!r}{hint}")
    return profile


def has_profile(name_or_alias: str) -> bool:
    """Whether a profile has this name or alias."""
    return name_or_alias.strip().lower() in _index()


def suggestions(key: str, limit: int = 4) -> list[str]:
    """Profile names a mistyped name most likely means: those that contain it as a part
    (a100 -> a100-40gb-pcie, a100-80gb-sxm, ...), else the closest spellings."""
    names = sorted({p.name for p in _index().values()})
    parts = [n for n in names if (key and key in n.split("-")) or n.startswith(f"{key}-")]
    if parts:
        return parts[:limit]
    return difflib.get_close_matches(key, names, n=3, cutoff=0.6)

"""What the tracker knows about one tensor storage, and how that decides its category."""

from __future__ import annotations

from dataclasses import dataclass

from memplan._compat import StrEnum
from memplan.trace import Category, Phase

_MAX_SOURCE_DEPTH = 64


class Placement(StrEnum):
    """Where a storage would live on a GPU run."""

    DEVICE = "device"  # the CUDA caching allocator: what memory_allocated counts
    HOST = "host"  # CPU memory: torch keeps non-fused optimizers' `step` counters there
    PAGED = "paged"  # CUDA unified memory (bnb paged optimizers): outside the torch allocator


@dataclass(slots=True)
class StorageRecord:
    """One untyped storage: its first shape, its size, and the facts that decide its category.

    A storage keeps one category for its whole life, chosen by priority: weights (frozen,
    trainable, quantization state), gradients, optimizer state, logits, activations (saved for
    backward), temporaries.
    """

    index: int
    nbytes: int
    op: str
    module: str
    shape: tuple[int, ...]
    dtype: str
    phase: Phase
    step: int
    weight_category: Category | None = None
    is_gradient: bool = False
    is_optimizer_state: bool = False
    in_logits_window: bool = False
    is_saved: bool = False
    # FSDP's unsharded copy of a unit's parameters (all-gather output), a temporary even
    # while autograd saves it: it is freed when the unit reshards, whatever autograd holds.
    is_gathered: bool = False
    placement: Placement = Placement.DEVICE
    name: str = ""  # parameter / state name when known
    external: bool = False  # existed before it was first seen: no allocation, no free
    source: StorageRecord | None = None  # input it was computed from, outside any module

    @property
    def category(self) -> Category:
        if self.weight_category is not None:
            return self.weight_category
        if self.is_gathered:
            return Category.TEMPORARIES
        if self.is_gradient:
            return Category.GRADIENTS
        if self.is_optimizer_state:
            return Category.OPTIMIZER_STATE
        if self.in_logits_window:
            return Category.LOGITS
        if self.is_saved:
            return Category.ACTIVATIONS
        return Category.TEMPORARIES

    @property
    def owner(self) -> str:
        """The name, else the module, else the owner of the tensor it was computed from."""
        record: StorageRecord | None = self
        for _ in range(_MAX_SOURCE_DEPTH):
            if record is None:
                break
            if record.name or record.module:
                return record.name or record.module
            record = record.source
        return ""

    @property
    def label(self) -> str:
        """The parameter or state name if known, else ``owner/op`` of the allocation."""
        if self.name:
            return self.name
        owner = self.module or (self.source.owner if self.source is not None else "")
        return f"{owner}/{self.op}" if owner else self.op


@dataclass(frozen=True, slots=True)
class RawEvent:
    """A storage growing from ``old_nbytes`` to ``new_nbytes`` (0 = freed) while ``context`` ran."""

    record: int
    old_nbytes: int
    new_nbytes: int
    phase: Phase
    step: int
    context: str  # module running (forward) or layer being differentiated (backward)

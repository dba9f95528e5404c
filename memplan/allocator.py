"""A model of PyTorch's CUDA caching allocator: replay a trace, get reserved memory.

Mechanisms from ``c10/cuda/CUDACachingAllocator.cpp`` (defaults, no ``PYTORCH_CUDA_ALLOC_CONF``):

- every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
- requests up to 1 MiB (``kSmallSize``) use the small pool, larger ones the large pool;
- a new segment is ``cudaMalloc``-ed when no cached free block fits: 2 MiB for small requests
  (``kSmallBuffer``), 20 MiB for requests under 10 MiB (``kLargeBuffer``, ``kMinLargeAlloc``),
  otherwise the request rounded up to 2 MiB (``kRoundLarge``);
- the best-fitting free block (smallest that fits) is reused and split when the remainder is
  at least 512 bytes (small pool) or more than 1 MiB (large pool);
- freed blocks merge with free neighbours of the same segment; segments are never returned
  (no ``empty_cache``), so reserved memory only grows.

Reserved memory is the sum of segment sizes; its peak is what ``max_memory_reserved`` shows.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from memplan.trace import Category, Event

MIN_BLOCK_BYTES: Final = 512  # kMinBlockSize
SMALL_SIZE_BYTES: Final = 1 << 20  # kSmallSize: largest request served by the small pool
SMALL_BUFFER_BYTES: Final = 2 << 20  # kSmallBuffer: segment size of the small pool
LARGE_BUFFER_BYTES: Final = 20 << 20  # kLargeBuffer: segment for requests under 10 MiB
MIN_LARGE_ALLOC_BYTES: Final = 10 << 20  # kMinLargeAlloc
ROUND_LARGE_BYTES: Final = 2 << 20  # kRoundLarge: larger segments round up to 2 MiB


def round_size(num_bytes: int) -> int:
    """Block size the allocator hands out for a request (512-byte multiples)."""
    if num_bytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return -(-num_bytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def segment_size(block_bytes: int) -> int:
    """Size of the segment cudaMalloc-ed for a request no cached block can serve."""
    if block_bytes <= SMALL_SIZE_BYTES:
        return SMALL_BUFFER_BYTES
    if block_bytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_BUFFER_BYTES
    return -(-block_bytes // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES


def _splits(remaining: int, small: bool) -> bool:
    """Whether a cached block is split, leaving ``remaining`` bytes as a free block of its own:
    any remainder of a block (512 bytes) in the small pool, over 1 MiB in the large pool."""
    return remaining >= MIN_BLOCK_BYTES if small else remaining > SMALL_SIZE_BYTES


@dataclass(eq=False, slots=True)
class _Block:
    size: int
    segment: int
    offset: int
    small: bool
    allocated: bool = False
    prev: _Block | None = None
    next: _Block | None = None


@dataclass
class CachingAllocator:
    """Replays allocations and frees; tracks allocated and reserved bytes and their peaks."""

    allocated_bytes: int = 0
    reserved_bytes: int = 0
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    reserved_at_peak_allocated: int = 0
    num_segments: int = 0
    _free: dict[bool, list[tuple[int, int, int]]] = field(
        default_factory=lambda: {True: [], False: []}
    )
    _blocks: dict[tuple[int, int, int], _Block] = field(default_factory=dict)

    def malloc(self, num_bytes: int) -> _Block:
        size = round_size(num_bytes)
        small = size <= SMALL_SIZE_BYTES
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        # The best fit (smallest cached block, then lowest segment and offset), else a new segment.
        cached = i < len(pool)
        block = self._blocks.pop(pool.pop(i)) if cached else self._new_segment(size, small)
        rest_bytes = block.size - size
        if _splits(rest_bytes, small):
            rest = _Block(rest_bytes, block.segment, block.offset + size, small, False, block)
            rest.next = block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._add_free(rest)
        block.allocated = True
        self.allocated_bytes += block.size
        if self.allocated_bytes > self.peak_allocated_bytes:
            self.peak_allocated_bytes = self.allocated_bytes
            self.reserved_at_peak_allocated = self.reserved_bytes
        return block

    def malloc_and_free(self, num_bytes: int) -> None:
        """A block allocated and freed before anything else happens (a kernel's workspace).

        The split-off block merges straight back, so the pools end as they were, except that
        a request no cached block fits leaves its new segment behind as one free block.
        """
        size = round_size(num_bytes)
        small = size <= SMALL_SIZE_BYTES
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            block = self._new_segment(size, small)
            self._add_free(block)
            found = block.size
        else:
            found = pool[i][0]
        if not _splits(found - size, small):
            size = found  # not split: the whole block is handed out
        allocated = self.allocated_bytes + size
        if allocated > self.peak_allocated_bytes:
            self.peak_allocated_bytes = allocated
            self.reserved_at_peak_allocated = self.reserved_bytes

    def free(self, block: _Block) -> None:
        block.allocated = False
        self.allocated_bytes -= block.size
        before, after = block.prev, block.next
        if before is not None and not before.allocated:  # merge into the free block before
            self._remove_free(before)
            before.size += block.size
            before.next = after
            if after is not None:
                after.prev = before
            block = before
        if after is not None and not after.allocated:  # absorb the free block after
            self._remove_free(after)
            block.size += after.size
            block.next = after.next
            if after.next is not None:
                after.next.prev = block
        self._add_free(block)

    # -- internals -------------------------------------------------------------------------
    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_bytes = SMALL_BUFFER_BYTES if small else segment_size(size)
        self.num_segments += 1
        self.reserved_bytes += seg_bytes
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return _Block(seg_bytes, self.num_segments, 0, small)

    def _add_free(self, block: _Block) -> None:
        key = (block.size, block.segment, block.offset)
        bisect.insort(self._free[block.small], key)
        self._blocks[key] = block

    def _remove_free(self, block: _Block) -> None:
        key = (block.size, block.segment, block.offset)
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, key)]
        del self._blocks[key]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    reserved_at_peak_allocated_bytes: int
    num_segments: int


def replay(events: Iterable[Event]) -> ReplayResult:
    """Replay trace events through the allocator.

    Each positive event is one allocation. A negative event frees the most recent live
    allocation of the same category and size (traces carry no addresses); a free that matches
    none releases the category's most recent allocations until its bytes are covered.
    """
    allocator = CachingAllocator()
    live: dict[tuple[Category, int], list[tuple[int, _Block]]] = defaultdict(list)
    by_category: dict[Category, list[tuple[int, _Block]]] = defaultdict(list)
    released: set[int] = set()
    order = itertools.count()
    pending: Event | None = None  # an allocation whose block is decided by the next event
    for event in itertools.chain(events, (None,)):
        if pending is not None:
            if (
                event is not None
                and event.delta_bytes == -pending.delta_bytes
                and event.category is pending.category
            ):  # freed right away: the most recent live allocation of that size
                allocator.malloc_and_free(pending.delta_bytes)
                pending = None
                continue
            entry = (next(order), allocator.malloc(pending.delta_bytes))
            live[(pending.category, pending.delta_bytes)].append(entry)
            by_category[pending.category].append(entry)
            pending = None
        if event is None:
            break
        category = event.category
        if event.delta_bytes > 0:
            pending = event
            continue
        stack = live[(category, -event.delta_bytes)]
        while stack and stack[-1][0] in released:
            stack.pop()
        if stack:
            index, block = stack.pop()
            released.add(index)
            allocator.free(block)
            continue
        remaining = -event.delta_bytes
        pending_frees = by_category[category]
        while remaining > 0 and pending_frees:
            index, block = pending_frees.pop()
            if index in released:
                continue
            released.add(index)
            remaining -= block.size
            allocator.free(block)
    return ReplayResult(
        allocator.peak_allocated_bytes,
        allocator.peak_reserved_bytes,
        allocator.reserved_at_peak_allocated,
        allocator.num_segments,
    )

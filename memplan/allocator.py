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


@dataclass(eq=False, slots=True)
class _Block:
    size: int
    segment: int
    offset: int
    small: bool
    allocated: bool = False
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


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
        block = self._take_free(size, small) or self._new_segment(size, small)
        block = self._split(block, size)
        block.allocated = True
        self.allocated_bytes += block.size
        if self.allocated_bytes > self.peak_allocated_bytes:
            self.peak_allocated_bytes = self.allocated_bytes
            self.reserved_at_peak_allocated = self.reserved_bytes
        return block

    def free(self, block: _Block) -> None:
        block.allocated = False
        self.allocated_bytes -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                block = self._merge(block, neighbour)
        self._add_free(block)

    # -- internals -------------------------------------------------------------------------
    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        key = pool.pop(i)
        return self._blocks.pop(key)

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_bytes = SMALL_BUFFER_BYTES if small else segment_size(size)
        self.num_segments += 1
        self.reserved_bytes += seg_bytes
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return _Block(seg_bytes, self.num_segments, 0, small)

    def _split(self, block: _Block, size: int) -> _Block:
        remaining = block.size - size
        threshold_ok = remaining >= MIN_BLOCK_BYTES if block.small else remaining > SMALL_SIZE_BYTES
        if not threshold_ok:
            return block
        rest = _Block(
            remaining, block.segment, block.offset + size, block.small, prev=block, next=block.next
        )
        if block.next is not None:
            block.next.prev = rest
        block.next = rest
        block.size = size
        self._add_free(rest)
        return block

    def _merge(self, block: _Block, other: _Block) -> _Block:
        first, second = (block, other) if block.offset < other.offset else (other, block)
        first.size += second.size
        first.next = second.next
        if second.next is not None:
            second.next.prev = first
        return first

    def _add_free(self, block: _Block) -> None:
        key = block.key()
        bisect.insort(self._free[block.small], key)
        self._blocks[key] = block

    def _remove_free(self, block: _Block) -> None:
        key = block.key()
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, key)
        del pool[i]
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
    for event in events:
        category = event.category
        if event.delta_bytes > 0:
            entry = (next(order), allocator.malloc(event.delta_bytes))
            live[(category, event.delta_bytes)].append(entry)
            by_category[category].append(entry)
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
        pending = by_category[category]
        while remaining > 0 and pending:
            index, block = pending.pop()
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

"""The caching-allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan.allocator import CachingAllocator, _Block, replay, round_size, segment_size
from memplan.trace import Category, Event, Phase, allocation_bytes

KiB, MiB = 1024, 1024 * 1024
ACT, TMP, W = Category.ACTIVATIONS, Category.TEMPORARIES, Category.TRAINABLE_WEIGHTS


def _ev(delta: int, category: Category = ACT) -> Event:
    return Event(delta, category, Phase.FORWARD)


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "block"),
    [(1, 512), (511, 512), (512, 512), (513, 1024), (MiB + 1, MiB + 512), (0, 512)],
)
def test_round_size_is_512_byte_blocks(request_bytes: int, block: int) -> None:
    assert round_size(request_bytes) == block  # kMinBlockSize


@pytest.mark.parametrize(
    ("block", "segment"),
    [
        (512, 2 * MiB),  # small pool: kSmallBuffer
        (MiB, 2 * MiB),  # kSmallSize is still small
        (MiB + 512, 20 * MiB),  # large pool under kMinLargeAlloc: kLargeBuffer
        (10 * MiB - 512, 20 * MiB),
        (10 * MiB, 10 * MiB),  # from kMinLargeAlloc: round up to kRoundLarge (2 MiB)
        (10 * MiB + 512, 12 * MiB),
        (19 * MiB, 20 * MiB),
        (1000 * MiB + 1, 1002 * MiB),
    ],
)
def test_segment_size(block: int, segment: int) -> None:
    assert segment_size(block) == segment


# -- reuse, split, merge -------------------------------------------------------------------


def test_a_freed_block_is_reused_without_reserving_more() -> None:
    alloc = CachingAllocator()
    block = alloc.malloc(1000)
    assert (alloc.allocated_bytes, alloc.reserved_bytes) == (1024, 2 * MiB)
    alloc.free(block)
    assert (alloc.allocated_bytes, alloc.reserved_bytes) == (0, 2 * MiB)  # cached, not returned
    alloc.malloc(1000)
    assert (alloc.reserved_bytes, alloc.num_segments) == (2 * MiB, 1)


def test_small_pool_splits_any_remainder() -> None:
    alloc = CachingAllocator()
    alloc.malloc(512)  # a 2 MiB segment; the other 2 MiB - 512 stay free in it
    alloc.malloc(MiB)  # fits the remainder: no new segment
    assert (alloc.reserved_bytes, alloc.allocated_bytes) == (2 * MiB, MiB + 512)
    alloc.malloc(MiB)  # only 1 MiB - 512 left in the first segment: a second one
    assert (alloc.reserved_bytes, alloc.num_segments) == (4 * MiB, 2)


def test_large_pool_splits_only_remainders_over_1_mib() -> None:
    # 19 MiB rounds its segment up to 20 MiB; the 1 MiB left is not > kSmallSize, so the
    # block is handed out whole and counts as allocated (memory_allocated sums block sizes).
    whole = CachingAllocator()
    whole.malloc(19 * MiB)
    assert (whole.allocated_bytes, whole.reserved_bytes) == (20 * MiB, 20 * MiB)

    # 512 bytes less leaves 1 MiB + 512: split, and the remainder serves the next request.
    split = CachingAllocator()
    split.malloc(19 * MiB - 512)
    assert split.allocated_bytes == 19 * MiB - 512
    split.malloc(MiB + 512)
    assert (split.allocated_bytes, split.reserved_bytes, split.num_segments) == (
        20 * MiB,
        20 * MiB,
        1,
    )


def test_small_and_large_pools_do_not_share_blocks() -> None:
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(MiB))  # a free 2 MiB small segment
    alloc.malloc(MiB + 512)  # large request: the small pool cannot serve it
    assert (alloc.reserved_bytes, alloc.num_segments) == (22 * MiB, 2)


def test_freed_neighbours_merge_back_into_the_whole_segment() -> None:
    alloc = CachingAllocator()
    a = alloc.malloc(4 * MiB)  # 20 MiB segment: [a 4][16 free]
    b = alloc.malloc(4 * MiB)  # [a 4][b 4][12 free]
    c = alloc.malloc(4 * MiB)  # [a 4][b 4][c 4][8 free]
    alloc.free(a)
    alloc.free(c)  # [4 free][b 4][12 free]: no free block of 16 MiB yet
    alloc.free(b)  # merges with both neighbours: [20 free]
    alloc.malloc(20 * MiB)  # the whole segment again
    assert (alloc.reserved_bytes, alloc.num_segments, alloc.allocated_bytes) == (
        20 * MiB,
        1,
        20 * MiB,
    )


def test_without_merging_a_large_request_needs_a_new_segment() -> None:
    alloc = CachingAllocator()
    a = alloc.malloc(4 * MiB)
    alloc.malloc(4 * MiB)  # b stays allocated between a and the rest
    alloc.free(a)  # free: 4 MiB and 12 MiB, not adjacent
    alloc.malloc(16 * MiB)
    assert (alloc.reserved_bytes, alloc.num_segments) == (20 * MiB + 16 * MiB, 2)


def test_best_fit_takes_the_smallest_free_block_that_fits() -> None:
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(12 * MiB))  # a free 12 MiB segment
    alloc.free(alloc.malloc(16 * MiB))  # a free 16 MiB segment
    alloc.malloc(11 * MiB)  # takes the 12 MiB block (1 MiB left: not split)
    alloc.malloc(15 * MiB)  # so the 16 MiB block is still there for this one
    assert (alloc.reserved_bytes, alloc.num_segments) == (28 * MiB, 2)
    assert alloc.allocated_bytes == 12 * MiB + 16 * MiB


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 24 * MiB)), min_size=1, max_size=60))
def test_allocated_bytes_track_live_blocks_and_everything_merges_back(
    ops: list[tuple[bool, int]],
) -> None:
    alloc = CachingAllocator()
    live: list[_Block] = []
    for free_one, size in ops:
        if free_one and live:
            alloc.free(live.pop(size % len(live)))
        else:
            live.append(alloc.malloc(size))
        assert alloc.allocated_bytes == sum(b.size for b in live)
        assert alloc.reserved_bytes >= alloc.allocated_bytes
        assert alloc.peak_reserved_bytes == alloc.reserved_bytes  # segments are never released
    for block in live:
        alloc.free(block)
    assert alloc.allocated_bytes == 0
    # Every segment is one free block again (internal pools: small and large).
    assert sum(len(pool) for pool in alloc._free.values()) == alloc.num_segments


# -- replay of trace events ----------------------------------------------------------------


def test_replay_of_a_hand_made_trace() -> None:
    events = [
        _ev(1000),  # 1024 B block, new 2 MiB small segment.           reserved 2 MiB
        _ev(6 * MiB, W),  # new 20 MiB large segment, split: 14 MiB free.  reserved 22 MiB
        _ev(-1000),  # frees the 1024 B block (merges back into its segment)
        _ev(1000, TMP),  # reuses the small segment: nothing new
        _ev(12 * MiB + 1, TMP),  # 12 MiB + 512 from the 14 MiB block; 2 MiB - 512 left (split)
        _ev(5 * MiB),  # no free large block fits: new 20 MiB segment.    reserved 42 MiB
        _ev(-(12 * MiB + 1), TMP),  # freed; merges with its 2 MiB - 512 neighbour: 14 MiB free
        _ev(13 * MiB),  # best fit is the 14 MiB block; 1 MiB left is not split: 14 MiB held
    ]
    # Allocated after the last event: 6 MiB + 1024 + 5 MiB + 14 MiB, one more MiB than the
    # 13 MiB requested because the block was not split.
    result = replay(events)
    assert result.peak_allocated_bytes == 25 * MiB + 1024
    assert result.peak_reserved_bytes == 42 * MiB
    assert result.reserved_at_peak_allocated_bytes == 42 * MiB
    assert result.num_segments == 3
    # The trace itself counts rounded requests only: 6 MiB + 1024 + 5 MiB + 13 MiB.
    running, peak = 0, 0
    for e in events:
        sign = 1 if e.delta_bytes > 0 else -1
        running += sign * allocation_bytes(abs(e.delta_bytes))
        peak = max(peak, running)
    assert peak == 24 * MiB + 1024


def test_replay_frees_a_sum_of_allocations_when_no_single_one_matches() -> None:
    events = [
        _ev(3 * MiB),  # [3][17 free] in a 20 MiB segment
        _ev(3 * MiB),  # [3][3][14 free]
        _ev(-6 * MiB),  # no live 6 MiB allocation: release the latest ones until 6 MiB are freed
        _ev(18 * MiB),  # fits only because both were freed and merged
    ]
    result = replay(events)
    assert (result.num_segments, result.peak_reserved_bytes) == (1, 20 * MiB)


def test_replay_frees_by_category_and_size() -> None:
    events = [
        _ev(4 * MiB, W),  # segment 1: [w 4][16 free]
        _ev(4 * MiB, ACT),  # [w 4][a 4][12 free]
        _ev(-4 * MiB, ACT),  # frees the activation, not the weight: [w 4][16 free]
        _ev(16 * MiB, TMP),  # fits the merged 16 MiB: still one segment
    ]
    assert replay(events).num_segments == 1


@given(st.lists(st.integers(1, 30 * MiB), min_size=1, max_size=20), st.randoms())
def test_replay_never_reports_less_than_the_trace_peak(sizes: list[int], rnd: Random) -> None:
    events: list[Event] = []
    live: list[int] = []
    trace_peak = running = 0
    for size in sizes:
        events.append(_ev(size))
        live.append(size)
        running += allocation_bytes(size)
        trace_peak = max(trace_peak, running)
        if rnd.random() < 0.5:
            gone = live.pop(rnd.randrange(len(live)))
            events.append(_ev(-gone))
            running -= allocation_bytes(gone)
    result = replay(events)
    assert result.peak_allocated_bytes >= trace_peak
    assert result.peak_reserved_bytes >= result.peak_allocated_bytes


# -- a block freed as soon as it is allocated ------------------------------------------------


def _replay_block_by_block(events: list[Event]) -> tuple[int, int, int, int]:
    """The replay without its shortcut: every allocation gets a block, every free returns one."""
    alloc = CachingAllocator()
    live: dict[tuple[Category, int], list[_Block]] = {}
    for e in events:
        key = (e.category, abs(e.delta_bytes))
        if e.delta_bytes > 0:
            live.setdefault(key, []).append(alloc.malloc(e.delta_bytes))
        else:
            alloc.free(live[key].pop())
    return (
        alloc.peak_allocated_bytes,
        alloc.peak_reserved_bytes,
        alloc.reserved_at_peak_allocated,
        alloc.num_segments,
    )


def test_malloc_and_free_leaves_the_pools_as_they_were() -> None:
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(12 * MiB))  # one 20 MiB free block
    pools = {small: list(pool) for small, pool in alloc._free.items()}
    alloc.malloc_and_free(3 * MiB)
    assert alloc._free == pools
    assert (alloc.allocated_bytes, alloc.peak_allocated_bytes, alloc.num_segments) == (
        0,
        12 * MiB,
        1,
    )


def test_malloc_and_free_counts_the_whole_block_when_it_is_not_split() -> None:
    # A 20 MiB free block serving 19.5 MiB: the 0.5 MiB rest is not split off (large pool
    # splits only remainders over 1 MiB), so max_memory_allocated sees 20 MiB.
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(12 * MiB))
    alloc.peak_allocated_bytes = 0
    alloc.malloc_and_free(19 * MiB + 512 * KiB)
    assert alloc.peak_allocated_bytes == 20 * MiB


def test_malloc_and_free_without_a_cached_block_keeps_its_new_segment() -> None:
    alloc = CachingAllocator()
    alloc.malloc_and_free(30 * MiB)
    alloc.malloc_and_free(300 * KiB)
    assert alloc.num_segments == 2
    assert alloc.reserved_bytes == 30 * MiB + 2 * MiB
    assert alloc._free == {True: [(2 * MiB, 2, 0)], False: [(30 * MiB, 1, 0)]}


@given(
    st.lists(
        st.tuples(st.integers(1, 24 * MiB), st.sampled_from([ACT, TMP]), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    st.randoms(),
)
def test_replay_shortcut_for_immediate_frees_changes_nothing(
    allocations: list[tuple[int, Category, bool]], rnd: Random
) -> None:
    events: list[Event] = []
    live: list[Event] = []
    for size, category, immediate in allocations:
        events.append(_ev(size, category))
        if immediate:  # freed right away: replay's shortcut
            events.append(_ev(-size, category))
            continue
        live.append(events[-1])
        if rnd.random() < 0.4:
            gone = live.pop(rnd.randrange(len(live)))
            # frees the most recent live allocation of that category and size, as replay does
            events.append(_ev(-gone.delta_bytes, gone.category))
    result = replay(events)
    assert (
        result.peak_allocated_bytes,
        result.peak_reserved_bytes,
        result.reserved_at_peak_allocated_bytes,
        result.num_segments,
    ) == _replay_block_by_block(events)

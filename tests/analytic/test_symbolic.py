"""Sizes as polynomials in batch and sequence length: exact algebra or NotSymbolicError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan.analytic.symbolic import BATCH, SEQ_LEN, NotSymbolicError, Size, term_values
from memplan.trace import allocation_bytes


def _at(size: Size | int, batch: int, seq_len: int) -> int:
    if isinstance(size, int):
        return size
    arrays = np.array([batch]), np.array([seq_len])
    return int(sum(c * term_values(t, *arrays)[0] for t, c in size.terms.items()))


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**4),
    st.integers(1, 64),
    st.integers(1, 8192),
)
def test_rounded_polynomial_matches_allocation_bytes(
    a: int, c: int, d: int, batch: int, seq_len: int
) -> None:
    # a*b*s + c*b*s**2 + d: activations, eager attention scores and a constant.
    size = a * BATCH * SEQ_LEN + c * BATCH * SEQ_LEN * SEQ_LEN + d
    numeric = a * batch * seq_len + c * batch * seq_len**2 + d
    assert _at(size, batch, seq_len) == numeric
    assert _at(allocation_bytes(size), batch, seq_len) == allocation_bytes(numeric)
    assert _at(-allocation_bytes(size) + 7, batch, seq_len) == 7 - allocation_bytes(numeric)


def test_exact_divisions() -> None:
    tokens = BATCH * SEQ_LEN
    assert _at(tokens * 4096 // 4096, 3, 5) == 15
    assert _at(tokens * 4096 // SEQ_LEN, 3, 5) == 3 * 4096  # q.numel // seq_len
    with pytest.raises(NotSymbolicError):
        _ = tokens * 3 // 2
    with pytest.raises(NotSymbolicError):
        _ = BATCH // SEQ_LEN
    with pytest.raises(NotSymbolicError):
        _ = allocation_bytes(tokens) // 512


def test_cancellation_gives_an_integer() -> None:
    assert BATCH * 8 - 8 * BATCH == 0
    assert isinstance(BATCH + 5 - BATCH, int)


def test_only_comparisons_true_for_every_batch_and_length_are_answered() -> None:
    assert BATCH * SEQ_LEN > 0
    assert not (BATCH < 0)
    assert -allocation_bytes(BATCH) < 0
    assert bool(SEQ_LEN)
    for ambiguous in (lambda: BATCH - SEQ_LEN > 0, lambda: BATCH > SEQ_LEN, lambda: BATCH > 1):
        with pytest.raises(NotSymbolicError):
            ambiguous()
    with pytest.raises(NotSymbolicError):
        bool(BATCH - 1)


@pytest.mark.parametrize(
    "use", [int, lambda s: f"{s}", lambda s: [0][s], lambda s: range(s), lambda s: max(s, 4)]
)
def test_what_needs_numbers_raises(use) -> None:
    with pytest.raises((NotSymbolicError, TypeError)):
        use(BATCH * SEQ_LEN)


def test_equal_polynomials_are_equal_keys() -> None:
    assert {BATCH * SEQ_LEN * 2: "a"}[SEQ_LEN * BATCH + BATCH * SEQ_LEN] == "a"
    assert BATCH != SEQ_LEN
    assert BATCH != 1

"""Sizes as polynomials in the micro-batch and the sequence length, for sweeps.

Every tensor the step model allocates has a size that is a polynomial in ``batch`` and
``seq_len`` with integer coefficients (``batch * seq_len * hidden * 2``; eager attention's
``batch * heads * seq_len**2 * 4``), rounded up to the allocator's 512-byte blocks. Running
the step model once with :data:`BATCH` and :data:`SEQ_LEN` in place of numbers gives a trace
whose events hold :class:`Size` expressions; :mod:`memplan.analytic.sweep` evaluates it for
many (batch, seq_len) pairs at once.

Only what keeps the answer exact is defined: sums, products, exact divisions and the
allocator's rounding. Anything else (a comparison whose outcome depends on the numbers, an
inexact division, ``int()``) raises :class:`NotSymbolicError`, and the caller falls back to
numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple, cast

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Numbers = npt.NDArray[np.int64] | npt.NDArray[np.float64]

Monomial = tuple[int, int]  # exponents of (batch, seq_len)


class Rounded(NamedTuple):
    """A polynomial (non-negative coefficients) rounded up to a multiple of ``granularity``,
    times the monomial ``factor`` (a kernel's length padded to whole blocks, times the batch)."""

    granularity: int
    poly: tuple[tuple[Monomial, int], ...]  # (monomial, coefficient), sorted
    factor: Monomial = (0, 0)


Term = Monomial | Rounded


class NotSymbolicError(Exception):
    """The step model did something with a size that only numbers can answer."""


def _normalize(terms: dict[Term, int]) -> Size | int:
    terms = {t: c for t, c in terms.items() if c}
    if not terms:
        return 0
    if len(terms) == 1 and (0, 0) in terms:
        return terms[(0, 0)]
    return Size(terms)


class Size:
    """sum(coefficient * term): a byte or element count over ``batch`` and ``seq_len`` >= 1.

    Every term is positive for positive batch and sequence lengths (monomials, and rounded
    polynomials with non-negative coefficients), so the sign of a size is known when all its
    coefficients share a sign.
    """

    __slots__ = ("_hash", "terms")

    def __init__(self, terms: dict[Term, int]) -> None:
        self.terms = terms
        self._hash = hash(frozenset(terms.items()))

    # -- algebra ---------------------------------------------------------------------------
    def __add__(self, other: object) -> Size | int:
        if isinstance(other, int):
            other = {(0, 0): other}
        elif isinstance(other, Size):
            other = other.terms
        else:
            return NotImplemented
        out = dict(self.terms)
        for term, coef in other.items():
            out[term] = out.get(term, 0) + coef
        return _normalize(out)

    __radd__ = __add__

    def __neg__(self) -> Size:
        return Size({t: -c for t, c in self.terms.items()})

    def __sub__(self, other: object) -> Size | int:
        if not isinstance(other, (int, Size)):
            return NotImplemented
        return self + (-other)

    def __rsub__(self, other: object) -> Size | int:
        if not isinstance(other, int):
            return NotImplemented
        return -self + other

    def __mul__(self, other: object) -> Size | int:
        if isinstance(other, int):
            return _normalize({t: c * other for t, c in self.terms.items()})
        if not isinstance(other, Size):
            return NotImplemented
        if not (self.is_polynomial and other.is_polynomial):
            return self._times_rounded(other)
        out: dict[Term, int] = {}
        for (bi, si), c in self._monomials():
            for (bj, sj), d in other._monomials():
                key = (bi + bj, si + sj)
                out[key] = out.get(key, 0) + c * d
        return _normalize(out)

    __rmul__ = __mul__

    def __floordiv__(self, other: object) -> Size | int:
        """Exact division only: by an integer dividing every coefficient, or by a monomial."""
        if not self.is_polynomial:
            raise NotSymbolicError("division of a rounded size")
        if isinstance(other, int):
            if other == 0 or any(c % other for c in self.terms.values()):
                raise NotSymbolicError(f"inexact division by {other}")
            return _normalize({t: c // other for t, c in self.terms.items()})
        if isinstance(other, Size) and len(other.terms) == 1:
            ((term, coef),) = other.terms.items()
            if isinstance(term, Rounded) or coef != 1:
                raise NotSymbolicError("division by a non-monomial size")
            db, ds = term
            out: dict[Term, int] = {}
            for (b, s), c in self._monomials():
                if b < db or s < ds:
                    raise NotSymbolicError("inexact division by a monomial")
                out[(b - db, s - ds)] = c
            return _normalize(out)
        raise NotSymbolicError("division by a size")

    def _times_rounded(self, other: Size) -> Size | int:
        """A product with rounded terms: exact when one side is a single monomial (its factor
        moves into each rounded term); a product of two rounded sizes is not a polynomial."""
        for mono, rest in ((self, other), (other, self)):
            if mono.is_polynomial and len(mono.terms) == 1:
                ((m, coef),) = mono.terms.items()
                assert not isinstance(m, Rounded)
                out: dict[Term, int] = {}
                for term, c in rest.terms.items():
                    if isinstance(term, Rounded):
                        f = (term.factor[0] + m[0], term.factor[1] + m[1])
                        key: Term = term._replace(factor=f)
                    else:
                        key = (term[0] + m[0], term[1] + m[1])
                    out[key] = out.get(key, 0) + c * coef
                return _normalize(out)
        raise NotSymbolicError("product of rounded sizes")

    def round_up(self, granularity: int) -> Size:
        """``-(-self // granularity) * granularity``, kept as a term of its own; a size whose
        every term is already a whole multiple of ``granularity`` is its own rounding."""
        if not self.is_positive:
            raise NotSymbolicError("rounding a size that may be negative")
        if all(
            (c * t.granularity if isinstance(t, Rounded) else c) % granularity == 0
            for t, c in self.terms.items()
        ):
            return self
        if not self.is_polynomial:
            raise NotSymbolicError("rounding a rounded size")
        return Size({Rounded(granularity, tuple(sorted(self._monomials()))): 1})

    def _monomials(self) -> list[tuple[Monomial, int]]:
        if not self.is_polynomial:
            raise NotSymbolicError("product or division of a rounded size")
        return [(t, c) for t, c in self.terms.items() if not isinstance(t, Rounded)]

    @property
    def is_polynomial(self) -> bool:
        return not any(isinstance(t, Rounded) for t in self.terms)

    @property
    def is_positive(self) -> bool:
        return all(c > 0 for c in self.terms.values())

    # -- comparisons: only those whose answer holds for every batch and length -------------
    def _sign(self) -> int:
        if all(c > 0 for c in self.terms.values()):
            return 1
        if all(c < 0 for c in self.terms.values()):
            return -1
        raise NotSymbolicError("the sign of this size depends on batch and sequence length")

    def _compare_zero(self, other: object) -> int:
        if other != 0 or isinstance(other, Size):
            raise NotSymbolicError("comparison of sizes")
        return self._sign()

    def __gt__(self, other: object) -> bool:
        return self._compare_zero(other) > 0

    def __ge__(self, other: object) -> bool:
        return self._compare_zero(other) > 0

    def __lt__(self, other: object) -> bool:
        return self._compare_zero(other) < 0

    def __le__(self, other: object) -> bool:
        return self._compare_zero(other) < 0

    def __bool__(self) -> bool:
        self._sign()  # a size whose sign is known is never zero
        return True

    # Structural equality: sizes as cache keys (two layers with the same incoming gradient).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Size) and self.terms == other.terms

    def __hash__(self) -> int:
        return self._hash

    def __int__(self) -> int:
        raise NotSymbolicError("int() of a size")

    def __index__(self) -> int:
        raise NotSymbolicError("a size used as an index")

    def __format__(self, spec: str) -> str:
        raise NotSymbolicError("a size formatted into text")

    def __repr__(self) -> str:
        return f"Size({self.terms!r})"


def term_values(term: Term, batch: Numbers, seq_len: Numbers) -> Numbers:
    """One term at every (batch, seq_len) pair (numpy arrays of one length)."""
    if isinstance(term, Rounded):
        value = batch * 0
        for monomial, coef in term.poly:
            value = value + coef * term_values(monomial, batch, seq_len)
        rounded = -(-value // term.granularity) * term.granularity
        return rounded * term_values(term.factor, batch, seq_len)
    b, s = term
    return batch**b * seq_len**s


def value_at(count: Count, batch: int, seq_len: int) -> int:
    """``count`` at one (batch, seq_len): for a quantity every shape gives the same value (a
    head size recovered from a tensor's elements), one point is the answer."""
    if type(count) is int:
        return count
    import numpy as np

    b, s = np.array([batch]), np.array([seq_len])
    terms = count.terms  # type: ignore[attr-defined]
    return int(sum(c * term_values(t, b, s)[0] for t, c in terms.items()))


def ceil_to(count: Count, multiple: int) -> Count:
    """``count`` rounded up to a whole number of ``multiple`` (a kernel's block padding), exact
    for numbers and for symbolic sizes alike."""
    if type(count) is int:
        return -(-count // multiple) * multiple
    return cast(Count, count.round_up(multiple))  # type: ignore[attr-defined]


Count = int
"""An element or byte count in the step model's signatures. In a symbolic trace it holds a
:class:`Size` instead (the builders' arithmetic is the same); only :mod:`.sweep` evaluates it."""

BATCH: Final[Count] = cast(Count, Size({(1, 0): 1}))
SEQ_LEN: Final[Count] = cast(Count, Size({(0, 1): 1}))

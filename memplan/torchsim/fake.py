"""Fake tensors for tracing: ``FakeTensorMode``, plus placeholder values for reads.

Fake tensors carry shapes and dtypes but no values. A program that reads one back to Python
(``.item()``, e.g. torch's Adafactor scaling its step by the parameter's RMS) cannot run on
them; such a read returns 1 here and is counted, so the caller can say so. Only a read that
decides an allocation's size or a branch could change the trace; the optimizers' scalar reads
do neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

_READ = torch.ops.aten._local_scalar_dense.default


class PlaceholderReads(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Answers value reads of fake tensors with 1 (True, 1, 1.0), counting them."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reads = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is _READ and isinstance(args[0], FakeTensor):
            self.reads += 1
            dtype = args[0].dtype
            if dtype is torch.bool:
                return True
            return 1.0 if dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


@contextmanager
def fake_tensors() -> Iterator[PlaceholderReads]:
    """Everything created inside is fake; real constants that meet fake tensors become fake."""
    with FakeTensorMode(allow_non_fake_inputs=True), PlaceholderReads() as reads:
        yield reads

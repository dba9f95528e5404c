"""Fake tensors for tracing: ``FakeTensorMode``, plus placeholder values for reads.

Fake tensors carry shapes and dtypes but no values. A program that reads one back to Python
(``.item()``, e.g. torch's Adafactor scaling its step by the parameter's RMS) cannot run on
them; such a read returns 1 here and is counted, so the caller can say so. Only a read that
decides an allocation's size or a branch could change the trace; the optimizers' scalar reads
do neither.

torch's meta kernel for ``_grouped_mm`` (the MoE experts' grouped matmul) checks the dtype of
CUDA's CUTLASS fast path (bf16 only); the CPU kernel and CUDA's fallback
(``aten/src/ATen/native/cuda/GroupedBlas.cpp``: ``_grouped_mm_fallback``) take any float
dtype, so fake tensors get the same output for every dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._meta_registrations import _create_grouped_mm_output_tensor
from torch._subclasses.fake_impls import register_op_impl
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, in_kernel_invocation_manager
from torch.utils._python_dispatch import TorchDispatchMode

_READ = torch.ops.aten._local_scalar_dense.default


@register_op_impl(torch.ops.aten._grouped_mm.default)
def _grouped_mm(
    fake_mode: FakeTensorMode,
    func: Any,
    mat_a: FakeTensor,
    mat_b: FakeTensor,
    offs: FakeTensor | None = None,
    bias: FakeTensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> FakeTensor:
    """The output ``_grouped_mm`` allocates (``create_grouped_gemm_output_tensor``)."""
    dtype = out_dtype or mat_a.dtype
    with in_kernel_invocation_manager(fake_mode):
        out = _create_grouped_mm_output_tensor(mat_a, mat_b, offs, dtype)  # type: ignore[no-untyped-call]
    return FakeTensor(fake_mode, out, mat_a.device)


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

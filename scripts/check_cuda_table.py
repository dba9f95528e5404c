"""Check memplan.torchsim.cuda_kernels against the CUDA build of torch, without a GPU.

The CUDA build creates fake CUDA tensors on a machine without a GPU and runs the forward meta
kernels CUDA dispatches to; each table entry's fake CPU kernel must return the same dtypes and
shapes. Run with a CUDA build of torch (the CPU build has no CUDA dispatch keys):

    PYTHONPATH=. /path/to/cuda-torch/bin/python scripts/check_cuda_table.py

Exit status 0 when every entry agrees, 1 otherwise, 2 when torch has no CUDA compiled in.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memplan.torchsim import cuda_kernels as ck

aten = torch.ops.aten
B, H, S, D, HIDDEN = 2, 4, 72, 64, 256


def _meta(out: Any) -> list[tuple[tuple[int, ...], torch.dtype] | None]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else None for o in outs]


def _on(device: str, build: Callable[[str], Any]) -> Any:
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _meta(build(device))


def _qkv(device: str) -> tuple[torch.Tensor, ...]:
    # (B, S, H, D) in memory, seen as (B, H, S, D): the layout transformers hands SDPA.
    return tuple(
        torch.empty(B, S, H, D, dtype=torch.bfloat16, device=device).transpose(1, 2)
        for _ in range(3)
    )


def _kernel(handler: Callable[..., Any], *args: Any) -> Any:
    return handler(args, {}, lambda: None)


CHECKS: dict[str, tuple[Callable[[str], Any], Callable[[str], Any]]] = {
    "native_dropout (mask)": (
        lambda d: aten.native_dropout(torch.empty(B, S, HIDDEN, device=d), 0.1, True),
        lambda d: aten.native_dropout(torch.empty(B, S, HIDDEN), 0.1, True),
    ),
    "native_layer_norm (bf16 statistics)": (
        lambda d: aten.native_layer_norm(
            torch.empty(B, S, HIDDEN, dtype=torch.bfloat16, device=d), [HIDDEN], None, None, 1e-5
        ),
        lambda d: _kernel(
            ck._layer_norm, torch.empty(B, S, HIDDEN, dtype=torch.bfloat16), [HIDDEN]
        ),
    ),
    "_scaled_dot_product_flash_attention": (
        lambda d: aten._scaled_dot_product_flash_attention(*_qkv(d), 0.0, True),
        lambda d: _kernel(ck._flash_forward, *_qkv("cpu"), 0.0, True),
    ),
    "_scaled_dot_product_efficient_attention (logsumexp padded)": (
        lambda d: aten._scaled_dot_product_efficient_attention(*_qkv(d), None, True, 0.0, True),
        lambda d: aten._scaled_dot_product_efficient_attention(*_qkv("cpu"), None, True, 0.0, True),
    ),
}


def main() -> int:
    if not torch.backends.cuda.is_built():
        print("torch has no CUDA compiled in: install a CUDA build to check", file=sys.stderr)
        return 2
    failures = 0
    for name, (cuda_op, table_op) in CHECKS.items():
        cuda, table = _on("cuda", cuda_op), _on("cpu", table_op)
        same = [c == t for c, t in zip(cuda, table, strict=False) if c is not None]
        ok = all(same) and len([c for c in cuda if c]) <= len([t for t in table if t])
        failures += not ok
        print(f"{'OK  ' if ok else 'DIFF'} {name}\n     cuda:  {cuda}\n     table: {table}")
    print(f"{len(CHECKS) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The CUDA kernel table against the CUDA build's fake CUDA tensors (scripts/check_cuda_table.py).

Runs only where torch has CUDA compiled in (a GPU is not needed); CI installs the CPU build.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(
        not torch.backends.cuda.is_built(),
        reason="needs a CUDA build of torch (fake CUDA tensors); this one is CPU-only",
    ),
]

SCRIPT = Path(__file__).parents[2] / "scripts" / "check_cuda_table.py"


def test_every_table_entry_matches_the_cuda_kernel() -> None:
    spec = importlib.util.spec_from_file_location("check_cuda_table", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0

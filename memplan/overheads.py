"""Named overhead terms outside the tensors a training step allocates.

Each is listed in the README's "Assumptions" section and reported separately from the
allocated breakdown, so a measured run can confirm or correct it.
"""

from __future__ import annotations

from typing import Final

from memplan.units import MiB

# CUDA context: driver state and the kernels torch and cuBLAS load (lazily, CUDA_MODULE_LOADING=LAZY
# since CUDA 11.7). NVML sees it; torch.cuda counters do not. (torch takes cuBLAS's workspace from
# its caching allocator, so that one is in memory_allocated; measured runs record it as
# allocated_at_start_bytes.) Typical NVML readings after torch.cuda.init() plus a first matmul
# on A100/H100 with CUDA 12 and torch 2.x are 400-600 MiB; memplan uses 512 MiB until a measured
# value replaces it (`memplan verify` judges a run with the context that run measured).
CUDA_CONTEXT_BYTES: Final = 512 * MiB

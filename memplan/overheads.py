"""Named overhead terms outside the tensors a training step allocates.

Each is listed in the README's "Assumptions" section and reported separately from the
allocated breakdown, so a measured run can confirm or correct it.
"""

from __future__ import annotations

from typing import Final

from memplan.units import MiB

# CUDA context: driver state, the kernels torch and cuBLAS load (lazily, CUDA_MODULE_LOADING=LAZY
# since CUDA 11.7) and the cuBLAS/cuBLASLt workspaces. NVML sees it; torch.cuda counters do not.
# Typical NVML readings after torch.cuda.init() plus a first matmul on A100/H100 with CUDA 12 and
# torch 2.x are 400-600 MiB; memplan uses 512 MiB until a measured value replaces it.
CUDA_CONTEXT_BYTES: Final = 512 * MiB

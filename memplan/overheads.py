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

# NCCL communicators: each allocates its channels' send/receive buffers (NCCL_BUFFSIZE per
# protocol, per peer connection, per channel) and its own state with cudaMalloc/cuMem, outside
# torch's caching allocator: nvidia-smi sees them, torch.cuda counters do not. Measured
# through PyTorch on 4 A100s with NVLink after a first all-reduce: 544 MiB for a 2-rank
# communicator, 688 MiB for 3 or 4 ranks (NVIDIA/nccl#964); the memory grows with the
# channels NCCL opens for the link's bandwidth and stops growing beyond 2 nodes (nccl#986).
NCCL_PAIR_COMMUNICATOR_BYTES: Final = 544 * MiB
NCCL_COMMUNICATOR_BYTES: Final = 688 * MiB


def communicator_bytes(group_sizes: list[int]) -> int:
    """NCCL's device memory for one rank's communicators, one per process group (its size)."""
    return sum(
        NCCL_PAIR_COMMUNICATOR_BYTES if size == 2 else NCCL_COMMUNICATOR_BYTES
        for size in group_sizes
        if size > 1
    )

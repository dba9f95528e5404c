"""Trace real PyTorch training steps on fake or CPU tensors (extra: torch).

This package imports torch; the rest of memplan never does.

    >>> from memplan.catalog import load_model
    >>> from memplan.specs import TrainingSetup
    >>> result = trace_step(load_model("tiny-llama"), TrainingSetup(method="lora", seq_len=32))
    >>> result.num_trainable_params, result.trace.peak().phase.value
    (7168, 'backward')
"""

from memplan.torchsim.mem_tracker import MemTrackerComparison, measure_with_torch_mem_tracker
from memplan.torchsim.records import Placement, StorageRecord
from memplan.torchsim.runner import Mode, RunRequest
from memplan.torchsim.step import TraceResult, trace_step
from memplan.torchsim.tracker import MemoryTracker

__all__ = [
    "MemTrackerComparison",
    "MemoryTracker",
    "Mode",
    "Placement",
    "RunRequest",
    "StorageRecord",
    "TraceResult",
    "measure_with_torch_mem_tracker",
    "trace_step",
]

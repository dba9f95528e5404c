"""Trace real PyTorch training steps on fake or CPU tensors (extra: torch).

This package imports torch; the rest of memplan never does.
"""

from memplan.torchsim.records import Placement, StorageRecord
from memplan.torchsim.step import TraceResult, trace_step
from memplan.torchsim.tracker import MemoryTracker

__all__ = ["MemoryTracker", "Placement", "StorageRecord", "TraceResult", "trace_step"]

"""Measured runs: the records (torch-free) and the CUDA runner (``memplan.measure.cuda``)."""

from memplan.measure.records import Environment, MeasuredRun, OutOfMemory, PhaseSample, ResultsFile

__all__ = ["Environment", "MeasuredRun", "OutOfMemory", "PhaseSample", "ResultsFile"]

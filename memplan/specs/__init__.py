"""Validated inputs of a plan: the model, the training setup and the parallel layout."""

from memplan.specs.model import Family, ModelSpec
from memplan.specs.parallel import FSDPStrategy, Offload, ParallelSetup, Sharding
from memplan.specs.training import (
    ALL_LINEAR,
    Attention,
    LinearRole,
    LossKind,
    Method,
    Objective,
    Optimizer,
    OptimizerImpl,
    Precision,
    RefModel,
    TrainingSetup,
)

__all__ = [
    "ALL_LINEAR",
    "Attention",
    "FSDPStrategy",
    "Family",
    "LinearRole",
    "LossKind",
    "Method",
    "ModelSpec",
    "Objective",
    "Offload",
    "Optimizer",
    "OptimizerImpl",
    "ParallelSetup",
    "Precision",
    "RefModel",
    "Sharding",
    "TrainingSetup",
]

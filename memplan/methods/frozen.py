"""Forward only (inference or evaluation): nothing trains, nothing is saved for backward."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.methods.base import TuningMethod

if TYPE_CHECKING:
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class Frozen(TuningMethod):
    name = "frozen"
    summary = "forward pass only (inference / evaluation)"
    rank = 90
    trains_weights = False

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return ["forward only under torch.no_grad(): nothing saved for backward, no optimizer"]


METHOD = Frozen()

"""What a training stack is: the defaults one project's training loop gives a run.

A stack module (``memplan/stacks/<name>.py``) binds ``STACK`` to an instance of a
:class:`TrainingStack` subclass. The instance says which values its project gives the setup
fields that decide memory (load dtype, adapter dtype, k-bit preparation, loss, optimizer,
FSDP units, ...) when the user does not set them, each value with the file of that project it
comes from. An explicit field always wins over the stack; the stack wins over the method's
typical setup (``TuningMethod.defaults``), which fills what is left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from memplan.methods.base import TuningMethod


@dataclass(frozen=True, slots=True)
class Default:
    """A value a stack gives a field, and where in the stack's source it comes from."""

    value: Any
    source: str


@dataclass(frozen=True, slots=True)
class Request:
    """What a stack's defaults may depend on: the method and whether weights are quantized."""

    method: TuningMethod
    quantized: bool
    accumulates: bool = False  # gradient accumulation over several micro-batches

    @property
    def adapters(self) -> bool:
        """The method adds adapter tensors (LoRA and its relatives, bottleneck adapters)."""
        return self.method.uses_lora or self.method.name == "adapter"


class TrainingStack:
    """A training stack; the base class sets nothing (every field keeps its own default)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line: the project and the entry point its defaults come from."""
    rank: ClassVar[int] = 100
    """Position in lists of stacks (lower first)."""
    not_modelled: ClassVar[tuple[str, ...]] = ()
    """Memory features the stack uses that memplan does not model, each with the side the
    answer errs on (shown in the assumptions)."""

    def defaults(self, request: Request) -> Mapping[str, Default]:
        """TrainingSetup fields this stack sets for ``request`` (fields the user leaves out)."""
        return {}

    def parallel_defaults(self) -> Mapping[str, Default]:
        """ParallelSetup fields this stack sets when the run is sharded."""
        return {}

"""The training loop every source follows: one optimizer step as Hugging Face Trainer runs it.

The analytical step (:mod:`memplan.analytic.predict`), the tracer's session
(:mod:`memplan.torchsim.session`) and the measured runner (:mod:`memplan.measure.cuda`) all
read the loop from here. For every micro-batch: a forward with ``labels`` (the model computes
logits and the shifted cross-entropy), the output object dropped so only the loss survives,
``loss.backward()``; then ``optimizer.step()`` (optimizer state is created lazily on the first
step) and ``optimizer.zero_grad(set_to_none=True)``. No KV cache is kept (``use_cache=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memplan.specs.training import TrainingSetup

STEPS: Final = 2
"""Optimizer steps traced: the first creates the optimizer state, the second is steady state."""


@dataclass(frozen=True, slots=True)
class TrainingLoop:
    """One optimizer step of a setup."""

    micro_batches: int  # forward + backward passes accumulated into one optimizer step
    trains: bool  # False: forward only under torch.no_grad() (no backward, no optimizer)
    grad_ckpt: bool  # activation checkpointing of the layers

    @classmethod
    def of(cls, setup: TrainingSetup) -> TrainingLoop:
        return cls(setup.grad_accum_steps, setup.trains_weights, setup.grad_ckpt)

    @property
    def input_embeddings_require_grad(self) -> bool:
        """transformers' gradient_checkpointing_enable turns on enable_input_require_grads, so
        checkpointed layers get an input that requires grad even when the embedding is frozen."""
        return self.grad_ckpt and self.trains

    @property
    def distinct_micro_batches(self) -> tuple[bool, ...]:
        """The kinds of micro-batch a step runs, by whether it accumulates into an existing
        ``.grad``: the first creates the gradients, later ones (if any) add into them."""
        return (False, True)[: min(self.micro_batches, 2)]

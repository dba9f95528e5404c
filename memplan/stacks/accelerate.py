"""A plain accelerate loop (accelerate/accelerator.py, utils/dataclasses.py).

Accelerator(mixed_precision=None) is "no" unless configured: the model trains in the dtype it
was loaded in (transformers 5 from_pretrained: "auto", bf16 for Llama checkpoints), no
autocast; checkpointing and the optimizer are the script's.
"""

from __future__ import annotations

from collections.abc import Mapping

from memplan.stacks.base import Default, Request, TrainingStack

_BF16 = Default("bf16", "accelerate Accelerator mixed_precision='no'; from_pretrained dtype='auto'")


class Accelerate(TrainingStack):
    name = "accelerate"
    summary = "a plain accelerate loop (no mixed precision unless configured)"
    rank = 80

    def defaults(self, request: Request) -> Mapping[str, Default]:
        return {"precision": _BF16}


STACK = Accelerate()

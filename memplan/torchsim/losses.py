"""Losses other than the model's own, run as the training stacks run them.

``loss=chunked`` is torchtune's ``LinearCrossEntropyLoss`` (torchtune/modules/loss/
cross_entropy_loss.py) in eager mode: the model returns its final hidden states instead of
logits (torchtune's ``skip_output_layer``; here the LM head is swapped for a pass-through for
the forward), then the loss keeps the hidden states of tokens whose label counts
(``mask_inputs``: an ``index_select`` copy), splits them into ``num_output_chunks`` chunks
(``tensor_split``) and runs the LM head and an fp32 cross-entropy (``reduction="sum"``) chunk by
chunk, summing into one scalar divided by the number of counted tokens.

The labels are shifted as transformers' ``ForCausalLMLoss`` shifts them (padded with the ignore
index, ``[..., 1:]``); torchtune's recipes shift them the same way before the forward.

Fake tensors cannot decide a data-dependent size (``torch.where`` of a mask): on them the
counted tokens are those of the synthetic batch (every label, less the one ignore index each
row gets from the shift), and ``nonzero``'s ``(count, ndim)`` int64 result is allocated
as such.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn import functional

IGNORE_INDEX = -100  # transformers' and torchtune's ignore_index


class _PassThrough(nn.Module):
    """Stands in for the LM head: the model's "logits" are its final hidden states."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def _head_owner(model: nn.Module, head: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is head:
                return module, child_name
    raise ValueError("cannot find the LM head's parent module")


@contextlib.contextmanager
def _skip_output_layer(model: nn.Module, head: nn.Module) -> Iterator[None]:
    owner, attr = _head_owner(model, head)
    setattr(owner, attr, _PassThrough())
    try:
        yield
    finally:
        setattr(owner, attr, head)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Token t is trained to predict token t + 1; the last one predicts nothing
    (ForCausalLMLoss: ``pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()``)."""
    return functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()


def _valid_positions(targets: torch.Tensor) -> torch.Tensor:
    """``torch.where(targets != ignore_index)[0]`` (nonzero: a (count, ndim) int64 tensor)."""
    mask = targets != IGNORE_INDEX
    if not isinstance(mask, FakeTensor):
        return torch.where(mask)[0]
    # The synthetic batch: every label counts but the ignore index the shift appends per row.
    rows = targets.shape[0] if targets.dim() > 1 else 1
    count = targets.numel() - rows if targets.dim() > 1 else targets.numel()
    return torch.empty((count, mask.dim()), dtype=torch.int64, device=mask.device).unbind(1)[0]


def linear_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    num_chunks: int,
    *,
    fake_rows: int | None = None,
) -> torch.Tensor:
    """torchtune ``LinearCrossEntropyLoss.forward`` (mask_ignored_tokens=True), eager.

    ``fake_rows``: on fake tensors, the sequences of the batch (each loses one counted token to
    the shift).
    """
    total_valid_tokens = _valid_positions(targets).numel()
    flat_targets = targets.reshape(-1)
    outputs = hidden.reshape(-1, hidden.shape[-1])
    # mask_inputs: keep the rows of counted tokens.
    if fake_rows is None:
        indices = _valid_positions(flat_targets)
    else:
        indices = torch.empty(
            (flat_targets.numel() - fake_rows, 1), dtype=torch.int64, device=targets.device
        ).unbind(1)[0]
    outputs = outputs.index_select(0, indices)
    flat_targets = flat_targets.index_select(0, indices)
    del indices
    total_loss = torch.tensor(0.0, device=targets.device)
    for hidden_chunk, target_chunk in zip(
        outputs.tensor_split(num_chunks, dim=0),
        flat_targets.tensor_split(num_chunks, dim=0),
        strict=True,
    ):
        logits = head(hidden_chunk)
        total_loss += functional.cross_entropy(
            logits.float(), target_chunk, reduction="sum", ignore_index=IGNORE_INDEX
        )
        del logits
    return total_loss / total_valid_tokens


def chunked_loss(
    model: nn.Module,
    head: nn.Module,
    batch: dict[str, torch.Tensor],
    num_chunks: int,
    *,
    extra: dict[str, Any],
    on_hidden: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The model's forward without its LM head, then torchtune's chunked loss.

    ``on_hidden`` sees the final hidden states when the loss starts (the tracer's LOSS phase).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with _skip_output_layer(model, head):
        outputs = model(**inputs, **extra)
    hidden: torch.Tensor = outputs.logits  # the final hidden states (the head passed them on)
    del outputs
    if on_hidden is not None:
        on_hidden(hidden)
    targets = shifted_labels(labels)
    fake_rows = targets.shape[0] if isinstance(targets, FakeTensor) else None
    loss = linear_cross_entropy(hidden, targets, head, num_chunks, fake_rows=fake_rows)
    del hidden, targets
    return loss

"""trl's DPO step, traced: its fused LM head and reference forward run as trl runs them on CUDA.

What runs is trl's own code: ``add_fused_lm_head`` patches the model's forward
(trl/trainer/utils.py), ``ChunkedLogProbFunction`` computes the per-token log-probabilities
(trl/kernels/chunked_logprob.py), ``use_adapter(model, None)`` disables a peft model's
adapters for the reference. ``_compute_loss``'s few lines around them (the labels, the policy
call, the reference call under ``no_grad``, the sigmoid loss on per-sequence sums) are
replicated from trl/trainer/dpo_trainer.py; each model call runs under its own autocast, as
accelerate wraps a prepared model's forward.

On CUDA trl takes the compact path (``hidden_states[mask]``) and folds each tile with Triton
kernels that allocate nothing; the CPU path folds with torch ops instead. The tracer runs the
CUDA path on any device (:func:`cuda_kernels`): the compact selection, the folds as in-place
stand-ins, CUDA's fp32-output ``addmm`` as an in-place stand-in. Only values differ, never
allocations. On fake tensors a boolean mask's ``nonzero`` cannot be sized, so the synthetic
batch's masks (every label counts) select every position (:class:`AllTrueMasks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn import functional
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.errors import MemplanError
from memplan.specs import RefModel, TrainingSetup
from memplan.torchsim.models import COMPUTE_DTYPES
from memplan.trace import Phase

# DPOConfig.beta (trl/trainer/dpo_config.py).
DPO_BETA = 0.1
IGNORE_INDEX = -100


def _unwrapped(model: nn.Module) -> nn.Module:
    unwrap: Any = getattr(model, "get_base_model", None)
    return unwrap() if callable(unwrap) else model


def add_fused_head(model: nn.Module) -> None:
    """trl's ``add_fused_lm_head`` with DPOTrainer's outputs, on the transformers model."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError as exc:
        raise MemplanError(
            f"objective=dpo is traced through trl's own code ({exc}): pip install 'memplan[hf]'"
        ) from exc

    from memplan.preference import FUSED_HEAD_OUTPUTS

    add_fused_lm_head(_unwrapped(model), outputs=FUSED_HEAD_OUTPUTS)  # type: ignore[arg-type]


def _no_allocation(*args: Any, **kwargs: Any) -> None:
    """A Triton fold or CUDA's ``addmm(..., out_dtype=float32, out=acc)``: reads its inputs and
    writes in place, allocating nothing."""


@contextlib.contextmanager
def cuda_kernels() -> Iterator[None]:
    """trl's fused head as it runs on CUDA: the compact selection, the in-place folds."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    utils: Any = trl_utils
    saved = (
        utils._use_triton,
        chunked_logprob._use_triton,
        chunked_logprob._forward_tile,
        chunked_logprob._backward_tile,
        chunked_logprob._addmm_fp32,
    )
    utils._use_triton = lambda device: True
    chunked_logprob._use_triton = lambda device: False  # the tile functions below
    chunked_logprob._forward_tile = _no_allocation
    chunked_logprob._backward_tile = _no_allocation
    chunked_logprob._addmm_fp32 = _no_allocation
    try:
        yield
    finally:
        (
            utils._use_triton,
            chunked_logprob._use_triton,
            chunked_logprob._forward_tile,
            chunked_logprob._backward_tile,
            chunked_logprob._addmm_fp32,
        ) = saved


_INDEX = torch.ops.aten.index.Tensor
_INDEX_PUTS = (
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
)


class AllTrueMasks(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """``tensor[bool_mask]`` on fake tensors: the mask expanded by a ``nonzero`` of every
    position (``(numel, ndim)`` int64, as aten's index expands it), then indexed."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is _INDEX or func in _INDEX_PUTS:
            indices = args[1]
            masks = [i for i in indices if i is not None and i.dtype is torch.bool]
            if masks and isinstance(masks[0], FakeTensor):
                (mask,) = masks
                where = torch.empty(
                    (mask.numel(), mask.dim()), dtype=torch.int64, device=mask.device
                )
                expanded = list(where.unbind(1))
                del where
                return func(args[0], expanded, *args[2:], **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def preference_batch(
    setup: TrainingSetup, vocab: int, *, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """DataCollatorForPreference's batch: each pair's chosen then rejected rows (int64 ids,
    attention and completion masks; every position a completion token), and the reference
    log-probabilities when they were precomputed."""
    shape = (setup.sequences_per_forward, setup.seq_len)
    batch = {
        "input_ids": torch.randint(0, vocab, shape, device=device),
        "attention_mask": torch.ones(shape, dtype=torch.int64, device=device),
        "completion_mask": torch.ones(shape, dtype=torch.int64, device=device),
    }
    if setup.precomputed_ref:
        pairs = (setup.micro_batch_size,)
        batch["ref_chosen_logps"] = torch.zeros(pairs, device=device)
        batch["ref_rejected_logps"] = torch.zeros(pairs, device=device)
    return batch


def _autocast(setup: TrainingSetup, device: str) -> contextlib.AbstractContextManager[Any]:
    if setup.precision.is_amp:
        return torch.autocast(device, dtype=COMPUTE_DTYPES[setup.precision])
    return contextlib.nullcontext()


@contextlib.contextmanager
def _checkpointing_off(model: nn.Module) -> Iterator[None]:
    """trl's ``disable_gradient_checkpointing`` for the reference forward: every layer's
    ``gradient_checkpointing`` flag off, then back as it was."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for module in flagged:
        setattr(module, "gradient_checkpointing", False)  # noqa: B010
    try:
        yield
    finally:
        for module in flagged:
            setattr(module, "gradient_checkpointing", True)  # noqa: B010


@contextlib.contextmanager
def _loss_starts(model: nn.Module, on_hidden: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """``on_hidden`` sees the backbone's last hidden state (where the fused head starts)."""
    backbone: Any = _unwrapped(model).base_model

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        on_hidden(output.last_hidden_state)

    handle = backbone.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def dpo_step(fake: bool) -> Iterator[None]:
    """Around a DPO micro-step's forward and backward: trl's CUDA path, and on fake tensors
    the synthetic batch's all-true masks."""
    masks = AllTrueMasks() if fake else contextlib.nullcontext()  # type: ignore[no-untyped-call]
    with cuda_kernels(), masks:
        yield


def dpo_loss(
    model: nn.Module,
    reference: nn.Module | None,
    setup: TrainingSetup,
    batch: dict[str, torch.Tensor],
    *,
    device: str = "cpu",
    set_phase: Callable[[Phase], None] = lambda phase: None,
    on_hidden: Callable[[torch.Tensor], None] = lambda hidden: None,
) -> torch.Tensor:
    """DPOTrainer._compute_loss with the default sigmoid loss (trl/trainer/dpo_trainer.py).

    ``reference``: the reference copy (None: the policy's adapters disabled, or precomputed).
    ``set_phase`` marks the reference's forward; ``on_hidden`` sees each model's final
    hidden states (where its fused head starts).
    """
    from trl.trainer.utils import use_adapter

    if setup.objective.value != "dpo":
        raise MemplanError(f"objective={setup.objective.value} is not traced")
    kind = setup.reference
    skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "attention_mask"}
    # The attention mask is all ones: transformers skips it (SDPA's is_causal) and builds
    # the same causal mask as without it (eager), so it is not passed.
    model_kwargs: dict[str, Any] = {k: v for k, v in batch.items() if k not in skip}
    model_kwargs["use_cache"] = False
    completion_mask = batch["completion_mask"]
    seq_len = completion_mask[..., 1:].size(1)
    labels = batch["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
    with _loss_starts(model, on_hidden), _autocast(setup, device):
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    per_token_logps = outputs.log_probs[:, -seq_len:]
    logps = per_token_logps.sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    if kind is None:
        ref_chosen_logps, ref_rejected_logps = (
            batch["ref_chosen_logps"],
            batch["ref_rejected_logps"],
        )
    else:
        set_phase(Phase.FORWARD)
        runner = model if kind is RefModel.ADAPTERS_DISABLED else reference
        assert runner is not None
        adapters = (
            use_adapter(model, adapter_name=None)  # type: ignore[arg-type]
            if kind is RefModel.ADAPTERS_DISABLED
            else contextlib.nullcontext()
        )
        with (
            torch.no_grad(),
            _checkpointing_off(model),
            adapters,
            _loss_starts(runner, on_hidden),
            _autocast(setup, device),
        ):
            ref_outputs = runner(**model_kwargs, labels=labels, fused_lm_head=True)
        ref_logps = ref_outputs.log_probs[:, -seq_len:].sum(dim=1)
        ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
        del ref_outputs
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    per_sequence_loss = -functional.logsigmoid(DPO_BETA * delta_score)
    loss: torch.Tensor = per_sequence_loss.mean()
    del outputs, labels
    return loss

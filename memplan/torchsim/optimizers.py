"""The optimizer of a TrainingSetup over a model's trainable parameters, as HF Trainer builds it.

Trainer puts trainable parameters in two groups, with and without weight decay (biases and
norm weights, ``Trainer.get_decay_parameter_names``); foreach temporaries are per group.
"""

from __future__ import annotations

import re
from typing import Any, Final

import torch
from torch import nn
from torch.optim import Optimizer as TorchOptimizer

from memplan.specs import Optimizer, OptimizerImpl, TrainingSetup
from memplan.torchsim.bnb_like import BnbStyleOptimizer
from memplan.torchsim.records import Placement

# Trainer.get_decay_parameter_names: no decay for biases and norms (by name), and LayerNorm.
_NO_DECAY_PATTERNS: Final = [
    re.compile(p)
    for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]
LEARNING_RATE: Final = 1e-4
WEIGHT_DECAY: Final = 0.0  # TrainingArguments.weight_decay default


def _decays(name: str, module_of: dict[str, nn.Module]) -> bool:
    owner = module_of.get(name.rsplit(".", 1)[0]) if "." in name else None
    if isinstance(owner, nn.LayerNorm):
        return False
    return not any(p.search(name.lower()) for p in _NO_DECAY_PATTERNS)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in Trainer's two groups (decay, no decay)."""
    modules = dict(model.named_modules())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if _decays(n, modules)]
    no_decay = [p for n, p in trainable if not _decays(n, modules)]
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _loop_flags(impl: OptimizerImpl, *, has_fused: bool) -> tuple[bool | None, bool]:
    """(fused, foreach); foreach also where fused is asked for and torch has no fused kernel."""
    if impl is OptimizerImpl.FUSED and has_fused:
        return True, False
    return None, impl is not OptimizerImpl.FOR_LOOP


def build_optimizer(model: nn.Module, setup: TrainingSetup, notes: list[str]) -> TorchOptimizer:
    groups = param_groups(model)
    if setup.optimizer_in_backward:
        return OptimizerInBackward(groups, setup, notes)
    return optimizer_of(groups, setup, notes)


def optimizer_of(
    groups: list[dict[str, Any]], setup: TrainingSetup, notes: list[str]
) -> TorchOptimizer:
    """The optimizer of ``setup`` over ``groups``."""
    optimizer = torch_optimizer(groups, setup, notes)
    if optimizer is not None:
        return optimizer
    kind = setup.optimizer
    bits = 8 if kind in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT) else 32
    paged = kind in (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT)
    style = "lion" if kind is Optimizer.LION else "adamw"
    return BnbStyleOptimizer(groups, kind=style, optim_bits=bits, paged=paged, lr=LEARNING_RATE)


class OptimizerInBackward(TorchOptimizer):
    """torchtune's OptimizerInBackward (torchtune/modules/optim.py): one optimizer per
    trainable parameter, stepped in the parameter's post-accumulate-grad hook and then
    zero_grad (its gradient freed), so no two gradients need to coexist; ``step()`` does
    nothing."""

    def __init__(self, groups: list[dict[str, Any]], setup: TrainingSetup, notes: list[str]):
        self.optimizers: dict[int, TorchOptimizer] = {}
        params = []
        for group in groups:
            for param in group["params"]:
                single = [{**group, "params": [param]}]
                self.optimizers[id(param)] = optimizer_of(single, setup, notes)
                param.register_post_accumulate_grad_hook(self._step_and_clear)
                params.append(param)
        super().__init__(params, {"lr": LEARNING_RATE})

    def _step_and_clear(self, param: torch.Tensor) -> None:
        optimizer = self.optimizers[id(param)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)


def torch_optimizer(
    groups: list[dict[str, Any]], setup: TrainingSetup, notes: list[str]
) -> TorchOptimizer | None:
    """The torch.optim optimizer Trainer builds for ``setup``; None for bitsandbytes' kinds."""
    kind = setup.optimizer
    if kind is Optimizer.ADAMW:
        fused, foreach = _loop_flags(setup.optimizer_impl, has_fused=True)
        return torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=fused, foreach=foreach)
    if kind is Optimizer.SGD:
        fused, foreach = _loop_flags(setup.optimizer_impl, has_fused=True)
        return torch.optim.SGD(groups, lr=LEARNING_RATE, momentum=0.9, fused=fused, foreach=foreach)
    if kind is Optimizer.ADAFACTOR:
        if setup.optimizer_impl is OptimizerImpl.FUSED:
            notes.append("adafactor has no fused kernel in torch: traced with foreach")
        _, foreach = _loop_flags(setup.optimizer_impl, has_fused=False)
        return torch.optim.Adafactor(groups, lr=1e-2, foreach=foreach)
    return None


def state_placement(optimizer: TorchOptimizer, key: str, tensor: torch.Tensor) -> Placement:
    """Where one optimizer state tensor lives on a GPU run."""
    if isinstance(optimizer, BnbStyleOptimizer):
        return Placement.PAGED if id(tensor) in optimizer.paged_ids else Placement.DEVICE
    if key == "step" and not _on_device_steps(optimizer):
        # torch keeps `step` on the CPU unless fused or capturable (_init_group).
        return Placement.HOST
    return Placement.DEVICE


def _on_device_steps(optimizer: TorchOptimizer) -> bool:
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return bool(group.get("fused") or group.get("capturable"))

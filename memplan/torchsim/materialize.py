"""Give a meta-device model real or fake storage, one tensor at a time, in module order.

Each parameter and buffer is allocated once in its final dtype (shared tensors, such as tied
embeddings, once), as loading a checkpoint straight into the target dtype does. Quantized
linears quantize themselves (:meth:`memplan.torchsim.quant.Linear4bit.materialize_`). Under a
``FakeTensorMode`` the new tensors are fake and nothing is allocated; otherwise parameters get
random values (seeded by the caller) and buffers keep the values computed at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SelfMaterializing(Protocol):
    def materialize_(self, shared: dict[str, torch.Tensor], *, fill: bool) -> None: ...


def materialize(
    model: nn.Module,
    *,
    fill: bool,
    entering: Callable[[str], None] | None = None,
    device: str = "cpu",
    materialize_module: Callable[[nn.Module], bool] | None = None,
) -> None:
    """Replace every meta tensor of ``model`` by a new tensor on ``device`` (or a fake one).

    ``fill``: write values (random parameters, the original buffers); off for fake tensors.
    ``entering`` is told the name of each module before its tensors are allocated.
    ``materialize_module`` may take a module over (returning True), e.g. a layer that packs its
    own weights such as bitsandbytes' quantized linears.
    """
    memo: dict[int, nn.Parameter] = {}
    buffer_memo: dict[int, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if entering is not None:
                entering(name)
            if materialize_module is not None and materialize_module(module):
                continue
            if isinstance(module, SelfMaterializing):
                module.materialize_(shared, fill=fill)
                continue
            _materialize_params(module, memo, fill=fill, device=device)
            _materialize_buffers(module, buffer_memo, fill=fill, device=device)


def _materialize_params(
    module: nn.Module, memo: dict[int, nn.Parameter], *, fill: bool, device: str
) -> None:
    for name, param in list(module._parameters.items()):
        if param is None:
            continue
        new = memo.get(id(param))
        if new is None:
            data = torch.empty(param.shape, dtype=param.dtype, device=device)
            if fill and data.is_floating_point():
                _fill_param(data)
            new = nn.Parameter(data, requires_grad=param.requires_grad)
            memo[id(param)] = new
        module._parameters[name] = new


def _fill_param(data: torch.Tensor) -> None:
    """Random matrices (std 0.02, as transformers' initializer_range); ones for vectors."""
    if data.dim() >= 2:
        data.normal_(0.0, 0.02)
    else:
        data.fill_(1.0)


def _materialize_buffers(
    module: nn.Module, memo: dict[int, torch.Tensor], *, fill: bool, device: str
) -> None:
    for name, buffer in list(module._buffers.items()):
        if buffer is None:
            continue
        new = memo.get(id(buffer))
        if new is None:
            new = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
            if fill and buffer.device.type != "meta":
                new.copy_(buffer)
            memo[id(buffer)] = new
        module._buffers[name] = new

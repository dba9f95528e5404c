"""Bottleneck adapters (Houlsby et al. 2019) after each layer's attention and MLP.

h <- h + up(relu(down(h))), down: hidden -> adapter_size, up: adapter_size -> hidden, with
the adapter weights in ``setup.adapter_dtype`` and the input cast to it (as peft does for its
fp32 adapters), the output cast back. Attached with forward hooks, so module names stay those
of the base model and checkpointing recomputes the adapters with their layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memplan.dtypes import DType
from memplan.errors import MemplanError
from memplan.specs import TrainingSetup

_TORCH_DTYPES = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.FP16: torch.float16}
# T5Block nests its self-attention (T5Attention, before the branch's dropout) and its MLP
# (T5DenseGatedActDense) in sublayers: layer.0.SelfAttention, layer.<-1>.DenseReluDense.
_ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention", "SelfAttention")
# OPTDecoderLayer has no MLP module: fc1 and fc2 sit in the layer, fc2's output is the MLP's.
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "fc2", "DenseReluDense")


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, adapter_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        meta = torch.device("meta")
        self.down = nn.Linear(hidden_size, adapter_size, device=meta, dtype=dtype)
        self.up = nn.Linear(adapter_size, hidden_size, device=meta, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)
        out: torch.Tensor = self.up(torch.relu(self.down(x)))
        return hidden + out.to(hidden.dtype)


def _apply_to_output(adapter: BottleneckAdapter, output: Any) -> Any:
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _branch(layer: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The layer's attention or MLP module: an attribute of the layer, else the first
    submodule so named (T5's sublayers)."""
    for n in names:
        found: object = getattr(layer, n, None)
        if isinstance(found, nn.Module):
            return found
    for n in names:
        for path, module in layer.named_modules():
            if path.rsplit(".", 1)[-1] == n and isinstance(module, nn.Module):
                return module
    return None


def add_bottleneck_adapters(
    model: nn.Module,
    hidden_size: int,
    setup: TrainingSetup,
    notes: list[str],
    hooks: tuple[str, str] | None = None,
) -> None:
    """Freeze ``model`` and add two trainable adapters (``hidden_size`` wide, the residual
    stream's width) to every layer of every stack (an encoder-decoder model has two): on the
    outputs of the modules ``hooks`` names (paths from the layer), else of the layer's
    attention and MLP blocks."""
    from memplan.torchsim.models import decoder_layer_stacks

    dtype = _TORCH_DTYPES.get(setup.adapter_dtype, torch.float32)
    for layer in (layer for stack in decoder_layer_stacks(model) for layer in stack):
        blocks = _hook_points(layer, hooks)
        for block, attr in zip(blocks, ("attention_adapter", "mlp_adapter"), strict=True):
            adapter = BottleneckAdapter(hidden_size, setup.adapter_size, dtype)
            layer.add_module(attr, adapter)
            block.register_forward_hook(lambda m, a, out, ad=adapter: _apply_to_output(ad, out))
    where = "after " + " and ".join(hooks) if hooks else "after attention and MLP"
    notes.append(f"adapter: bottleneck {setup.adapter_size} {where}, {dtype}")


def _hook_points(layer: nn.Module, hooks: tuple[str, str] | None) -> list[nn.Module]:
    """The modules of ``layer`` whose outputs get the attention and the MLP adapter."""
    if hooks is not None:
        return [_submodule(layer, path) for path in hooks]
    blocks = []
    for names in (_ATTENTION_NAMES, _MLP_NAMES):
        block = _branch(layer, names)
        if block is None:
            raise MemplanError(f"no attention/MLP block found in {type(layer).__name__}")
        blocks.append(block)
    return blocks


def _submodule(layer: nn.Module, path: str) -> nn.Module:
    """``layer``'s module at a dotted ``path``; an integer part indexes a ModuleList (negative
    from its end)."""
    module = layer
    for part in path.split("."):
        if part.lstrip("-").isdigit() and isinstance(module, nn.ModuleList):
            module = module[int(part)]
        elif isinstance(child := getattr(module, part, None), nn.Module):
            module = child
        else:
            raise MemplanError(f"no module {path!r} in {type(layer).__name__}")
    return module

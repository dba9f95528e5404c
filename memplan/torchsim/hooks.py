"""Module hooks that tell the tracker which module runs, when the loss starts and ends.

- every module's forward pre/post hook keeps a stack of module names (labels of allocations);
- the LM head's forward pre-hook starts the LOSS phase (logits, fp32 upcast, cross-entropy);
- a hook on the LM head's input gradient ends the logits window of backward;
- hooks on each decoder layer's output and input gradients bracket that layer's backward, so
  backward allocations are attributed to a layer (and identical layers can be folded).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from memplan.torchsim.tracker import MemoryTracker
from memplan.trace import Phase


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    for attr in ("last_hidden_state", "logits"):
        found = getattr(value, attr, None)
        if isinstance(found, torch.Tensor):
            return found
    return None


def _needs_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad and torch.is_grad_enabled()


class ModuleHooks:
    """Context manager installing the hooks on ``model`` for ``tracker``."""

    def __init__(
        self,
        tracker: MemoryTracker,
        model: nn.Module,
        *,
        lm_head: nn.Module | None,
        layers: Sequence[nn.Module] = (),
        head_input_ends_logits: bool = True,
    ) -> None:
        self._tracker = tracker
        # False when a loss outside the model calls the head chunk by chunk and ends the
        # logits window itself (at the gradient of the whole hidden states).
        self._head_input_ends_logits = head_input_ends_logits
        self._names = {id(m): name or "model" for name, m in model.named_modules()}
        self._lm_head = lm_head
        self._layers = layers
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ModuleHooks:
        register = torch.nn.modules.module
        self._handles += [
            register.register_module_forward_pre_hook(self._enter_module),
            register.register_module_forward_hook(self._leave_module, always_call=True),
        ]
        if self._lm_head is not None:
            self._handles += [
                self._lm_head.register_forward_pre_hook(self._start_loss),
                self._lm_head.register_forward_hook(self._watch_lm_head_input),
            ]
        for layer in self._layers:
            self._handles += [
                layer.register_forward_pre_hook(self._watch_layer_input),
                layer.register_forward_hook(self._watch_layer_output),
            ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- module stack -----------------------------------------------------------------------

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        self._tracker.push_module(self._names.get(id(module), type(module).__name__))

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        self._tracker.pop_module()

    # -- loss phase -------------------------------------------------------------------------

    def _start_loss(self, module: nn.Module, args: Any) -> None:
        if self._tracker.phase is Phase.FORWARD:
            self._tracker.set_phase(Phase.LOSS)

    def _watch_lm_head_input(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._head_input_ends_logits:
            return
        hidden = _first_tensor(args)
        if hidden is not None and _needs_grad(hidden):
            hidden.register_hook(self._end_logits_window)  # type: ignore[no-untyped-call]

    def _end_logits_window(self, grad: torch.Tensor) -> None:
        self._tracker.logits_window = False

    # -- layer brackets in backward ---------------------------------------------------------

    def _watch_layer_output(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = _first_tensor(output)
        if hidden is not None and _needs_grad(hidden):
            name = self._names.get(id(module), "")
            hidden.register_hook(lambda grad: self._enter_layer_backward(name))  # type: ignore[no-untyped-call]

    def _watch_layer_input(self, module: nn.Module, args: Any) -> None:
        hidden = _first_tensor(args)
        if hidden is not None and _needs_grad(hidden):
            name = self._names.get(id(module), "")
            hidden.register_hook(lambda grad: self._leave_layer_backward(name))  # type: ignore[no-untyped-call]

    def _enter_layer_backward(self, name: str) -> None:
        self._tracker.backward_context = name

    def _leave_layer_backward(self, name: str) -> None:
        # The gradient of layer i's input is layer i-1's output gradient: layer i-1's hook,
        # registered first, already moved the context on, so clear only our own.
        if self._tracker.backward_context == name:
            self._tracker.backward_context = ""

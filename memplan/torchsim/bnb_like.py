"""Small re-implementations of bitsandbytes optimizers with bnb's state storage layout.

``Optimizer2State`` (AdamW) and ``Optimizer1State`` (Lion) of bitsandbytes 0.4x keep, per
parameter (``init_state``):

- 32-bit: ``state1`` (and ``state2``) fp32 like the parameter;
- 8-bit: ``state1``/``state2`` uint8 like the parameter, ``absmax1``/``absmax2`` fp32 per block
  of 256, and the shared 256-entry code books ``qmap1``/``qmap2`` (``name2qmap``, one each per
  optimizer); parameters under ``min_8bit_size`` = 4096 elements keep 32-bit states;
- paged: states of parameters with at least 1e5 elements come from ``F.get_paged`` (CUDA
  unified memory, outside the torch allocator); smaller ones and the absmax stay on the device.

The update is one in-place custom op per parameter, as bnb's fused CUDA kernels are, so it
allocates nothing. Code-book values are linear stand-ins for bnb's dynamic maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import torch
from torch.optim import Optimizer

MIN_8BIT_SIZE: Final = 4096  # bnb args.min_8bit_size
PAGE_MIN_NUMEL: Final = 100_000  # get_state_buffer pages only tensors with >= 1e5 elements
STATE_BLOCK_SIZE: Final = 256  # blockwise 8-bit states
SIGNED_CODE: Final = torch.linspace(-1.0, 1.0, 256)  # stands in for create_dynamic_map(signed=True)
UNSIGNED_CODE: Final = torch.linspace(0.0, 1.0, 256)  # create_dynamic_map(signed=False)


def _blockwise(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    pad = (-flat.numel()) % STATE_BLOCK_SIZE
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, STATE_BLOCK_SIZE)


def _dequantize_(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    values = _blockwise(code[codes.reshape(-1).long()]) * absmax[:, None]
    return values.reshape(-1)[: codes.numel()].view(codes.shape)


def _quantize_into(
    values: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor
) -> None:
    blocks = _blockwise(values.float())
    absmax.copy_(blocks.abs().amax(dim=1))
    scaled = (blocks / absmax.clamp_min(1e-12)[:, None]).reshape(-1)[: values.numel()]
    midpoints = (code[1:] + code[:-1]) / 2
    codes.copy_(torch.bucketize(scaled, midpoints).to(torch.uint8).view(codes.shape))


@torch.library.custom_op("memplan::adamw_update_", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on fp32 states (bnb's 32-bit kernel), in place."""
    g = grad.float()
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    update = exp_avg / (1 - beta1**step) / denom + weight_decay * param.float()
    param.sub_((lr * update).to(param.dtype))


@torch.library.custom_op(
    "memplan::adamw8bit_update_",
    mutates_args=("param", "state1", "state2", "absmax1", "absmax2"),
)
def adamw8bit_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on blockwise 8-bit states (bnb's optimizer_update_8bit_blockwise)."""
    exp_avg = _dequantize_(state1, absmax1, qmap1)
    exp_avg_sq = _dequantize_(state2, absmax2, qmap2)
    adamw_update_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    _quantize_into(exp_avg, state1, absmax1, qmap1)
    _quantize_into(exp_avg_sq, state2, absmax2, qmap2)


@torch.library.custom_op("memplan::lion_update_", mutates_args=("param", "exp_avg"))
def lion_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step (Chen et al. 2023): sign of the interpolated momentum, in place."""
    g = grad.float()
    param.mul_(1 - lr * weight_decay)
    update = (exp_avg * beta1 + g * (1 - beta1)).sign_()
    param.sub_((lr * update).to(param.dtype))
    exp_avg.mul_(beta2).add_(g, alpha=1 - beta2)


def _updates_in_place(*args: Any, **kwargs: Any) -> None:
    """Fake kernel of the update ops: they only write their inputs, allocating nothing."""


for _op in (adamw_update_, adamw8bit_update_, lion_update_):
    _op.register_fake(_updates_in_place)


class BnbStyleOptimizer(Optimizer):
    """AdamW (two states) or Lion (one state) with bitsandbytes' state layout."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        kind: str = "adamw",
        optim_bits: int = 32,
        paged: bool = False,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if kind not in ("adamw", "lion") or optim_bits not in (8, 32):
            raise ValueError(f"unsupported kind={kind!r} optim_bits={optim_bits}")
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        self.kind, self.optim_bits, self.is_paged = kind, optim_bits, paged
        self.paged_ids: set[int] = set()  # id() of states living in unified memory
        self.qmaps: dict[str, torch.Tensor] = {}

    @property
    def num_states(self) -> int:
        return 2 if self.kind == "adamw" else 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                state["step"] += 1
                self._update(param, state, group)
        return None

    def _state_buffer(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.zeros_like(param, dtype=dtype)
        if self.is_paged and param.numel() >= PAGE_MIN_NUMEL:
            self.paged_ids.add(id(buffer))
        return buffer

    def _init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        eight_bit = self.optim_bits == 8 and param.numel() >= MIN_8BIT_SIZE
        state["step"] = 0
        dtype = torch.uint8 if eight_bit else torch.float32
        for i in range(1, self.num_states + 1):
            state[f"state{i}"] = self._state_buffer(param, dtype)
        if not eight_bit:
            return
        blocks = -(-param.numel() // STATE_BLOCK_SIZE)
        for i, (key, values) in enumerate(
            (("dynamic", SIGNED_CODE), ("udynamic", UNSIGNED_CODE))[: self.num_states], 1
        ):
            if key not in self.qmaps:  # name2qmap: one code book per optimizer, shared
                self.qmaps[key] = torch.empty(256, dtype=torch.float32).copy_(values)
            state[f"qmap{i}"] = self.qmaps[key]
            state[f"absmax{i}"] = torch.zeros((blocks,), dtype=torch.float32)

    def _update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        if self.kind == "lion":
            lion_update_(param, param.grad, state["state1"], lr, beta1, beta2, wd)
        elif "absmax1" in state:
            adamw8bit_update_(
                param, param.grad, state["state1"], state["state2"], state["absmax1"],
                state["absmax2"], state["qmap1"], state["qmap2"], state["step"], lr, beta1,
                beta2, group["eps"], wd,
            )  # fmt: skip
        else:
            adamw_update_(
                param, param.grad, state["state1"], state["state2"], state["step"], lr, beta1,
                beta2, group["eps"], wd,
            )  # fmt: skip

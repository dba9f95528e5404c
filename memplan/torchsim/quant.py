"""NF4 weights stored exactly as bitsandbytes stores them, dequantized on the fly.

Storage per quantized ``nn.Linear`` (bitsandbytes 0.43-0.49 ``Linear4bit`` / ``Params4bit``):

- packed weight: uint8 ``((n + 1) // 2, 1)``, two 4-bit codes per byte;
- ``QuantState.absmax``: fp32 per block of 64 weights, or with double quantization
  (``compress_statistics``) uint8 codes per block plus ``state2``: fp32 ``absmax`` per 256
  blocks and its own copy of the 256-entry 8-bit code (``code.to(device, copy=True)``);
- ``QuantState.code``: the 16-entry NF4 code book, a fresh tensor per weight
  (``get_4bit_type`` builds it on every call); ``offset``: a 0-dim fp32 mean of the absmax;
- the 256-entry 8-bit code book itself is created once and shared (bnb's module-level
  ``name2qmap["dynamic"]``).

The forward pass mirrors ``MatMul4Bit``: dequantize the whole weight to 16 bits, matmul, and
keep only the packed weight for backward (as a ctx attribute, not ``save_for_backward``);
backward dequantizes again. Dequantization is one custom op per CUDA kernel (blockwise 8-bit
for the absmax, then 4-bit), so only their outputs are allocations, like the CUDA kernels.
Code-book values differ from bnb's (the 8-bit one here is linear); the layout is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn
from torch.nn import functional

BLOCK_SIZE: Final = 64  # bnb Linear4bit / BitsAndBytesConfig default blocksize
NESTED_BLOCK_SIZE: Final = 256  # quantize_blockwise(absmax, blocksize=256) for double quant

# bnb.functional.get_4bit_type("nf4"): quantiles of N(0, 1) normalized to [-1, 1].
NF4_CODE: Final = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
# Stand-in for bnb's create_dynamic_map(): 256 sorted fp32 values in [-1, 1].
DYNAMIC_CODE: Final = torch.linspace(-1.0, 1.0, 256)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _nearest_codes(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` for each value."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values.contiguous(), midpoints.to(values.dtype))


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    num_blocks = _ceil_div(flat.numel(), blocksize)
    padded = functional.pad(flat, (0, num_blocks * blocksize - flat.numel()))
    return padded.view(num_blocks, blocksize)


def _block_codes(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat uint8 indices into ``code`` of each value scaled by its block's absmax, and the
    fp32 absmax per block (bitsandbytes' blockwise quantization)."""
    flat = values.reshape(-1).float()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    indices = _nearest_codes(scaled.reshape(-1)[: flat.numel()], code).to(torch.uint8)
    return indices, absmax


# -- custom ops: real CPU kernels, fake kernels that allocate only the outputs -----------------


@torch.library.custom_op("memplan::quantize_4bit", mutates_args=())
def quantize_4bit(
    weight: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 4-bit codes ``((n + 1) // 2, 1)`` uint8 and fp32 absmax per block."""
    indices, absmax = _block_codes(weight, code, blocksize)
    if indices.numel() % 2:
        indices = functional.pad(indices, (0, 1))
    packed = (indices[0::2] << 4) | indices[1::2]
    return packed.view(-1, 1), absmax


@quantize_4bit.register_fake
def _(
    weight: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n = weight.numel()
    packed = weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    return packed, weight.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)


@torch.library.custom_op("memplan::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` from packed codes and fp32 per-block absmax."""
    flat = packed.view(-1)
    indices = torch.stack(((flat >> 4), (flat & 15)), dim=1).view(-1).long()
    n = 1
    for size in shape:
        n *= size
    values = _blocks(code[indices[:n]], blocksize) * absmax[:, None]
    return values.reshape(-1)[:n].view(list(shape)).to(dtype)


@dequantize_4bit.register_fake
def _(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    return packed.new_empty(list(shape), dtype=dtype)


@torch.library.custom_op("memplan::quantize_blockwise", mutates_args=())
def quantize_blockwise(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes shaped like ``values`` and fp32 absmax per block (8-bit blockwise)."""
    indices, absmax = _block_codes(values, code, blocksize)
    return indices.view(values.shape), absmax


@quantize_blockwise.register_fake
def _(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = values.new_empty((_ceil_div(values.numel(), blocksize),), dtype=torch.float32)
    return torch.empty_like(values, dtype=torch.uint8), absmax


@torch.library.custom_op("memplan::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """fp32 values shaped like ``codes`` (the inverse of :func:`quantize_blockwise`)."""
    values = _blocks(code[codes.reshape(-1).long()], blocksize) * absmax[:, None]
    return values.reshape(-1)[: codes.numel()].view(codes.shape)


@dequantize_blockwise.register_fake
def _(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    return torch.empty_like(codes, dtype=torch.float32)


# -- QuantState and the MatMul4Bit autograd function --------------------------------------------


@dataclass(frozen=True)
class QuantState:
    """The tensors bnb's QuantState holds for one weight (``nested`` with double quant)."""

    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None


def dequantize_weight(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """bnb.functional.dequantize_4bit: the absmax first (double quant), then the weight."""
    absmax = state.absmax
    if state.nested_absmax is not None:
        assert state.nested_code is not None
        assert state.offset is not None
        absmax = dequantize_blockwise(
            absmax, state.nested_absmax, state.nested_code, NESTED_BLOCK_SIZE
        )
        absmax += state.offset
    weight: torch.Tensor = dequantize_4bit(
        packed, absmax, state.code, BLOCK_SIZE, list(state.shape), state.dtype
    )
    return weight


class MatMul4Bit(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; backward dequantizes W again."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        state: QuantState,
    ) -> torch.Tensor:
        output = functional.linear(x, dequantize_weight(packed, state).to(x.dtype), bias)
        ctx.state = state
        ctx.bias_dtype = None if bias is None else bias.dtype
        # bnb keeps the packed weight as a ctx attribute, not through save_for_backward.
        ctx.packed = packed if any(ctx.needs_input_grad[:2]) else None
        return output

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        needs_x, _, needs_bias, _ = ctx.needs_input_grad
        grad_x = grad_bias = None
        if needs_bias:
            grad_bias = grad_output.sum(0, dtype=ctx.bias_dtype)
        if needs_x:
            weight = dequantize_weight(ctx.packed, ctx.state).to(grad_output.dtype)
            grad_x = torch.matmul(grad_output, weight)
        return grad_x, None, grad_bias, None


# -- the module ------------------------------------------------------------------------------


def _constant(values: torch.Tensor, *, fill: bool) -> torch.Tensor:
    """A new tensor holding ``values`` (allocated by the current mode, fake or real)."""
    out = torch.empty(values.shape, dtype=values.dtype)
    if fill:
        out.copy_(values)
    return out


class Linear4bit(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is NF4 (bnb ``Linear4bit``, ``quant_type='nf4'``).

    Built on the meta device; :meth:`materialize_` then quantizes a 16-bit weight the way
    ``Params4bit._quantize`` does when the model is moved to the GPU.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        compute_dtype: torch.dtype,
        weight_dtype: torch.dtype,
        double_quant: bool,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        self.double_quant = double_quant
        meta = torch.device("meta")
        n = in_features * out_features
        blocks = _ceil_div(n, BLOCK_SIZE)
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=meta)
        self.weight = nn.Parameter(packed, requires_grad=False)
        bias_tensor = torch.empty(out_features, dtype=weight_dtype, device=meta)
        bias_param = nn.Parameter(bias_tensor, requires_grad=False) if bias else None
        self.register_parameter("bias", bias_param)
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        self._buffer("quant_absmax", (blocks,), absmax_dtype)
        self._buffer("quant_code", (16,), torch.float32)
        if double_quant:
            self._buffer("quant_offset", (), torch.float32)
            self._buffer(
                "quant_nested_absmax", (_ceil_div(blocks, NESTED_BLOCK_SIZE),), torch.float32
            )
            self._buffer("quant_nested_code", (256,), torch.float32)
            self._buffer("quant_dynamic_code", (256,), torch.float32)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"), persistent=False)

    def quant_state_buffers(self) -> list[str]:
        """Names of the buffers that make up the quantization state."""
        return [name for name, _ in self.named_buffers(recurse=False)]

    def quant_state(self) -> QuantState:
        buffers = dict(self.named_buffers(recurse=False))
        return QuantState(
            absmax=buffers["quant_absmax"],
            code=buffers["quant_code"],
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            offset=buffers.get("quant_offset"),
            nested_absmax=buffers.get("quant_nested_absmax"),
            nested_code=buffers.get("quant_nested_code"),
        )

    @torch.no_grad()
    def materialize_(self, shared: dict[str, torch.Tensor], *, fill: bool) -> None:
        """Quantize a fresh 16-bit weight, as ``Params4bit`` does when moved to the GPU."""
        weight = torch.empty((self.out_features, self.in_features), dtype=self.weight_dtype)
        if fill:
            weight.normal_(0.0, 0.02)
        packed, absmax = quantize_4bit(weight, NF4_CODE, BLOCK_SIZE)
        del weight  # Params4bit.data = w_4bit: the 16-bit copy is dropped
        self.weight = nn.Parameter(packed, requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(torch.zeros_like(self.bias, device="cpu"), requires_grad=False)
        self.quant_code = _constant(NF4_CODE, fill=fill)  # get_4bit_type: a new tensor per call
        if not self.double_quant:
            self.quant_absmax = absmax
            return
        if "dynamic_code" not in shared:  # bnb's module-level name2qmap["dynamic"]
            shared["dynamic_code"] = _constant(DYNAMIC_CODE, fill=fill)
        dynamic = shared["dynamic_code"]
        self.quant_offset = absmax.mean()
        self.quant_absmax, self.quant_nested_absmax = quantize_blockwise(
            absmax - self.quant_offset, dynamic, NESTED_BLOCK_SIZE
        )
        self.quant_nested_code = dynamic.clone()  # code.to(device, copy=True)
        self.quant_dynamic_code = dynamic

    # peft's dequantize_module_weight (DoRA's weight norm) dequantizes a module that has
    # ``W_q`` through its ``dequantize()``; for bitsandbytes' layers it calls
    # bnb.functional.dequantize_4bit. These two give this layer the same answer: the whole
    # weight in QuantState.dtype.
    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 (peft's attribute name)
        return self.weight

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.weight, self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bnb casts a bias of another dtype in place, then computes in compute_dtype.
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out: torch.Tensor = MatMul4Bit.apply(x, self.weight, bias, self.quant_state())  # type: ignore[no-untyped-call]
        return out.to(input_dtype)

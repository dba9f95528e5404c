"""CUDA's kernels on fake CPU tensors: what a GPU step allocates, traced on any machine.

Fake tensors run the CPU build's kernels (their meta functions and CPU decompositions). Where a
CUDA kernel returns or saves something else, :data:`CUDA_KERNELS` says what, one entry per op,
with the source it follows; :func:`cuda_kernels` applies the table to a fake trace:

- :class:`CudaFunctions` (a ``TorchFunctionMode``, above autograd) reroutes the composite
  functions whose CUDA path calls other ops (dropout's fused kernel, SDPA's backends) and
  applies CUDA autocast's op lists instead of the CPU's;
- :class:`CudaKernels` (a ``TorchDispatchMode`` above the tracker) replaces the outputs and
  workspaces of single kernels (layer-norm statistics, flash attention's RNG state and backward
  accumulators), so the tracker sees exactly CUDA's allocations.

Values do not matter: the kernels here allocate, they compute nothing (fake tensors only).
GPU-dependent choices follow an sm80+ device (A100 / H100) with torch's default SDPA priority
(flash, memory-efficient, math); see :data:`NOT_MODELLED` for what is left out.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


@dataclass(frozen=True)
class KernelEntry:
    """One op whose memory differs between the CPU and the CUDA kernel."""

    op: str  # aten op or torch function
    cpu: str  # what the CPU kernel returns / saves
    cuda: str  # what the CUDA kernel returns / saves (what the tracer emits)
    source: str  # where CUDA's behaviour is written down


CUDA_KERNELS: Final[tuple[KernelEntry, ...]] = (
    KernelEntry(
        "aten::dropout (F.dropout, nn.Dropout)",
        "composite _dropout_impl: noise = empty_like(x).bernoulli_(1-p), saved in x's dtype",
        "native_dropout: output and a bool mask [x.shape] (saved for native_dropout_backward)",
        "aten/src/ATen/native/Dropout.cpp is_fused_kernel_acceptable; "
        "native/cuda/Dropout.cu dropout_cuda (mask kBool)",
    ),
    KernelEntry(
        "aten::native_layer_norm",
        "mean, rstd [rows] in the input's dtype (fp32 when input and weight dtypes differ)",
        "mean, rstd [rows] fp32 (acc_type of the input)",
        "aten/src/ATen/native/cuda/layer_norm_kernel.cu layer_norm_cuda; "
        "native/layer_norm.cpp layer_norm_cpu (param_scalar_type)",
    ),
    KernelEntry(
        "aten::scaled_dot_product_attention (backend choice)",
        "_scaled_dot_product_flash_attention_for_cpu, or math with dropout",
        "flash if 16-bit, no attn_mask, equal q/k/v head dims <= 256, square or non-causal, "
        "equal heads or enable_gqa; else memory-efficient if head dims are multiples of "
        "8 (16-bit) / 4 (fp32); else math (cuDNN first only on sm90/sm100 with cuDNN > 9.15)",
        "aten/src/ATen/native/transformers/cuda/sdp_utils.cpp select_sdp_backend, "
        "can_use_flash_attention, can_use_mem_efficient_attention, check_prefer_cudnn_attention",
    ),
    KernelEntry(
        "aten::_scaled_dot_product_flash_attention",
        "(CPU has _scaled_dot_product_flash_attention_for_cpu: lse in the compute dtype)",
        "out like q; logsumexp fp32 [B, H, Sq]; rng_state uint64 [2] and an unused uint64 [] "
        "on the device; all saved for backward",
        "aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp mha_fwd; "
        "tools/autograd/derivatives.yaml; torch/_meta_registrations.py",
    ),
    KernelEntry(
        "aten::_scaled_dot_product_flash_attention_backward",
        "(CPU kernel: no fp32 accumulator)",
        "dq, dk, dv like q, k, v; transient softmax_d fp32 [B, H, round128(Sq)] and dq_accum "
        "fp32 [B, round128(Sq), H, round32(D)] (round64 above 128); under GQA dk/dv expanded "
        "to all heads [B, Sk, H, D] in q's dtype, then summed",
        "aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp mha_bwd",
    ),
    KernelEntry(
        "aten::_scaled_dot_product_efficient_attention",
        "(not a CPU kernel)",
        "out [B, M, H, Kv] (transposed view); logsumexp fp32 [B, H, ceil32(M)]; philox "
        "seed/offset are host tensors; the attn_bias is saved (the meta function as it is)",
        "aten/src/ATen/native/transformers/cuda/attention.cu; torch/_meta_registrations.py "
        "meta__scaled_dot_product_efficient_attention",
    ),
    KernelEntry(
        "aten::_scaled_dot_product_efficient_attention_backward",
        "(not a CPU kernel)",
        "grad_q/k/v; a transient fp32 grad-q accumulator of q's size (kNeedsAccumGradQ: "
        "split keys on sm70+)",
        "aten/src/ATen/native/transformers/cuda/mem_eff_attention/kernel_backward.h "
        "kNeedsAccumGradQ",
    ),
    KernelEntry(
        "autocast fp32 list (layer_norm, native_layer_norm, group_norm, rms_norm, pow, exp, "
        "log, log1p, rsqrt, reciprocal, softplus, logsumexp, cosine_similarity)",
        "not on CPU autocast's lists: run in the input's dtype",
        "inputs cast to fp32, output fp32",
        "aten/src/ATen/autocast_mode.cpp (KERNEL_CUDA ... fp32)",
    ),
    KernelEntry(
        "autocast fp32_set_opt_dtype (softmax, log_softmax, sum, cumsum, prod without dtype)",
        "not on CPU autocast's lists: run in the input's dtype",
        "run with dtype=float32 (a 16-bit input is converted; fp16 softmax / log_softmax use "
        "the half_to_float kernel, no copy)",
        "aten/src/ATen/autocast_mode.cpp fp32_set_opt_dtype; native/SoftMax.cpp softmax / "
        "log_softmax (half_to_float on CUDA)",
    ),
    KernelEntry(
        "autocast cross_entropy_loss",
        "on CPU autocast's fp32 list: the input is cast to fp32 first",
        "not on CUDA's list: the composite's log_softmax is (fp32_set_opt_dtype)",
        "aten/src/ATen/autocast_mode.cpp (KERNEL_CPU(cross_entropy_loss, fp32))",
    ),
)

NOT_MODELLED: Final[tuple[str, ...]] = (
    "flash forward's split-KV accumulators (set_params_splitkv): freed in the forward, "
    "sized by the GPU's SM count",
    "memory-efficient backward's tile padding and key splits (workspace_size): the "
    "accumulator is taken at q's size",
    "cuBLAS workspace: allocated once before the model (measured runs record it)",
)


# -- SDPA backend choice (sdp_utils.cpp) -----------------------------------------------------

FLASH, EFFICIENT, MATH = "flash", "efficient", "math"
_HALF = (torch.float16, torch.bfloat16)


def sdpa_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    has_mask: bool,
    is_causal: bool,
    enable_gqa: bool,
) -> str:
    """The backend select_sdp_backend picks on an sm80+ GPU (default priority order)."""
    dq, dk, dv = query.shape[-1], key.shape[-1], value.shape[-1]
    heads_q, heads_k = query.shape[-3], key.shape[-3]
    heads_ok = heads_q == heads_k or (enable_gqa and heads_q % heads_k == 0)
    square = query.shape[-2] == key.shape[-2]
    if (
        query.dtype in _HALF
        and not has_mask
        and dq == dk == dv <= 256
        and (square or not is_causal)
        and heads_ok
    ):
        return FLASH
    # minimum_gemm_alignment on sm80+: 128 bits of tensor-core operand, 4 elements at least.
    # Grouped heads are taken as math's: the releases' check_batch_size_and_num_heads_dense
    # refuse them for the memory-efficient kernel.
    alignment = 8 if query.dtype in _HALF else 4
    if dq == dk and dq % alignment == 0 and dv % alignment == 0 and heads_q == heads_k:
        return EFFICIENT
    return MATH


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# -- function level: rerouted composites and CUDA autocast -----------------------------------

_FP32_LIST: Final = frozenset(
    {
        "layer_norm",
        "group_norm",
        "rms_norm",
        "pow",
        "__pow__",
        "exp",
        "log",
        "log1p",
        "log2",
        "log10",
        "expm1",
        "rsqrt",
        "reciprocal",
        "softplus",
        "logsumexp",
        "cosine_similarity",
    }
)
_SET_OPT_DTYPE: Final = frozenset({"softmax", "log_softmax", "sum", "cumsum", "prod"})
_CPU_ONLY_FP32: Final = frozenset({"cross_entropy"})


def _autocast_dtype() -> torch.dtype | None:
    """The 16-bit dtype of the CPU autocast the trace runs under (None: autocast is off)."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    return torch.get_autocast_dtype("cpu")


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """autocast's cached_cast: floating tensors (not fp64) to ``dtype``."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        if value.dtype is not torch.float64 and value.dtype is not dtype:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


class CudaFunctions(TorchFunctionMode):
    """Reroute composites to CUDA's kernels and apply CUDA autocast's lists (above autograd)."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is F.dropout or func is torch.dropout:
            return _dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return _sdpa(*args, **kwargs)
        if func is torch.Tensor.backward and len(args) == 1 and not any(kwargs.values()):
            return self._backward(args[0])
        amp = _autocast_dtype()
        if amp is None:
            return func(*args, **kwargs)
        if name in _FP32_LIST:
            with torch.autocast("cpu", enabled=False):
                return func(*_cast_floats(args, torch.float32), **kwargs)
        if name in _SET_OPT_DTYPE and kwargs.get("dtype") is None and _has_half(args):
            return _set_opt_dtype(func, name, args, kwargs)
        if name in _CPU_ONLY_FP32 and func is F.cross_entropy:
            return _cross_entropy(*args, **kwargs)
        return func(*args, **kwargs)

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with this mode on: a mode is off while its handler runs, and the
        backward (checkpointing's recomputation inside it) runs CUDA's functions too. The
        gradient of the scalar loss is ones_like(loss), as torch.autograd.backward makes it."""
        from torch.autograd.graph import _engine_run_backward

        with self:
            grad = torch.ones_like(loss, memory_format=torch.preserve_format)
            _engine_run_backward(
                (loss,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True
            )


def _has_half(args: tuple[Any, ...]) -> bool:
    first = args[0] if args else None
    return isinstance(first, torch.Tensor) and first.dtype in _HALF


def _set_opt_dtype(func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The op with dtype=float32; fp16 softmax / log_softmax take CUDA's half_to_float kernel."""
    x = args[0]
    if name in ("softmax", "log_softmax") and x.dtype is torch.float16:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        op = aten._softmax if name == "softmax" else aten._log_softmax
        with torch.autocast("cpu", enabled=False):
            return op(x, dim, True)
    with torch.autocast("cpu", enabled=False):
        return func(*args, **{**kwargs, "dtype": torch.float32})


def _cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """cross_entropy_loss is not on CUDA autocast's lists: its log_softmax runs in fp32
    (fp32_set_opt_dtype) and nll_loss (fp32 list) takes that."""
    if label_smoothing or size_average is not None or reduce is not None or input.dim() != 2:
        return F.cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    logp = _set_opt_dtype(F.log_softmax, "log_softmax", (input, 1), {})
    with torch.autocast("cpu", enabled=False):
        return F.nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)


def _dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Dropout.cpp: a CUDA tensor with 0 < p < 1 takes the fused native_dropout (bool mask)."""
    if not training or not 0 < p < 1 or input.numel() == 0:
        return F.dropout(input, p, training, inplace)
    out: torch.Tensor = aten.native_dropout(input, p, True)[0]
    if inplace:
        return input.copy_(out)
    return out


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """scaled_dot_product_attention on CUDA: autocast's cast, the boolean mask converted
    (convert_boolean_attn_mask), then the backend select_sdp_backend picks."""
    amp = _autocast_dtype()
    if amp is not None:  # on CUDA's lower-precision list (and the CPU's)
        query, key, value = (_cast_floats(t, amp) for t in (query, key, value))
        attn_mask = _cast_floats(attn_mask, amp)
    with torch.autocast("cpu", enabled=False):
        if attn_mask is not None and attn_mask.dtype is torch.bool:
            zero = torch.scalar_tensor(0.0, dtype=query.dtype)
            attn_mask = torch.where(attn_mask.logical_not(), -math.inf, zero)
        backend = sdpa_backend(
            query,
            key,
            value,
            has_mask=attn_mask is not None,
            is_causal=is_causal,
            enable_gqa=enable_gqa,
        )
        if backend == FLASH:
            out = aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        elif backend == EFFICIENT:
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            out = aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale
            )[0]
        else:
            out = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
    result: torch.Tensor = out
    return result


# -- kernel level: outputs and workspaces ------------------------------------------------------


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[..., Any]) -> Any:
    """layer_norm_cuda: mean and rstd in fp32 (the input's accumulate type)."""
    x, normalized_shape = args[0], args[1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    axis = x.dim() - len(normalized_shape)
    stat_shape = (*x.shape[:axis], *([1] * len(normalized_shape)))
    acc = torch.float32 if x.dtype in _HALF else x.dtype
    mean = torch.empty(stat_shape, dtype=acc)
    rstd = torch.empty(stat_shape, dtype=acc)
    return out, mean, rstd


def _flash_forward(args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[..., Any]) -> Any:
    """mha_fwd: out like q, fp32 logsumexp [B, H, Sq], rng_state uint64 [2] and an unused
    uint64 [] on the device (all saved for backward)."""
    query, key = args[0], args[1]
    batch, heads, seq_q = query.shape[0], query.shape[1], query.shape[2]
    out = torch.empty_like(query)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32)
    rng_state = torch.empty((2,), dtype=torch.uint64)
    unused = torch.empty((), dtype=torch.uint64)
    debug = torch.empty((0,), dtype=query.dtype, device="meta")
    return (out, lse, None, None, seq_q, key.shape[2], rng_state, unused, debug)


def _flash_backward(args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[..., Any]) -> Any:
    """mha_bwd: dq, dk, dv, then softmax_d and the fp32 dq accumulator (and under GQA dk/dv
    over all query heads), freed when the kernel returns."""
    grad_out, query, key, value = args[0], args[1], args[2], args[3]
    batch, heads, seq_q, head_dim = query.shape
    seq_k, heads_k = key.shape[2], key.shape[1]
    # _flash_attention_backward: grad_out.contiguous() and out.contiguous() in (B, S, H, D).
    grad_contig = grad_out.transpose(1, 2).contiguous()
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    seq_q_rounded = _round_up(seq_q, 128)
    head_rounded = _round_up(_round_up(head_dim, 8), 32 if head_dim <= 128 else 64)
    softmax_d = torch.empty((batch, heads, seq_q_rounded), dtype=torch.float32)
    dq_accum = torch.empty((batch, seq_q_rounded, heads, head_rounded), dtype=torch.float32)
    expanded: list[torch.Tensor] = []
    if heads_k != heads:
        shape = (batch, seq_k, heads, head_dim)
        expanded = [torch.empty(shape, dtype=query.dtype) for _ in range(2)]
    del grad_contig, softmax_d, dq_accum, expanded
    return dq, dk, dv


def _efficient_backward(
    args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[..., Any]
) -> Any:
    """The grads (meta function), and the fp32 grad-q accumulator of q's size beside them."""
    grads = run()
    accum = torch.empty(args[1].shape, dtype=torch.float32)
    del accum
    return grads


_KERNELS: Final[dict[Any, Callable[..., Any]]] = {
    aten.native_layer_norm.default: _layer_norm,
    aten._scaled_dot_product_flash_attention.default: _flash_forward,
    aten._scaled_dot_product_flash_attention_backward.default: _flash_backward,
    aten._scaled_dot_product_efficient_attention_backward.default: _efficient_backward,
}


class CudaKernels(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """CUDA's outputs and workspaces for the kernels in the table; others pass through.

    Entered above the tracker, so what it allocates is what the tracker records.
    """

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        kernel = _KERNELS.get(func)
        if kernel is None:
            return func(*args, **kwargs)
        return kernel(args, kwargs, lambda: func(*args, **kwargs))


@contextlib.contextmanager
def cuda_kernels() -> Iterator[None]:
    """CUDA's kernels for the fake trace run inside (enter after the tracker)."""
    with CudaFunctions(), CudaKernels():  # type: ignore[no-untyped-call]
        yield

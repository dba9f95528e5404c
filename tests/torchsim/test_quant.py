"""NF4 storage laid out as bitsandbytes lays it out, and the MatMul4Bit memory behaviour."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memplan.torchsim.quant import (  # noqa: E402
    NF4_CODE,
    Linear4bit,
    dequantize_4bit,
    dequantize_weight,
)

pytestmark = pytest.mark.torch


def _materialized(out_features: int, in_features: int, *, double_quant: bool) -> Linear4bit:
    layer = Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        weight_dtype=torch.bfloat16,
        double_quant=double_quant,
    )
    torch.manual_seed(0)
    layer.materialize_({}, fill=True)
    return layer


def _state_nbytes(layer: Linear4bit) -> dict[str, int]:
    return {
        name: getattr(layer, name).untyped_storage().nbytes()
        for name in layer.quant_state_buffers()
    }


def test_nf4_storage_matches_bitsandbytes_without_double_quant() -> None:
    layer = _materialized(352, 128, double_quant=False)  # 45056 weights, 704 blocks of 64
    assert layer.weight.dtype is torch.uint8
    assert tuple(layer.weight.shape) == (22528, 1)  # ((n + 1) // 2, 1) packed codes
    assert _state_nbytes(layer) == {"quant_absmax": 704 * 4, "quant_code": 16 * 4}


def test_nf4_storage_matches_bitsandbytes_with_double_quant() -> None:
    layer = _materialized(352, 128, double_quant=True)
    assert _state_nbytes(layer) == {
        "quant_absmax": 704,  # uint8 code per block
        "quant_code": 64,  # 16 fp32 NF4 values, one copy per weight
        "quant_offset": 4,  # mean of the absmax, 0-dim fp32
        "quant_nested_absmax": 3 * 4,  # fp32 per 256 blocks
        "quant_nested_code": 256 * 4,  # code.to(device, copy=True): one copy per weight
        "quant_dynamic_code": 256 * 4,  # bnb's module-level name2qmap["dynamic"], shared
    }


def test_the_dynamic_code_book_is_shared_between_weights() -> None:
    shared: dict[str, torch.Tensor] = {}
    layers = [
        Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, weight_dtype=torch.bfloat16,
                   double_quant=True)
        for _ in range(2)
    ]  # fmt: skip
    for layer in layers:
        layer.materialize_(shared, fill=True)
    assert layers[0].quant_dynamic_code is layers[1].quant_dynamic_code
    assert layers[0].quant_nested_code is not layers[1].quant_nested_code


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantized_weight_is_close_to_the_original(double_quant: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.02
    layer = _materialized(96, 64, double_quant=double_quant)
    packed, absmax = torch.ops.memplan.quantize_4bit(weight, NF4_CODE, 64)
    restored = dequantize_4bit(packed, absmax, NF4_CODE, 64, [96, 64], torch.float32)
    # NF4's widest gap between neighbouring codes is 0.30 of the block's absmax.
    block_absmax = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert ((restored - weight).reshape(-1, 64).abs() <= 0.16 * block_absmax).all()
    assert dequantize_weight(layer.weight, layer.quant_state()).shape == (96, 64)


def test_fake_kernels_allocate_only_the_outputs() -> None:
    with FakeTensorMode():
        packed = torch.empty((4096 * 4096 // 2, 1), dtype=torch.uint8)
        absmax = torch.empty((4096 * 4096 // 64,), dtype=torch.float32)
        code = torch.empty(16)
        weight = dequantize_4bit(packed, absmax, code, 64, [4096, 4096], torch.bfloat16)
    assert (tuple(weight.shape), weight.dtype) == ((4096, 4096), torch.bfloat16)


def test_matmul_4bit_saves_nothing_for_backward_and_dequantizes_again() -> None:
    layer = _materialized(96, 64, double_quant=True)
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert saved == []  # the packed weight rides on ctx, not save_for_backward
    out.sum().backward()
    assert x.grad is not None
    assert x.grad.shape == (2, 5, 64)

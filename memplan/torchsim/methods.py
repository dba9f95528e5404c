"""Prepare a model on the meta device for a setup: quantize its frozen linears, apply the method.

Quantization (``TrainingSetup.quant``) swaps every linear but the LM head for a quantized one
(here memplan's NF4 :class:`~memplan.torchsim.quant.Linear4bit`, or bitsandbytes' layers in a
measured run); the method's own module then decides what trains and what it adds
(:meth:`memplan.methods.TuningMethod.apply`, through peft where peft has it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memplan.dtypes import Quantization
from memplan.errors import MemplanError
from memplan.specs import ModelSpec, TrainingSetup
from memplan.torchsim.models import COMPUTE_DTYPES, BuiltModel, lm_head_of
from memplan.torchsim.quant import Linear4bit


def apply_method(built: BuiltModel, spec: ModelSpec, setup: TrainingSetup) -> nn.Module:
    """``built.model`` quantized as ``setup.quant`` says and prepared for ``setup.method``."""
    if setup.quant is not Quantization.NONE:
        if setup.quant is Quantization.INT8:
            raise MemplanError(
                "quant=int8 is traced with bitsandbytes' own layers only (memplan emulates 4-bit "
                "weights); measure it on a GPU"
            )
        quantize_linears(built.model, setup)
        if setup.kbit_prep:
            prepare_for_kbit_training(built.model)
    model: nn.Module = setup.tuning.apply(built, spec, setup)
    return model


def prepare_for_kbit_training(model: nn.Module) -> None:
    """peft's ``prepare_model_for_kbit_training`` on the quantized model: freeze it and upcast
    every fp16/bf16 parameter but the 4-bit weights to fp32 (on the meta device, before they
    are materialized).

    ``use_gradient_checkpointing=False``: checkpointing and the input embeddings that require
    grad come from ``TrainingSetup.grad_ckpt`` (non-reentrant; peft's default passes no
    ``use_reentrant``, which torch.utils.checkpoint reads as reentrant).
    """
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


QuantizedLinearFactory = Callable[[int, int, bool, torch.dtype], nn.Module]
"""(in_features, out_features, has_bias, weight dtype) -> a quantized linear on the meta device."""


def quantize_linears(
    model: nn.Module, setup: TrainingSetup, make: QuantizedLinearFactory | None = None
) -> None:
    """Swap every linear except the LM head for a quantized one (default: NF4 :class:`Linear4bit`).

    transformers' bitsandbytes integration skips the output embedding and the modules the model
    keeps in fp32 (``_keep_in_fp32_modules``, e.g. T5's ``wo``; get_keys_to_not_convert).
    ``make`` builds the replacement (a measured run passes bitsandbytes' own layers).
    """
    head = lm_head_of(model)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    compute = COMPUTE_DTYPES[setup.precision]

    def nf4(in_f: int, out_f: int, bias: bool, weight_dtype: torch.dtype) -> nn.Module:
        return Linear4bit(
            in_f,
            out_f,
            bias=bias,
            compute_dtype=compute,
            weight_dtype=weight_dtype,  # QuantState.dtype: what dequantization returns
            double_quant=setup.double_quant,
        )

    make = make or nf4
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head or name in keep or not _is_linear(child):
                continue
            weight = child.weight
            assert isinstance(weight, torch.Tensor)
            # Conv1D (GPT-2) stores (in, out); nn.Linear stores (out, in).
            out_f, in_f = weight.shape if isinstance(child, nn.Linear) else weight.shape[::-1]
            has_bias = getattr(child, "bias", None) is not None
            setattr(parent, name, make(int(in_f), int(out_f), has_bias, weight.dtype))

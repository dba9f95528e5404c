"""Apply a fine-tuning method to a model on the meta device: which weights train, which are
quantized, which adapters are added.

- full: every parameter trains; frozen: none (forward only);
- lora: peft ``LoraConfig`` on the roles' modules, ``get_peft_model`` defaults (adapters are
  autocast to fp32, ``autocast_adapter_dtype=True``);
- qlora: every linear except the LM head becomes an NF4 :class:`Linear4bit`, then LoRA with
  peft's 4-bit LoRA forward (:class:`LoraLinear4bit`);
- bitfit: biases of linear layers; without any, the norms' biases; without those, nothing;
- adapter: bottleneck adapters after attention and MLP (:mod:`memplan.torchsim.adapters`);
- prefix: peft ``PrefixTuningConfig`` with ``prefix_len`` virtual tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from memplan.errors import MemplanError
from memplan.specs import Method, ModelSpec, TrainingSetup
from memplan.specs.training import LinearRole
from memplan.torchsim.adapters import add_bottleneck_adapters
from memplan.torchsim.models import COMPUTE_DTYPES, BuiltModel, lm_head_of
from memplan.torchsim.quant import Linear4bit

# Module names of each role in transformers' Llama-style models (modeling_llama).
_LLAMA_MODULES: dict[LinearRole, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
# peft's default LoRA targets of Llama-style families
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
_DEFAULT_ROLES: tuple[LinearRole, ...] = ("q", "v")


def lora_target_modules(spec: ModelSpec, roles: Sequence[LinearRole] | None) -> list[str] | None:
    """peft ``target_modules`` for ``roles`` (None: peft's default for the family)."""
    names = _role_module_names(spec)
    if roles is None:
        if spec.family not in ("llama", "mistral", "qwen2", "mixtral"):
            return None  # peft picks its own per-model_type default
        roles = _DEFAULT_ROLES
    return sorted({names[r] for r in roles if r in names})


def _role_module_names(spec: ModelSpec) -> dict[LinearRole, str]:
    try:
        from memplan.architecture import lora_module_names
    except ImportError:
        return dict(_LLAMA_MODULES)
    try:
        return dict(lora_module_names(spec))
    except (NotImplementedError, KeyError, ValueError):
        return dict(_LLAMA_MODULES)


def apply_method(built: BuiltModel, spec: ModelSpec, setup: TrainingSetup) -> nn.Module:
    """``built.model`` prepared for ``setup.method`` (possibly wrapped by peft)."""
    model = built.model
    method = setup.method
    if method is Method.FULL:
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if method is Method.FROZEN:
        return model
    if method is Method.BITFIT:
        _enable_biases(model, built.notes)
        return model
    if method is Method.ADAPTER:
        add_bottleneck_adapters(model, setup, built.notes)
        return model
    if method is Method.PREFIX:
        return _prefix_tuning(built, setup)
    if method is Method.QLORA:
        quantize_linears(model, setup)
    return lora_model(built, spec, setup)


def _enable_biases(model: nn.Module, notes: list[str]) -> None:
    linear = [
        m.bias for m in model.modules() if _is_linear(m) and getattr(m, "bias", None) is not None
    ]
    if linear:
        for bias in linear:
            bias.requires_grad_(True)
        return
    norm = [
        m.bias
        for m in model.modules()
        if "Norm" in type(m).__name__ and isinstance(getattr(m, "bias", None), nn.Parameter)
    ]
    for bias in norm:
        bias.requires_grad_(True)
    if norm:
        notes.append("bitfit: no linear biases, training the norms' biases")
    else:
        notes.append("bitfit: the model has no biases, so nothing trains (forward and loss only)")


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


def lora_model(built: BuiltModel, spec: ModelSpec, setup: TrainingSetup) -> nn.Module:
    """``built.model`` wrapped by peft with ``setup``'s LoRA (on memplan's or bnb's 4-bit
    layers)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=setup.lora_r,
        lora_alpha=setup.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, takes float
        lora_dropout=setup.lora_dropout,
        target_modules=lora_target_modules(spec, setup.lora_targets),
        # GPT-2's Conv1D stores (in, out): peft needs fan_in_fan_out=True for it.
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in built.model.modules()),
        bias="none",
        task_type=_task_type(built),
    )
    if any(isinstance(m, Linear4bit) for m in built.model.modules()):
        from memplan.torchsim.qlora import LoraLinear4bit

        config._register_custom_module({Linear4bit: LoraLinear4bit})
    peft_model: nn.Module = get_peft_model(built.model, config)
    return peft_model


def _task_type(built: BuiltModel) -> Any:
    if not built.is_hf:
        return None  # the reference decoder is called through PeftModel.forward as is
    return "SEQ_2_SEQ_LM" if built.is_encoder_decoder else "CAUSAL_LM"


def _prefix_tuning(built: BuiltModel, setup: TrainingSetup) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    if not built.is_hf:
        raise MemplanError("prefix tuning needs a transformers model (peft feeds past_key_values)")
    config = PrefixTuningConfig(task_type=_task_type(built), num_virtual_tokens=setup.prefix_len)
    peft_model: nn.Module = get_peft_model(built.model, config)
    return peft_model

"""Build the model of a ModelSpec on the meta device: Hugging Face from its config, or the
reference decoder. Nothing is allocated here; :mod:`memplan.torchsim.materialize` does that.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from memplan.catalog import catalog_names, catalog_record
from memplan.errors import MemplanError
from memplan.families import family
from memplan.families._traced import TracedLayout
from memplan.specs import Attention, ModelSpec, Precision, TrainingSetup
from memplan.torchsim.reference_decoder import ReferenceDecoder

Backend = Literal["auto", "hf", "reference"]

# Weight storage dtype per precision regime (TrainingSetup.precision.weight_dtype).
WEIGHT_DTYPES = {
    Precision.FP32: torch.float32,
    Precision.FP16_AMP: torch.float32,
    Precision.BF16_AMP: torch.float32,
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
}
COMPUTE_DTYPES = {
    Precision.FP32: torch.float32,
    Precision.FP16_AMP: torch.float16,
    Precision.BF16_AMP: torch.bfloat16,
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
}
_LLAMA_LIKE = ("llama", "mistral", "qwen2")


def load_dtype(setup: TrainingSetup) -> torch.dtype:
    """The dtype the model is loaded in: its storage dtype, or with ``kbit_prep`` the 16-bit
    compute dtype (torch_dtype=bfloat16) that prepare_model_for_kbit_training then upcasts."""
    return COMPUTE_DTYPES[setup.precision] if setup.kbit_prep else WEIGHT_DTYPES[setup.precision]


@dataclass
class BuiltModel:
    """A model on the meta device and the parts the tracer needs to find in it."""

    model: nn.Module
    family: str
    is_hf: bool
    is_encoder_decoder: bool
    notes: list[str] = field(default_factory=list)
    causal_lm: bool = True  # a decoder trained on next-token prediction (peft task CAUSAL_LM)
    reference: nn.Module | None = None  # DPO's reference copy (a second model, on meta)


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def hf_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """The config.json of ``spec``: the catalog's record, else one written from the spec."""
    if spec.name in catalog_names():
        config: dict[str, Any] = dict(catalog_record(spec.name)["config"])
        return config
    if isinstance(spec.layout, TracedLayout):  # a traced-only model carries its config.json
        return dict(spec.layout.config)
    if spec.family not in _LLAMA_LIKE:
        raise MemplanError(
            f"{spec.name}: no config.json for family {spec.family!r}; pass hf_config explicitly"
        )
    return {
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_decoder_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": spec.hidden_act,
        "max_position_embeddings": spec.max_position_embeddings,
        "attention_bias": spec.attention_bias,
        "mlp_bias": spec.mlp_bias,
        "tie_word_embeddings": spec.tie_word_embeddings,
    }


def attention_implementation(attention: Attention, notes: list[str]) -> str:
    if attention is Attention.FLASH:
        # flash-attn kernels need CUDA; SDPA's flash backend keeps the same tensors
        # (output and logsumexp), so the CPU tracer runs SDPA for attention=flash.
        notes.append("attention=flash traced as sdpa (flash-attn kernels need CUDA)")
        return "sdpa"
    return str(attention.value)


def build_meta_model(
    spec: ModelSpec,
    setup: TrainingSetup,
    *,
    backend: Backend = "auto",
    hf_config: dict[str, Any] | None = None,
    num_layers: int | None = None,
) -> BuiltModel:
    """The model of ``spec`` with parameters on the meta device (buffers real, on the CPU).

    ``num_layers`` builds a shorter copy of the same architecture (for layer folding); by
    default a decoder has the spec's depth, whatever the catalog's config.json says.
    """
    notes: list[str] = []
    implementation = attention_implementation(setup.attention, notes)
    use_hf = backend == "hf" or (backend == "auto" and has_transformers())
    if not use_hf:
        if spec.family not in _LLAMA_LIKE:
            raise MemplanError(
                f"the reference decoder is Llama-style; {spec.family!r} needs transformers"
            )
        if num_layers is not None:
            spec = spec.model_copy(update={"num_decoder_layers": num_layers})
        model = _reference_on_meta(spec, implementation, load_dtype(setup))
        return BuiltModel(model, spec.family, is_hf=False, is_encoder_decoder=False, notes=notes)
    config = dict(hf_config if hf_config is not None else hf_config_dict(spec))
    if num_layers is None and not spec.is_encoder_decoder:
        num_layers = spec.num_layers
    model = _hf_on_meta(config, implementation, load_dtype(setup), notes, num_layers)
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    return BuiltModel(
        model,
        str(config["model_type"]),
        is_hf=True,
        is_encoder_decoder=encdec,
        notes=notes,
        causal_lm=family(spec.family).causal and not encdec,
    )


def _reference_on_meta(spec: ModelSpec, implementation: str, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = ReferenceDecoder(spec, attention=implementation)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def _hf_on_meta(
    config_dict: dict[str, Any],
    implementation: str,
    dtype: torch.dtype,
    notes: list[str],
    num_layers: int | None,
) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from memplan.catalog.hf_model import hf_class_name

    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model(config_dict["model_type"], **fields)
    model_class = _model_class(transformers, hf_class_name(config_dict), config)
    # A model with sub-configurations (Gemma3's text_config beside its vision_config) keeps
    # its decoder depth in the text one (PreTrainedConfig.get_text_config).
    text = config.get_text_config()
    if num_layers is not None and text.num_hidden_layers != num_layers:
        if text is config:
            fields = _with_layers(config, config_dict, fields, num_layers)
        else:
            nested = dict(config_dict["text_config"])
            fields["text_config"] = _with_layers(text, nested, nested, num_layers)
        config = AutoConfig.for_model(config_dict["model_type"], **fields)
    with init_empty_weights(include_buffers=False):
        try:
            model: nn.Module = model_class._from_config(
                config, dtype=dtype, attn_implementation=implementation
            )
        except ValueError as exc:
            if implementation == "eager" or "attention implementation" not in str(exc):
                raise
            # Some families refuse SDPA (transformers raises): they train with eager attention.
            notes.append(
                f"{config_dict['model_type']} does not support {implementation}: traced eager"
            )
            model = model_class._from_config(config, dtype=dtype, attn_implementation="eager")
    # from_pretrained ties the output embedding to the input embedding; from_config on the
    # meta device leaves them apart, so tie them as a loaded model has them.
    tie: Any = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return model


def _with_layers(
    config: Any, config_dict: dict[str, Any], fields: dict[str, Any], num_layers: int
) -> dict[str, Any]:
    """``fields`` for a copy of ``config`` with ``num_layers`` layers, so that per-layer lists
    (layer_types) follow: an explicit list keeps its first layers, else the configuration
    class derives it; GPT-2 calls the field n_layer."""
    key = config.attribute_map.get("num_hidden_layers", "num_hidden_layers")
    fields = {k: v for k, v in fields.items() if k != "layer_types"} | {key: num_layers}
    if isinstance(config_dict.get("layer_types"), list):
        fields["layer_types"] = config_dict["layer_types"][:num_layers]
    return fields


def _model_class(transformers: Any, name: str, config: Any) -> Any:
    """The transformers class called ``name``; an Auto class resolves to the config's own."""
    found = getattr(transformers, name, None)
    if found is None:
        raise MemplanError(f"transformers {transformers.__version__} has no class {name}")
    if name.startswith("Auto"):
        try:
            return found._model_mapping[type(config)]
        except KeyError:
            raise MemplanError(
                f"transformers has no {name.removeprefix('Auto')} for model_type "
                f"{config.model_type!r}"
            ) from None
    return found


def decoder_layer_stacks(model: nn.Module) -> list[list[nn.Module]]:
    """The lists of repeated transformer blocks (one for decoders, two for T5).

    A vision tower's encoder layers are not among them: a sub-model whose main input is
    ``pixel_values`` (SiglipVisionModel.main_input_name) never runs on a text-only batch.
    """
    vision = [m for m in model.modules() if getattr(m, "main_input_name", "") == "pixel_values"]
    inside_vision = {id(sub) for tower in vision for sub in tower.modules()}
    stacks = []
    for module in model.modules():
        if id(module) in inside_vision:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            name = next(iter(kinds)).__name__
            if len(kinds) == 1 and ("Layer" in name or "Block" in name):
                stacks.append(list(module))
    return stacks


def peft_task_type(built: BuiltModel) -> str | None:
    """peft's task type for the model (None: the reference decoder, called as is)."""
    if not built.is_hf:
        return None
    if built.is_encoder_decoder:
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM" if built.causal_lm else None


def lm_head_of(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        return head
    found = getattr(model, "lm_head", None)
    return found if isinstance(found, nn.Module) else None

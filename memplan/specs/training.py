"""TrainingSetup: what is trained, in which precision, with which optimizer and batch shape."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from memplan._compat import StrEnum
from memplan.dtypes import DType, Quantization


class Method(StrEnum):
    """How much of the model is trained."""

    FULL = "full"  # every parameter
    LORA = "lora"  # low-rank adapters on frozen 16/32-bit weights (peft LoraConfig)
    QLORA = "qlora"  # LoRA on 4-bit frozen weights (QLoRA, arXiv:2305.14314)
    ADAPTER = "adapter"  # bottleneck adapters after attention and MLP (Houlsby et al. 2019)
    PREFIX = "prefix"  # trainable key/value prefixes per layer (Li & Liang 2021, peft)
    BITFIT = "bitfit"  # biases only (Ben Zaken et al. 2021)
    FROZEN = "frozen"  # forward pass only (inference / evaluation)


class Precision(StrEnum):
    """Weight storage and compute regime."""

    FP32 = "fp32"  # fp32 weights, fp32 compute
    FP16_AMP = "fp16-amp"  # fp32 weights, torch.autocast(fp16) compute, GradScaler
    BF16_AMP = "bf16-amp"  # fp32 weights, torch.autocast(bf16) compute
    FP16 = "fp16"  # fp16 weights and compute ("pure" half precision)
    BF16 = "bf16"  # bf16 weights and compute

    @property
    def weight_dtype(self) -> DType:
        """Dtype the (unquantized) parameters are stored in."""
        return _WEIGHT_DTYPE[self]

    @property
    def compute_dtype(self) -> DType:
        """Dtype matmuls run and activations are kept in."""
        return _COMPUTE_DTYPE[self]

    @property
    def is_amp(self) -> bool:
        return self in (Precision.FP16_AMP, Precision.BF16_AMP)


_WEIGHT_DTYPE: Final = {
    Precision.FP32: DType.FP32,
    Precision.FP16_AMP: DType.FP32,
    Precision.BF16_AMP: DType.FP32,
    Precision.FP16: DType.FP16,
    Precision.BF16: DType.BF16,
}
_COMPUTE_DTYPE: Final = {
    Precision.FP32: DType.FP32,
    Precision.FP16_AMP: DType.FP16,
    Precision.BF16_AMP: DType.BF16,
    Precision.FP16: DType.FP16,
    Precision.BF16: DType.BF16,
}


class Optimizer(StrEnum):
    ADAMW = "adamw"  # torch.optim.AdamW: exp_avg, exp_avg_sq in the parameter dtype
    ADAMW_8BIT = "adamw-8bit"  # bnb.optim.AdamW8bit: blockwise 8-bit states
    PAGED_ADAMW = "paged-adamw"  # bnb.optim.PagedAdamW32bit: fp32 states in CUDA unified memory
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"  # bnb.optim.PagedAdamW8bit
    SGD = "sgd"  # torch.optim.SGD(momentum=0.9): one momentum buffer
    ADAFACTOR = "adafactor"  # factored second moment, no first moment (Shazeer & Stern 2018)
    LION = "lion"  # one momentum buffer (Chen et al. 2023), bnb.optim.Lion


class OptimizerImpl(StrEnum):
    """How torch optimizers loop over parameters: decides the step's temporaries."""

    FUSED = "fused"  # one fused kernel per group (HF Trainer's default adamw_torch_fused)
    FOREACH = "foreach"  # torch._foreach_* over the whole group: group-sized temporaries
    FOR_LOOP = "for-loop"  # one parameter at a time: temporaries of the largest parameter


class Attention(StrEnum):
    EAGER = "eager"  # matmul + softmax: saves the s x s probabilities
    SDPA = "sdpa"  # torch scaled_dot_product_attention (flash / memory-efficient backends)
    FLASH = "flash"  # flash-attn 2 kernels (attn_implementation="flash_attention_2")


LinearRole = Literal["q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "router"]
"""Roles of linear layers, independent of each family's module names (see architecture)."""

ALL_LINEAR: Final[tuple[LinearRole, ...]] = (
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "gate",
    "up",
    "gate_up",
    "down",
)

# Typical setups per method, applied to fields the caller leaves out (reported as assumptions).
METHOD_DEFAULTS: Final[dict[Method, dict[str, Any]]] = {
    # Full fine-tuning with HF Trainer --bf16: fp32 weights under autocast, fused AdamW.
    Method.FULL: {"precision": Precision.BF16_AMP, "optimizer": Optimizer.ADAMW},
    # peft LoRA on a bf16 model: LoraConfig defaults (r=8, alpha=8, q and v projections).
    Method.LORA: {"precision": Precision.BF16, "optimizer": Optimizer.ADAMW},
    # QLoRA paper recipe (arXiv:2305.14314, qlora.py): NF4 + double quant, bf16 compute,
    # paged AdamW 32-bit, r=64 alpha=16 on all linear layers, gradient checkpointing.
    Method.QLORA: {
        "precision": Precision.BF16,
        "quant": Quantization.NF4,
        "double_quant": True,
        "optimizer": Optimizer.PAGED_ADAMW,
        "grad_ckpt": True,
        "lora_r": 64,
        "lora_alpha": 16.0,
        "lora_dropout": 0.05,
        "lora_targets": ALL_LINEAR,
    },
    Method.ADAPTER: {"precision": Precision.BF16, "optimizer": Optimizer.ADAMW},
    Method.PREFIX: {"precision": Precision.BF16, "optimizer": Optimizer.ADAMW},
    Method.BITFIT: {"precision": Precision.BF16, "optimizer": Optimizer.ADAMW},
    Method.FROZEN: {"precision": Precision.BF16, "optimizer": Optimizer.ADAMW},
}


class TrainingSetup(BaseModel):
    """One training step's configuration on one model replica."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    method: Method = Field(default=Method.FULL, description="What is trained.")
    precision: Precision = Field(
        default=Precision.BF16_AMP, description="Weight storage and compute regime."
    )
    master_weights: bool | None = Field(
        default=None,
        description="Keep an fp32 master copy of 16-bit trainable weights for the optimizer "
        "(DeepSpeed/ZeRO mixed precision). None: on exactly when DeepSpeed ZeRO trains 16-bit "
        "weights.",
    )
    quant: Quantization = Field(
        default=Quantization.NONE, description="Quantization of the frozen linear weights."
    )
    double_quant: bool = Field(
        default=True, description="Quantize the 4-bit absmax scales too (QLoRA double quant)."
    )
    optimizer: Optimizer = Field(default=Optimizer.ADAMW, description="Optimizer.")
    optimizer_impl: OptimizerImpl = Field(
        default=OptimizerImpl.FUSED, description="Loop strategy of torch optimizers."
    )
    micro_batch_size: PositiveInt = Field(default=1, description="Sequences per forward pass.")
    seq_len: PositiveInt = Field(default=512, description="Tokens per sequence (padded length).")
    target_seq_len: PositiveInt | None = Field(
        default=None, description="Decoder length of encoder-decoder models (None: seq_len)."
    )
    grad_accum_steps: PositiveInt = Field(
        default=1, description="Micro-batches accumulated into one optimizer step."
    )
    grad_ckpt: bool = Field(default=False, description="Activation (gradient) checkpointing.")
    grad_ckpt_every: PositiveInt = Field(
        default=1, description="Checkpoint every k-th layer (1: every layer)."
    )
    attention: Attention = Field(default=Attention.SDPA, description="Attention implementation.")
    quant_matmul_saves_input: bool = Field(
        default=False,
        description="bitsandbytes before 0.43.2 kept each 4-bit matmul's input for backward "
        "(MatMul4Bit ctx.tensors = (A, B)); later releases keep only the packed weight.",
    )
    logits_fp32: bool = Field(
        default=True,
        description="The loss upcasts logits to fp32 (transformers ForCausalLMLoss); False: "
        "cross-entropy on logits in the compute dtype (litgpt's chunked cross-entropy).",
    )
    device: Literal["cuda", "cpu"] = Field(
        default="cuda",
        description="Where the step runs: decides kernel workspaces (flash backward's fp32 dQ "
        "accumulator), SDPA fallbacks and whether optimizer step counters live on the device.",
    )
    lora_r: PositiveInt = Field(default=8, description="LoRA rank r.")
    lora_alpha: float = Field(default=8.0, gt=0, description="LoRA scaling numerator alpha.")
    lora_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (saves a mask)."
    )
    lora_targets: tuple[LinearRole, ...] | None = Field(
        default=None,
        description="Linear roles that get adapters; None: peft's default for the family.",
    )
    adapter_dtype: DType = Field(
        default=DType.FP32,
        description="Dtype of LoRA/adapter weights (peft autocasts adapters to fp32).",
    )
    adapter_size: PositiveInt = Field(default=64, description="Bottleneck width of adapters.")
    prefix_len: PositiveInt = Field(default=30, description="Virtual tokens of prefix tuning.")
    defaults_from_method: tuple[str, ...] = Field(
        default=(),
        description="Fields filled from the method's typical setup (reported as assumptions).",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("defaults_from_method"):
            return data
        try:
            method = Method(data.get("method", Method.FULL))
        except ValueError:
            return data  # field validation reports the bad method
        filled = {k: v for k, v in METHOD_DEFAULTS[method].items() if data.get(k) is None}
        return {**data, **filled, "defaults_from_method": tuple(sorted(filled))}

    @model_validator(mode="after")
    def _check_combination(self) -> TrainingSetup:
        quantized = self.quant is not Quantization.NONE
        if self.method is Method.QLORA and self.quant not in (Quantization.NF4, Quantization.FP4):
            raise ValueError(f"method=qlora needs quant nf4 or fp4, got quant={self.quant}")
        if self.method is Method.QLORA and self.precision is Precision.FP32:
            raise ValueError(
                "method=qlora computes in 16-bit (bnb_4bit_compute_dtype): use precision bf16 or "
                "fp16, not fp32"
            )
        if quantized and self.method in (Method.FULL, Method.BITFIT):
            raise ValueError(
                f"quant={self.quant} freezes the linear weights: method={self.method} cannot train "
                "them (use lora/qlora/adapter/prefix)"
            )
        if self.grad_ckpt_every > 1 and not self.grad_ckpt:
            raise ValueError("grad_ckpt_every > 1 needs grad_ckpt=True")
        return self

    @property
    def uses_lora(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA)

    @property
    def decoder_seq_len(self) -> int:
        return self.target_seq_len or self.seq_len

    @property
    def trains_weights(self) -> bool:
        """Whether any parameter gets a gradient (False for forward-only runs)."""
        return self.method is not Method.FROZEN

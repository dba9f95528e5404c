"""TrainingSetup: what is trained, in which precision, with which optimizer and batch shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from memplan._compat import StrEnum
from memplan.dtypes import DType, Quantization

if TYPE_CHECKING:
    from memplan.methods.base import TuningMethod


# Bounds of what a setup may ask for: far beyond any real run, low enough that every size stays
# an exact integer and every prediction finishes in milliseconds.
MAX_MICRO_BATCH: Final = 1 << 20  # sequences per micro-batch (and micro-batches per step)
MAX_SEQ_LEN: Final = 1 << 24  # 16M tokens per sequence
MAX_RANK: Final = 1 << 16  # LoRA rank, adapter width

Method = str
"""A registered fine-tuning method (:mod:`memplan.methods`): full, lora, qlora, ..."""


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


class LossKind(StrEnum):
    """How the LM head and cross-entropy run: what the loss keeps of the logits."""

    FULL = "full"  # transformers ForCausalLMLoss: the whole logits, upcast to fp32
    CHUNKED = "chunked"  # torchtune LinearCrossEntropyLoss: head + cross-entropy per token chunk
    FUSED_LINEAR = "fused-linear"  # Liger LigerFusedLinearCrossEntropyFunction (Triton)
    CUT = "cut"  # Apple cut_cross_entropy.linear_cross_entropy (Triton): no logits kept


# torchtune LinearCrossEntropyLoss(num_output_chunks=8)
# (torchtune/modules/loss/cross_entropy_loss.py).
DEFAULT_LOSS_CHUNKS: Final = 8


class Objective(StrEnum):
    """What the step optimizes: the trainer that runs it (TRL for the preference objectives)."""

    SFT = "sft"  # next-token cross-entropy (transformers Trainer, trl.SFTTrainer)
    DPO = "dpo"  # trl.DPOTrainer: chosen and rejected sequences against a reference model
    ORPO = "orpo"  # trl.experimental.orpo.ORPOTrainer (not modelled)
    KTO = "kto"  # trl.experimental.kto.KTOTrainer (not modelled)
    REWARD = "reward"  # trl.RewardTrainer: a sequence-classification head (not modelled)


# Objectives whose trainer memplan models; the others are refused in one line.
MODELLED_OBJECTIVES: Final = (Objective.SFT, Objective.DPO)


class RefModel(StrEnum):
    """Where DPO's reference log-probabilities come from during training."""

    # A second model from the same weights (trl DPOTrainer without peft: create_model_from_path
    # in the policy's dtype), run under torch.no_grad().
    COPY = "copy"
    # The policy itself with its adapters disabled (trl.trainer.utils.use_adapter ->
    # PeftModel.disable_adapter()), under torch.no_grad(): no weights of its own.
    ADAPTERS_DISABLED = "adapters-disabled"


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


# The load dtype the recipe names and the AMP regime prepare_model_for_kbit_training leaves.
_KBIT_PREP_PRECISION: Final = {
    Precision.BF16: Precision.BF16_AMP,
    Precision.FP16: Precision.FP16_AMP,
}


def _fill_stack_defaults(data: dict[str, Any], tuning: TuningMethod) -> dict[str, Any]:
    """``data`` with the fields it leaves out set by its stack (memplan.stacks)."""
    from memplan.stacks import DEFAULT_STACK, Request, stacks

    entry = stacks().get(data.get("stack") or DEFAULT_STACK)
    if entry is None:
        return data  # the field validator reports the unknown stack
    quant = data.get("quant") or tuning.defaults.get("quant") or Quantization.NONE
    try:
        quantized = Quantization(quant) is not Quantization.NONE
    except ValueError:
        return data  # the field validator reports the unknown quantization
    accumulates = (data.get("grad_accum_steps") or 1) != 1
    request = Request(tuning, quantized=quantized, accumulates=accumulates)
    filled = {k: d.value for k, d in entry.defaults(request).items() if data.get(k) is None}
    return {**data, **filled, "defaults_from_stack": tuple(sorted(filled))}


def _kbit_prep_precision(data: Any) -> Any:
    """With ``kbit_prep``, precision bf16/fp16 (torch_dtype of the load, Trainer(bf16=True))
    is the AMP regime: the preparation upcasts every 16-bit parameter to fp32."""
    if not isinstance(data, dict) or not data.get("kbit_prep") or data.get("precision") is None:
        return data
    precision = Precision(data["precision"])
    return {**data, "precision": _KBIT_PREP_PRECISION.get(precision, precision)}


class TrainingSetup(BaseModel):
    """One training step's configuration on one model replica."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    method: Method = Field(
        default="full", description="What is trained: a registered method (memplan.methods)."
    )
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
    kbit_prep: bool = Field(
        default=False,
        description="The Hugging Face QLoRA recipe: a model loaded quantized in the 16-bit "
        "compute dtype, then peft.prepare_model_for_kbit_training (every parameter but the "
        "4-bit/8-bit weights upcast to fp32) and trained under AMP autocast; the 4-bit weights "
        "dequantize to the 16-bit dtype they were quantized from. precision bf16/fp16 names the "
        "load dtype and is read as bf16-amp/fp16-amp.",
    )
    optimizer: Optimizer = Field(default=Optimizer.ADAMW, description="Optimizer.")
    optimizer_impl: OptimizerImpl = Field(
        default=OptimizerImpl.FUSED, description="Loop strategy of torch optimizers."
    )
    micro_batch_size: PositiveInt = Field(
        default=1, le=MAX_MICRO_BATCH, description="Sequences per forward pass."
    )
    seq_len: PositiveInt = Field(
        default=512, le=MAX_SEQ_LEN, description="Tokens per sequence (padded length)."
    )
    target_seq_len: PositiveInt | None = Field(
        default=None, description="Decoder length of encoder-decoder models (None: seq_len)."
    )
    grad_accum_steps: PositiveInt = Field(
        le=MAX_MICRO_BATCH,
        default=1,
        description="Micro-batches accumulated into one optimizer step.",
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
    loss: LossKind = Field(
        default=LossKind.FULL,
        description="Loss implementation: full (transformers ForCausalLMLoss: the whole logits, "
        "upcast to fp32 per logits_fp32), chunked (torchtune's LinearCrossEntropyLoss: the LM "
        "head and cross-entropy run on loss_chunks chunks of the tokens), fused-linear (Liger's "
        "fused linear cross-entropy: gradients computed in the forward, chunk by chunk) or cut "
        "(Apple's cut cross-entropy: no logits kept, only the log-sum-exp per token).",
    )
    loss_chunks: PositiveInt | None = Field(
        default=None,
        le=MAX_SEQ_LEN,
        description="Chunks the tokens are split into for loss=chunked (torchtune's "
        "num_output_chunks: a number of chunks, not of tokens); None: 8, torchtune's default.",
    )
    optimizer_in_backward: bool = Field(
        default=False,
        description="Step the optimizer inside backward (torchtune's optimizer_in_bwd: one "
        "optimizer per parameter stepped in its post-accumulate-grad hook, then its gradient "
        "freed), so gradients never coexist. Needs grad_accum_steps=1.",
    )
    objective: Objective = Field(
        default=Objective.SFT,
        description="Training objective: sft (next-token cross-entropy) or dpo (trl's "
        "DPOTrainer: chosen and rejected sequences of micro_batch_size pairs concatenated "
        "into one forward of 2 x micro_batch_size sequences, per-token log-probabilities from "
        "trl's fused LM head, a reference forward under no_grad); orpo, kto and reward are "
        "refused (not modelled).",
    )
    ref_model: RefModel | None = Field(
        default=None,
        description="DPO's reference: copy (a frozen second model) or adapters-disabled (the "
        "policy with its peft adapters disabled); None: trl's default (adapters-disabled for "
        "peft methods, copy otherwise). Unused with precomputed_ref.",
    )
    precomputed_ref: bool = Field(
        default=False,
        description="DPO with precompute_ref_log_probs=True: the reference log-probabilities "
        "are computed before training and read from the batch (no reference model in memory, "
        "no reference forward during the step).",
    )
    device: Literal["cuda", "cpu"] = Field(
        default="cuda",
        description="Where the step runs: decides kernel workspaces (flash backward's fp32 dQ "
        "accumulator), SDPA fallbacks and whether optimizer step counters live on the device.",
    )
    lora_r: PositiveInt = Field(default=8, le=MAX_RANK, description="LoRA rank r.")
    lora_alpha: float = Field(
        default=8.0, gt=0, allow_inf_nan=False, description="LoRA scaling numerator alpha."
    )
    lora_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (saves a mask)."
    )
    lora_targets: tuple[LinearRole, ...] | None = Field(
        default=None,
        description="Linear roles that get adapters (LoRA, LoHa, LoKr, VeRA); None: peft's "
        "default for the family.",
    )
    adapter_dtype: DType = Field(
        default=DType.FP32,
        description="Dtype of LoRA/adapter weights (peft autocasts adapters to fp32).",
    )
    adapter_size: PositiveInt = Field(
        default=64, le=MAX_RANK, description="Bottleneck width of adapters."
    )
    prefix_len: PositiveInt = Field(
        default=30, le=MAX_SEQ_LEN, description="Virtual tokens of prefix tuning."
    )
    loha_r: PositiveInt = Field(
        default=8, le=MAX_RANK, description="LoHa rank r (peft LoHaConfig.r)."
    )
    loha_alpha: float = Field(
        default=8.0,
        gt=0,
        allow_inf_nan=False,
        description="LoHa scaling numerator alpha (peft LoHaConfig.alpha).",
    )
    lokr_r: PositiveInt = Field(
        default=8, le=MAX_RANK, description="LoKr rank r (peft LoKrConfig.r)."
    )
    lokr_alpha: float = Field(
        default=8.0,
        gt=0,
        allow_inf_nan=False,
        description="LoKr scaling numerator alpha (peft LoKrConfig.alpha).",
    )
    vera_r: PositiveInt = Field(
        default=256,
        le=MAX_RANK,
        description="VeRA rank: rows of the shared frozen projections (peft VeraConfig.r).",
    )
    prompt_len: PositiveInt = Field(
        default=20,
        le=MAX_SEQ_LEN,
        description="Virtual tokens of prompt tuning and P-tuning (peft num_virtual_tokens).",
    )
    stack: str = Field(
        default="hf-trainer",
        description="The training stack whose defaults fill the fields left out "
        "(memplan.stacks: hf-trainer, trl-sft, axolotl, ...); explicit fields override it.",
    )
    defaults_from_stack: tuple[str, ...] = Field(
        default=(),
        description="Fields filled from the stack's defaults (reported as assumptions).",
    )
    defaults_from_method: tuple[str, ...] = Field(
        default=(),
        description="Fields filled from the method's typical setup (reported as assumptions).",
    )
    library_versions: dict[str, str] = Field(
        default_factory=dict,
        description="Library versions the answer assumes where memory depends on them "
        "(memplan.versions; e.g. {'bitsandbytes': '0.42.0'}); empty: current releases.",
    )

    def __hash__(self) -> int:
        # Frozen, so hashable (plans are cached by setup); the versions dict as sorted pairs.
        return hash(
            tuple(
                tuple(sorted(v.items())) if isinstance(v, dict) else v
                for v in self.__dict__.values()
            )
        )

    @field_validator("library_versions")
    @classmethod
    def _known_versions(cls, versions: dict[str, str]) -> dict[str, str]:
        from memplan.versions import check_versions

        return check_versions(versions)

    @model_validator(mode="before")
    @classmethod
    def _fields_from_versions(cls, data: Any) -> Any:
        """Named library versions decide the fields of mechanisms their releases changed."""
        if not isinstance(data, dict) or not isinstance(data.get("library_versions"), dict):
            return data
        from memplan.versions import check_versions, fields_for

        decided = fields_for(check_versions(data["library_versions"]))
        for field, value in decided.items():
            if data.get(field) is not None and data[field] != value:
                raise ValueError(
                    f"{field}={data[field]} contradicts the library versions assumed "
                    f"({', '.join(f'{k}={v}' for k, v in data['library_versions'].items())})"
                )
        return {**data, **decided}

    @model_validator(mode="before")
    @classmethod
    def _fill_method_defaults(cls, data: Any) -> Any:
        """Fields left out take the stack's defaults, then the method's typical setup (both
        reported as assumptions)."""
        from memplan.methods import methods

        if not isinstance(data, dict):
            return data
        name = data.get("method", "full")
        tuning = methods().get(name) if isinstance(name, str) else None
        if tuning is None:
            return data  # the field validator reports the unknown method
        if not data.get("defaults_from_stack"):
            data = _fill_stack_defaults(data, tuning)
        if data.get("defaults_from_method"):
            return _kbit_prep_precision(data)
        filled = {k: v for k, v in tuning.defaults.items() if data.get(k) is None}
        data = {**data, **filled, "defaults_from_method": tuple(sorted(filled))}
        return _kbit_prep_precision(data)

    @field_validator("stack")
    @classmethod
    def _known_stack(cls, name: str) -> str:
        from memplan.stacks import stacks

        if name not in stacks():
            raise ValueError(f"unknown stack {name!r} (known: {', '.join(stacks())})")
        return name

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from memplan.methods import methods

        if name not in methods():
            raise ValueError(f"unknown method {name!r} (known: {', '.join(methods())})")
        return name

    @model_validator(mode="after")
    def _check_combination(self) -> TrainingSetup:
        if self.kbit_prep and self.quant is Quantization.NONE:
            raise ValueError(
                "kbit_prep prepares a 4-bit/8-bit quantized model "
                "(peft.prepare_model_for_kbit_training): set quant nf4, fp4 or int8"
            )
        if self.kbit_prep and not self.precision.is_amp:
            raise ValueError(
                "kbit_prep trains under 16-bit AMP autocast over the fp32-upcast parameters: "
                f"use precision bf16-amp or fp16-amp, not {self.precision.value}"
            )
        self.tuning.check_setup(self)
        self._check_settings_apply()
        if self.grad_ckpt_every > 1 and not self.grad_ckpt:
            raise ValueError("grad_ckpt_every > 1 needs grad_ckpt=True")
        self._check_loss()
        self._check_optimizer_in_backward()
        self._check_objective()
        return self

    def _check_objective(self) -> None:
        from memplan.preference import check_objective

        check_objective(self)

    @property
    def sequences_per_forward(self) -> int:
        """Sequences one forward runs: DPO concatenates each pair's chosen and rejected
        sequences into one batch (trl DPOTrainer: ``DataCollatorForPreference`` stacks
        ``chosen_input_ids + rejected_input_ids``)."""
        return self.micro_batch_size * (2 if self.objective is Objective.DPO else 1)

    @property
    def reference(self) -> RefModel | None:
        """The reference DPO runs during the step (None: none: sft, or precomputed)."""
        if self.objective is not Objective.DPO or self.precomputed_ref:
            return None
        if self.ref_model is not None:
            return self.ref_model
        # trl DPOTrainer: ``if is_peft_model(self.model) ... self.ref_model = None`` (the
        # adapters are disabled instead), else a second model from the same checkpoint.
        return RefModel.ADAPTERS_DISABLED if self.tuning.peft else RefModel.COPY

    def _check_loss(self) -> None:
        if self.loss_chunks is not None and self.loss is not LossKind.CHUNKED:
            raise ValueError(f"loss_chunks configures loss=chunked, not loss={self.loss.value}")
        if self.loss in (LossKind.FUSED_LINEAR, LossKind.CUT) and not self.logits_fp32:
            raise ValueError(
                f"logits_fp32=False configures loss=full or chunked; loss={self.loss.value} "
                "accumulates in fp32 inside its kernel"
            )

    def _check_optimizer_in_backward(self) -> None:
        if not self.optimizer_in_backward:
            return
        if not self.trains_weights:
            raise ValueError(f"optimizer_in_backward: method={self.method} trains no weights")
        if self.grad_accum_steps > 1:
            # torchtune's recipes raise "Gradient accumulation is not supported with optimizer
            # in bwd" (recipes/full_finetune_single_device.py).
            raise ValueError(
                f"optimizer_in_backward steps and frees each gradient inside backward: "
                f"grad_accum_steps={self.grad_accum_steps} is not supported (torchtune refuses it)"
            )
        if self.optimizer is Optimizer.ADAFACTOR:
            raise ValueError(
                "optimizer_in_backward is modelled for optimizers with per-element states; "
                "adafactor's factored states are not"
            )

    @property
    def num_loss_chunks(self) -> int:
        """Chunks of loss=chunked (torchtune's num_output_chunks, 8 unless set)."""
        return self.loss_chunks or DEFAULT_LOSS_CHUNKS

    def _check_settings_apply(self) -> None:
        """A method's setting changed for a method that has no use for it is a mistake
        (``--lora-r 16 --method full``), not something to ignore silently."""
        from memplan.methods import methods

        own = set(self.tuning.setting_fields)
        for tuning in methods().values():
            for field in tuning.setting_fields:
                if field in own or field not in self.model_fields_set:
                    continue
                if getattr(self, field) != type(self).model_fields[field].default:
                    users = [n for n, m in methods().items() if field in m.setting_fields]
                    raise ValueError(
                        f"{field} configures method {'/'.join(users)}; method={self.method} "
                        "does not use it"
                    )

    @property
    def tuning(self) -> TuningMethod:
        """The method's definition (:mod:`memplan.methods`)."""
        from memplan.methods import method

        return method(self.method)

    @property
    def uses_lora(self) -> bool:
        return self.tuning.uses_lora

    @property
    def decoder_seq_len(self) -> int:
        return self.target_seq_len or self.seq_len

    @property
    def trains_weights(self) -> bool:
        """Whether any parameter gets a gradient (False for forward-only runs)."""
        return self.tuning.trains_weights

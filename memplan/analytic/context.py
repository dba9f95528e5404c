"""What the op builders need to know about a step: shapes, dtypes and what is trained."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.analytic.graph import ParamGrad
from memplan.analytic.symbolic import Count
from memplan.architecture import ParamKind
from memplan.dtypes import DType, Quantization, dtype_bytes
from memplan.families import family
from memplan.methods import TuningMethod, method
from memplan.methods.lora import lora_roles
from memplan.specs.model import ModelSpec
from memplan.specs.training import (
    Attention,
    LinearRole,
    LossKind,
    Objective,
    Optimizer,
    OptimizerImpl,
    TrainingSetup,
)
from memplan.trace import Category


@dataclass(frozen=True, slots=True)
class StepContext:
    """Resolved facts of one micro-batch step, shared by every op builder."""

    batch: Count  # micro-batch size (a Size in a symbolic trace)
    seq_len: Count  # tokens per sequence (a Size in a symbolic trace)
    vocab_size: int
    weight_dtype: DType  # storage dtype of unquantized parameters
    compute_dtype: DType  # matmul dtype (autocast target under AMP)
    amp: bool  # torch.autocast: fp32 weights cast per op, cached when trainable
    adapter_dtype: DType
    quant: Quantization
    # QuantState.dtype: the dtype the 4-bit weights were quantized from, which
    # bnb.functional.dequantize_4bit returns (the storage dtype of the loaded model).
    quant_state_dtype: DType
    method: TuningMethod  # what trains, what it adds to linears, branches and attention
    lora_roles: frozenset[LinearRole]
    lora_r: int
    lora_dropout: float
    attention: Attention
    adapter_size: int = 0  # bottleneck width of adapters (method=adapter)
    prefix_len: int = 0  # virtual tokens prepended to keys/values (method=prefix)
    # Virtual tokens prepended to every sequence (prompt tuning): ``seq_len`` counts them.
    virtual_tokens: int = 0
    # Decisions the kernels make on the shape (a symbolic trace holds for one regime):
    batched: bool = True  # micro-batch > 1: matmul's batch-and-heads reshape copies views
    sdpa_mask: bool = False  # SDPA is handed a materialized mask (see _sdpa_mask)
    quant_matmul_saves_input: bool = False  # bitsandbytes < 0.43.2 MatMul4Bit
    logits_fp32: bool = True  # ForCausalLMLoss upcasts logits
    loss: LossKind = LossKind.FULL  # how the LM head and cross-entropy run
    loss_chunks: int = 1  # chunks of loss=chunked
    # trl's fused LM head (add_fused_lm_head): per-token log-probabilities instead of logits
    # (objective=dpo; memplan.analytic.preference).
    fused_logprobs: bool = False
    # torch.autocast caches trainable linears' weight casts (ModelFamily.cached_weight_casts).
    cached_weight_casts: bool = True
    # The optimizer each parameter is stepped with inside backward (optimizer_in_bwd).
    optimizer_in_backward: tuple[Optimizer, OptimizerImpl] | None = None
    device: str = "cuda"  # "cuda" or "cpu": decides kernel workspaces and fallbacks
    tensor_parallel_degree: int = 1
    grad_divisor: int = 1  # ranks each gradient is sharded across (ZeRO-2/3, FSDP)
    # FSDP MixedPrecision: the gradient shard is cast to the FlatParameter's dtype (fp32)
    # after the 16-bit reduce-scatter (FSDP _cast_grad_to_param_dtype); None: weight dtype.
    grad_shard_dtype: DType | None = None
    # FSDP2: a unit's unsharded gradients stay until its post-backward reduce-scatters them.
    grads_reduced_per_unit: bool = False
    # What the method trains of the base model, by kind of tensor.
    trains_linear: bool = False  # linear weights
    trains_bias: bool = False  # bias terms (linear and norm biases)
    trains_norm: bool = False  # norm scales
    trains_embedding: bool = False  # embeddings, the LM head and other tables
    model_type: str = ""  # the family's Hugging Face model_type (peft's defaults are keyed by it)
    # Norm modules (names or dotted suffixes) whose trainable copy runs instead (LN tuning).
    norm_targets: frozenset[str] = frozenset()
    # The whole setup, for a method's own settings (loha_r, lokr_r, vera_r, ...).
    setup: TrainingSetup | None = None

    @property
    def num_tokens(self) -> Count:
        return self.batch * self.seq_len

    @property
    def input_tokens(self) -> Count:
        """Tokens of the batch (its input_ids), without the method's virtual tokens."""
        return self.batch * (self.seq_len - self.virtual_tokens)

    @property
    def activation_dtype(self) -> DType:
        """Dtype of the residual stream (fp32 under AMP: embeddings and norms run in fp32)."""
        return self.weight_dtype

    def trains_norm_at(self, label: str) -> bool:
        """Whether the norm called ``label`` (its module path in the layer) has a trainable
        scale: the method trains every norm, or this one is a target (matched as peft matches
        target_modules: the whole name or a dotted suffix)."""
        return self.trains_norm or any(
            label == t or label.endswith(f".{t}") for t in self.norm_targets
        )

    def has_lora(self, role: LinearRole | None) -> bool:
        return role is not None and role in self.lora_roles

    @property
    def cuda_autocast(self) -> bool:
        """Autocast with CUDA's op lists (autocast_mode.cpp), not the CPU's."""
        return self.amp and self.device == "cuda"

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        setup: TrainingSetup,
        *,
        seq_len: int | None = None,
        tensor_parallel_degree: int = 1,
        grad_divisor: int = 1,
        grad_shard_dtype: DType | None = None,
    ) -> StepContext:
        tuning = method(setup.method)
        # The model runs the batch's tokens after the method's virtual ones (not a decoder's).
        virtual = 0 if seq_len else tuning.virtual_tokens(setup)
        seq_len = (seq_len or setup.seq_len) + virtual
        prefix_len = tuning.kv_prefix_len(setup)
        return cls(
            batch=setup.sequences_per_forward,
            vocab_size=spec.vocab_size,
            seq_len=seq_len,
            weight_dtype=setup.precision.weight_dtype,
            compute_dtype=setup.precision.compute_dtype,
            amp=setup.precision.is_amp,
            adapter_dtype=setup.adapter_dtype,
            quant=setup.quant,
            # kbit_prep: quantized from the 16-bit load; else from the weights' storage dtype.
            quant_state_dtype=(
                setup.precision.compute_dtype if setup.kbit_prep else setup.precision.weight_dtype
            ),
            method=tuning,
            # Methods that read lora_targets (LoRA, LoHa, LoKr, VeRA) adapt the targeted roles.
            lora_roles=(
                lora_roles(spec, setup)
                if tuning.uses_lora or "lora_targets" in tuning.setting_fields
                else frozenset()
            ),
            lora_r=setup.lora_r,
            lora_dropout=setup.lora_dropout,
            attention=family(spec.family).attention(setup.attention),
            adapter_size=setup.adapter_size,
            prefix_len=prefix_len,
            virtual_tokens=virtual,
            batched=setup.sequences_per_forward > 1,
            sdpa_mask=_sdpa_mask(spec, setup, seq_len + prefix_len, prefix_len),
            quant_matmul_saves_input=setup.quant_matmul_saves_input,
            logits_fp32=setup.logits_fp32,
            loss=setup.loss,
            loss_chunks=setup.num_loss_chunks,
            fused_logprobs=setup.objective is Objective.DPO,
            cached_weight_casts=family(spec.family).cached_weight_casts,
            optimizer_in_backward=(
                (setup.optimizer, setup.optimizer_impl) if setup.optimizer_in_backward else None
            ),
            device=setup.device,
            tensor_parallel_degree=tensor_parallel_degree,
            grad_divisor=grad_divisor,
            grad_shard_dtype=grad_shard_dtype,
            trains_linear=tuning.trains(ParamKind.LINEAR, bias=False),
            trains_bias=tuning.trains(ParamKind.BIAS, bias=True),
            trains_norm=tuning.trains(ParamKind.NORM, bias=False),
            trains_embedding=tuning.trains(ParamKind.EMBEDDING, bias=False),
            model_type=family(spec.family).model_types[0],
            norm_targets=frozenset(tuning.norm_targets(spec)),
            setup=setup,
        )

    def param_grad(
        self,
        label: str,
        numel: int,
        *,
        trainable: bool,
        dtype: DType | None = None,
        accumulates: bool = False,
        tie: str = "",
        buffered_in: Category = Category.LOGITS,
    ) -> ParamGrad:
        """The .grad a trainable parameter gets in backward (this GPU's shard of it)."""
        if not trainable:
            return ParamGrad(label, 0)
        itemsize = dtype_bytes(dtype or self.weight_dtype)
        # Under FSDP MixedPrecision the gradient shard takes the sharded parameter's dtype
        # (grad_shard_dtype) whatever dtype the parameter computes in.
        shard_itemsize = dtype_bytes(self.grad_shard_dtype or dtype or self.weight_dtype)
        share = -(-numel // self.grad_divisor)
        full = numel * itemsize if self.grad_divisor > 1 else 0
        step = None
        if self.optimizer_in_backward is not None:
            step = _in_backward_step(label, numel, dtype or self.weight_dtype, self)
        return ParamGrad(
            label,
            share * shard_itemsize,
            accumulates,
            full,
            tie,
            buffered_in,
            None,
            step,
            reduced_per_unit=self.grads_reduced_per_unit and bool(full),
        )


def _in_backward_step(label: str, numel: int, dtype: DType, ctx: StepContext) -> tuple[int, int]:
    """(state bytes, step temporaries) of the optimizer torchtune's OptimizerInBackward builds
    for one parameter (``optimizer_cls([p])``): memplan.analytic.optimizer for that tensor."""
    from memplan.analytic.optimizer import optimizer_bytes
    from memplan.analytic.weights import TensorGroup

    assert ctx.optimizer_in_backward is not None
    kind, impl = ctx.optimizer_in_backward
    one = optimizer_bytes([TensorGroup(label, numel, dtype, 1)], kind, impl, device=ctx.device)
    # bnb paged states live in unified memory, outside the allocator (as in one optimizer).
    return one.state_bytes, one.step_temp_bytes


def _sdpa_mask(spec: ModelSpec, setup: TrainingSetup, kv_len: int, prefix_len: int) -> bool:
    """Whether SDPA is handed a materialized mask rather than ``is_causal=True``.

    masking_utils._ignore_causal_mask_sdpa skips the mask only when the queries are all the
    keys (no cached prefix) and no sliding window is reached (kv_length >= window).
    """
    fam = family(spec.family)
    if setup.attention is not Attention.SDPA or not fam.causal:
        return False
    window = fam.sdpa_window(spec)
    return prefix_len > 0 or (window is not None and kv_len >= window)

"""Training time and cost from FLOPs: an estimate, not a measurement.

Per token, a transformer step does (every term counted in multiply-adds x 2):

- matmuls: 2 FLOPs per weight element in the forward pass (Kaplan et al. 2020, arXiv:2001.08361,
  Table 1: C_forward ~ 2N), the same again for the input gradients and again for the weight
  gradients in backward, hence 6N for full training (Kaplan et al. 2020 section 2.1; Hoffmann et
  al. 2022 "Chinchilla", arXiv:2203.15556, Appendix F);
- frozen weights (LoRA, QLoRA, adapters) get no weight gradient, so their backward is 2N, not 4N;
- attention scores and their product with V: 4 * s * d_attn per layer forward, 8 * s * d_attn
  backward (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, Appendix B: 6N + 12 L H Q T);
- activation checkpointing runs each checkpointed layer's forward again in backward: 8N instead of
  6N (Korthikanti et al. 2022, arXiv:2205.05198, section 6: 96 vs 72 B s L h^2).

Compute time is FLOPs / (dense 16-bit peak x ``UTILISATION_FRACTION``); :mod:`memplan.step_time`
adds what a layout costs besides (collectives, offload traffic, the CPU optimizer step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from memplan.architecture import ParamKind, architecture
from memplan.errors import MemplanError
from memplan.families import family
from memplan.hardware import HardwareProfile
from memplan.specs.model import ModelSpec
from memplan.specs.training import Precision, TrainingSetup
from memplan.units import GB, KB, MB, TB

# Share of the dense 16-bit tensor peak a fine-tuning run sustains, counted over the FLOPs it
# executes (recomputation included). A round value below the model-FLOPs utilisation of
# large, tuned pretraining runs: 46.2% for PaLM 540B (Chowdhery et al. 2022, section 4.1),
# 54.2% for a 530B GPT on 2240 A100s, 42.1% with full recomputation (Korthikanti et al. 2022,
# abstract). Fine-tuning stacks with small micro-batches usually reach less.
UTILISATION_FRACTION: Final = 0.40

# Token counts as people write them: 50M, 1.5B, 2T (decimal, as in "trained on 2T tokens"); the
# decimal prefixes are memplan.units' (KB = 10**3 ... TB = 10**12).
_TOKEN_SUFFIXES: Final = {"": 1, "k": KB, "m": MB, "b": GB, "t": TB}
MAX_TOKENS: Final = 10**18  # training tokens accepted: a million times the largest runs
_TOKENS_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbtKMBT]?)\s*$")
_MATMUL_KINDS: Final = (ParamKind.LINEAR, ParamKind.ROUTER, ParamKind.HEAD_LINEAR)


def parse_tokens(text: str) -> int:
    """A token count such as ``50M`` (decimal suffixes k, M, B, T).

    >>> parse_tokens("50M"), parse_tokens("1.5B"), parse_tokens("2000")
    (50000000, 1500000000, 2000)
    """
    match = _TOKENS_RE.match(text)
    if match is None:
        raise MemplanError(f"cannot read token count {text!r}: expected e.g. 50M, 1.5B or 2000000")
    value = float(match.group(1)) * _TOKEN_SUFFIXES[match.group(2).lower()]
    if value > MAX_TOKENS:
        raise MemplanError(f"token count {text!r} is too large (at most 10^18)")
    tokens = round(value)
    if tokens <= 0:
        raise MemplanError(f"token count {text!r} must be positive")
    return tokens


@dataclass(frozen=True, slots=True)
class MatmulParams:
    """Weights one token multiplies with: inside the repeated layers, and outside (LM head)."""

    layer_params: int  # per token, all layers; MoE counts the routed top-k experts only
    head_params: int  # LM head (tied: the embedding matrix) and other linears outside layers


def matmul_params(spec: ModelSpec) -> MatmulParams:
    """Weights in a token's matmul path (the input embedding is a lookup: no FLOPs).

    >>> from memplan.catalog import load_model
    >>> m = matmul_params(load_model("llama-2-7b"))
    >>> m.layer_params, m.head_params
    (6476005376, 131072000)
    """
    layer = head = 0
    for block, tensor in architecture(spec).tensors():
        if not tensor.in_step:  # a vision tower: text-only tokens never multiply with it
            continue
        numel = tensor.numel * block.repeat
        if tensor.copies > 1 and spec.num_experts_per_token:  # experts: top-k of them per token
            numel = numel // tensor.copies * spec.num_experts_per_token
        if block.name.endswith("layer") and tensor.kind in _MATMUL_KINDS:
            layer += numel
        elif block.name == "lm_head" or tensor.kind is ParamKind.HEAD_LINEAR:
            head += numel
    if spec.tie_word_embeddings:  # the token embedding is also the output projection
        head += spec.vocab_size * spec.hidden_size
    return MatmulParams(layer, head)


def attention_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """Forward FLOPs of QK^T and P.V per token, all layers: 4 * L * s * d_attn.

    Each query meets ``s`` keys (fewer under a sliding window); masked causal positions are
    counted as computed, as PaLM's and Megatron's FLOP counts do.
    """
    window = family(spec.family).sliding_window(spec)
    keys = min(seq_len, window) if window else seq_len
    return 4 * spec.num_layers * keys * spec.num_attention_heads * spec.head_dim


@dataclass(frozen=True, slots=True)
class FlopsPerToken:
    """FLOPs one training token costs, by pass."""

    forward: int
    backward: int
    recompute: int  # checkpointed layers' forward, run again in backward

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


def flops_per_token(
    spec: ModelSpec, setup: TrainingSetup, num_trainable_params: int
) -> FlopsPerToken:
    """Forward, backward and recompute FLOPs per token of ``setup`` (see the module docstring).

    >>> from memplan.catalog import load_model
    >>> f = flops_per_token(load_model("llama-2-7b"), TrainingSetup(seq_len=4096), 6738415616)
    >>> f.total == 6 * (6476005376 + 131072000) + 3 * 4 * 32 * 4096 * 4096
    True
    """
    m = matmul_params(spec)
    # Trainable parameters in the token's matmul path (adapters) cost forward and
    # weight-gradient FLOPs.
    adapters = num_trainable_params if setup.tuning.adds_matmul_params else 0
    layer_matmul = 2 * (m.layer_params + adapters)  # forward, per token
    attention = attention_flops_per_token(spec, setup.seq_len)
    forward = layer_matmul + 2 * m.head_params + attention
    if not setup.trains_weights:
        return FlopsPerToken(forward, 0, 0)
    full = setup.tuning.trains(ParamKind.LINEAR, bias=False)
    weight_grads = m.layer_params + m.head_params if full else adapters
    backward = layer_matmul + 2 * m.head_params + 2 * attention + 2 * weight_grads
    recompute = 0
    if setup.grad_ckpt:  # layers i with i % every == 0 are checkpointed (ceil(L / every))
        checkpointed = -(-spec.num_layers // setup.grad_ckpt_every)
        recompute = (layer_matmul + attention) * checkpointed // spec.num_layers
    return FlopsPerToken(forward, backward, recompute)


def compute_dtype(setup: TrainingSetup, profile: HardwareProfile) -> str | None:
    """The 16-bit format a run of ``setup`` uses on ``profile``; None for fp32 runs.

    bf16 setups fall back to fp16 (same bytes per element, so memory is unchanged) on devices
    without bf16 (V100, T4).
    """
    if setup.precision is Precision.FP32:
        return None
    wants_bf16 = setup.precision in (Precision.BF16, Precision.BF16_AMP)
    return "bf16" if wants_bf16 and profile.supports_bf16 else "fp16"

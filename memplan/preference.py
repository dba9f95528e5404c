"""Preference objectives (``TrainingSetup.objective``): what trl's DPOTrainer runs per step.

Modelled from trl 1.16 (trl/trainer/dpo_trainer.py, trl/trainer/utils.py,
trl/kernels/chunked_logprob.py):

- ``DataCollatorForPreference`` stacks each pair's chosen and rejected sequences into one batch
  of 2 x micro-batch rows, padded to the longest; ``_compute_loss`` runs the policy once on it.
- ``add_fused_lm_head``: the policy's forward returns per-token log-probabilities of the labels
  (the prompt masked with -100) instead of logits. On CUDA it keeps the counted positions'
  hidden states (``hidden_states[mask]``) and runs ``ChunkedLogProbFunction``: the LM head in
  tiles of 4096 tokens x 32768 vocabulary entries into one reused buffer, each tile folded into
  online log-sum-exp statistics by a Triton kernel; backward recomputes the tiles and
  accumulates the hidden states' and the head's gradients in fp32. The whole logits never exist.
- The reference: with a peft model and no ``ref_model``, the same model with its adapters
  disabled (``use_adapter(model, None)`` -> ``PeftModel.disable_adapter()``); otherwise a
  second model loaded in the policy's dtype (``create_model_from_path``); both run under
  ``torch.no_grad()`` after the policy's forward, gradient checkpointing switched off
  (``disable_gradient_checkpointing``). ``precompute_ref_log_probs=True`` computes them before
  training and drops the reference model.
- The sigmoid loss (``loss_type="sigmoid"``, DPOConfig's default) on per-sequence sums.

ORPO, KTO and reward modelling run other trainers; they are refused in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from memplan.specs.training import MODELLED_OBJECTIVES, LossKind, Objective, RefModel

if TYPE_CHECKING:
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup

# trl/kernels/chunked_logprob.py: TOKEN_CHUNK_SIZE, tokens per projection tile.
TOKEN_CHUNK_SIZE: Final = 4096
# trl/trainer/utils.py: _CHUNKED_LOGPROB_CHUNK_SIZE, vocabulary entries per projection tile.
VOCAB_CHUNK_SIZE: Final = 32768
# DPOTrainer asks its fused head for these per-token fields (``outputs`` of add_fused_lm_head:
# log_probs, entropy, mean_logits, is_top1; log_sum_sq_probs only with use_weighting).
FUSED_HEAD_OUTPUTS: Final = ("log_probs", "entropy", "mean_logits", "is_top1")

# Methods DPO is modelled for: full fine-tuning (reference: a copy) and LoRA's family (peft;
# reference: the adapters disabled).
DPO_METHODS: Final = ("full", "lora", "qlora", "dora")

_NOT_MODELLED: Final = {
    Objective.ORPO: "trl's ORPOTrainer (odds-ratio loss on the policy's concatenated chosen and "
    "rejected log-probabilities)",
    Objective.KTO: "trl's KTOTrainer (unpaired completions plus a mismatched KL batch through "
    "the policy and the reference)",
    Objective.REWARD: "trl's RewardTrainer (AutoModelForSequenceClassification: a scalar score "
    "head instead of the LM head)",
}


def check_objective(setup: TrainingSetup) -> None:
    """Raise ValueError (one line) for objective settings memplan does not model or that make
    no sense together."""
    objective = setup.objective
    if objective not in MODELLED_OBJECTIVES:
        raise ValueError(
            f"objective={objective.value} is not modelled ({_NOT_MODELLED[objective]}); "
            f"modelled: {', '.join(o.value for o in MODELLED_OBJECTIVES)}"
        )
    if objective is not Objective.DPO:
        for field in ("ref_model", "precomputed_ref"):
            if field in setup.model_fields_set and getattr(setup, field):
                raise ValueError(
                    f"{field} configures DPO's reference model; objective={objective.value} "
                    "has none"
                )
        return
    if setup.method not in DPO_METHODS:
        raise ValueError(
            f"objective=dpo is modelled for methods {', '.join(DPO_METHODS)}, not "
            f"method={setup.method}"
        )
    if setup.precomputed_ref and setup.ref_model is not None:
        raise ValueError(
            "precomputed_ref reads the reference log-probabilities from the batch: no "
            f"reference model runs, so ref_model={setup.ref_model.value} does not apply"
        )
    if setup.ref_model is RefModel.ADAPTERS_DISABLED and not setup.tuning.peft:
        raise ValueError(
            f"ref_model=adapters-disabled needs a peft method (adapters to disable); "
            f"method={setup.method} trains the base weights: use ref_model=copy"
        )
    if setup.reference is RefModel.COPY and setup.quant.value != "none":
        raise ValueError(
            "ref_model=copy of a quantized model is not modelled; trl's default for peft "
            "models is adapters-disabled"
        )
    if setup.loss is not LossKind.FULL:
        raise ValueError(
            f"objective=dpo computes log-probabilities with trl's fused LM head; "
            f"loss={setup.loss.value} does not apply"
        )
    if setup.optimizer_in_backward:
        raise ValueError("objective=dpo with optimizer_in_backward is not modelled")


def dpo_refusal(spec: ModelSpec, own_loss: str | None) -> str | None:
    """Why DPO cannot run on ``spec`` (None: it can): trl's fused head needs a causal LM."""
    if spec.is_encoder_decoder or own_loss:
        return (
            f"objective=dpo is modelled for causal LM heads (trl's fused log-prob head); "
            f"{spec.name} has {own_loss or 'an encoder-decoder head'}"
        )
    return None


def num_counted_tokens(sequences: int, seq_len: int) -> int:
    """Positions whose next-token label counts (``labels[:, 1:] != -100``): every position but
    each sequence's last (the prompt is counted too: an upper bound on the completion)."""
    return sequences * (seq_len - 1)


def assumptions(setup: TrainingSetup) -> list[str]:
    """The plan's lines for the objective."""
    if setup.objective is not Objective.DPO:
        return []
    pairs = setup.micro_batch_size
    lines = [
        f"objective dpo (trl DPOTrainer, sigmoid loss): {pairs} chosen + {pairs} rejected "
        f"sequences of {setup.seq_len} tokens in one forward of {setup.sequences_per_forward}",
        "log-probabilities from trl's fused LM head (add_fused_lm_head, CUDA path): hidden "
        f"states of counted tokens kept, the head in tiles of {TOKEN_CHUNK_SIZE} tokens x "
        f"{VOCAB_CHUNK_SIZE} vocabulary entries, gradients accumulated in fp32; no full logits",
        "every position but each sequence's last is counted (prompt tokens too): an upper bound",
    ]
    reference = setup.reference
    if reference is RefModel.COPY:
        lines.append(
            "reference: a second copy of the model in the policy's dtype (trl "
            "create_model_from_path), forward under no_grad after the policy's, its own "
            "fused head; under AMP its weights require grad, so autocast caches their 16-bit "
            "casts until its forward returns"
        )
    elif reference is RefModel.ADAPTERS_DISABLED:
        lines.append(
            "reference: the policy with its adapters disabled (peft disable_adapter), "
            "forward under no_grad after the policy's, checkpointing off; no extra weights"
        )
    else:
        lines.append(
            "reference log-probabilities precomputed (precompute_ref_log_probs=True): no "
            "reference model in memory, no reference forward in the step"
        )
    return lines

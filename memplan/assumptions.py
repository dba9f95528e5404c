"""The assumptions behind a prediction, in words, for the report and ``--json``."""

from __future__ import annotations

from memplan.analytic.predict import Prediction
from memplan.dtypes import Quantization
from memplan.families import family
from memplan.overheads import CUDA_CONTEXT_BYTES, communicator_bytes
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import Offload, ParallelSetup
from memplan.specs.training import (
    LossKind,
    Objective,
    Optimizer,
    OptimizerImpl,
    Precision,
    TrainingSetup,
)
from memplan.units import format_bytes

_PRECISION = {
    Precision.FP32: "fp32 weights, fp32 compute",
    Precision.FP16_AMP: "fp32 weights under torch.autocast(fp16): per-op fp16 weight copies "
    "(cached for trainable weights until the forward ends), fp32 gradients",
    Precision.BF16_AMP: "fp32 weights under torch.autocast(bf16): per-op bf16 weight copies "
    "(cached for trainable weights until the forward ends), fp32 gradients",
    Precision.FP16: "fp16 weights and compute; gradients and torch optimizer states in fp16",
    Precision.BF16: "bf16 weights and compute; gradients and torch optimizer states in bf16",
}

_OPTIMIZER = {
    Optimizer.ADAMW: "torch AdamW: exp_avg and exp_avg_sq per trainable parameter, in its dtype",
    Optimizer.ADAMW_8BIT: "bitsandbytes AdamW8bit: two uint8 states + an fp32 absmax per 256 "
    "elements (32-bit states below 4096 elements)",
    Optimizer.PAGED_ADAMW: "bitsandbytes PagedAdamW32bit: fp32 states of tensors with >= 1e5 "
    "elements live in CUDA unified memory, outside torch's counters, and may be paged to host "
    "memory under pressure",
    Optimizer.PAGED_ADAMW_8BIT: "bitsandbytes PagedAdamW8bit: uint8 states of tensors with >= 1e5 "
    "elements in unified memory (may be paged to host memory)",
    Optimizer.SGD: "torch SGD with momentum: one momentum buffer per trainable parameter",
    Optimizer.ADAFACTOR: "torch Adafactor: factored second moment (rows + columns), "
    "no first moment",
    Optimizer.LION: "Lion (bitsandbytes Lion32bit): one fp32 momentum per trainable parameter",
}


def assumptions(
    spec: ModelSpec, setup: TrainingSetup, parallel: ParallelSetup, prediction: Prediction
) -> list[str]:
    """Every assumption the prediction rests on, one sentence each."""
    out = [
        f"model: {spec.name} ({spec.family}), {prediction.state.num_params:,} parameters",
        f"step: micro-batch {setup.micro_batch_size} x {setup.seq_len} tokens, "
        f"{setup.grad_accum_steps} micro-batch(es) per optimizer step; Hugging Face "
        "Trainer-style loop (output dropped before backward, zero_grad(set_to_none=True), "
        "no KV cache)",
        f"precision: {_PRECISION[setup.precision]}",
        f"attention: {setup.attention.value} on {setup.device}",
    ]
    out += _stack_lines(setup)
    if setup.defaults_from_method:
        fields = ", ".join(f"{f}={_value(getattr(setup, f))}" for f in setup.defaults_from_method)
        out.append(f"typical {setup.method} defaults applied: {fields}")
    out += _method_lines(spec, setup)
    if setup.trains_weights:
        line = f"optimizer: {_OPTIMIZER[setup.optimizer]}"
        if setup.optimizer is Optimizer.ADAMW:
            impl = {
                OptimizerImpl.FUSED: "fused kernel (no step temporaries)",
                OptimizerImpl.FOREACH: "foreach: one state-sized temporary list during step()",
                OptimizerImpl.FOR_LOOP: "for-loop: temporaries of one parameter at a time",
            }[setup.optimizer_impl]
            line += f"; {impl}"
        out.append(line + "; states are created on the first step()")
        if setup.optimizer_in_backward:
            out.append(
                "optimizer in backward (torchtune optimizer_in_bwd, torchtune/modules/optim.py): "
                "one optimizer per parameter, stepped in its post-accumulate-grad hook and its "
                "gradient freed at once, so gradients never accumulate over the model; each "
                "parameter's state is created during the first step's backward"
            )
    if setup.grad_ckpt:
        every = (
            "every layer"
            if setup.grad_ckpt_every == 1
            else f"every {setup.grad_ckpt_every}th layer"
        )
        out.append(
            f"activation checkpointing ({every}, non-reentrant): layer inputs kept, one layer "
            "recomputed in backward"
        )
    out += _parallel_lines(parallel, prediction)
    if nccl := communicator_bytes(parallel.process_group_sizes):
        groups = ", ".join(str(n) for n in parallel.process_group_sizes if n > 1)
        out.append(
            f"NCCL communicators: {format_bytes(nccl)} outside the allocator for process groups "
            f"of {groups} ranks (named terms NCCL_COMMUNICATOR_BYTES, "
            "NCCL_PAIR_COMMUNICATOR_BYTES: measured through PyTorch on A100s with NVLink)"
        )
    out.append(
        f"CUDA context: {format_bytes(CUDA_CONTEXT_BYTES)} outside the allocator (named term "
        "CUDA_CONTEXT_BYTES); reserved memory from a replay of the trace through the caching-"
        "allocator model"
    )
    return out


def _value(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(getattr(value, "value", value))


def _method_lines(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    lines = family(spec.family).assumptions(spec, setup) + setup.tuning.assumptions(spec, setup)
    if setup.quant is not Quantization.NONE:
        dq = (
            " with double quantization"
            if setup.double_quant and setup.quant is not Quantization.INT8
            else ""
        )
        lines.append(
            f"quantization: {setup.quant.value}{dq} (bitsandbytes) on linear layers; embeddings, "
            f"norms and the LM head stay {setup.precision.weight_dtype.value}; each linear is "
            "dequantized to a temporary in forward and again in backward"
        )
    if setup.kbit_prep:
        lines.append(
            f"peft.prepare_model_for_kbit_training on a model loaded in "
            f"{setup.precision.compute_dtype.value}: the {setup.quant.value} weights dequantize "
            f"to {setup.precision.compute_dtype.value}, every other parameter is upcast to fp32 "
            f"and the step runs under {setup.precision.value} autocast (fp32 residual stream)"
            + (
                "; its checkpointing makes the input embeddings require grad, non-reentrant "
                "(gradient_checkpointing_kwargs={'use_reentrant': False}; peft's default {} is "
                "torch's reentrant checkpoint)"
                if setup.grad_ckpt
                else ""
            )
        )
    if setup.library_versions:
        from memplan.versions import assumption_lines

        lines += assumption_lines(setup.library_versions)
    elif setup.quant_matmul_saves_input:
        lines.append("4-bit matmuls keep their input for backward (bitsandbytes before 0.43.2)")
    if not setup.logits_fp32:
        lines.append("cross-entropy on logits in the compute dtype (no fp32 upcast)")
    from memplan.preference import assumptions as objective_lines

    return lines + _loss_lines(spec, setup) + objective_lines(setup)


def _loss_lines(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What the loss keeps of the logits (memplan.analytic.losses)."""
    if setup.loss is LossKind.FULL and setup.objective is Objective.DPO:
        return []  # trl's fused head (memplan.preference)
    if setup.loss is LossKind.FULL:
        return []
    if setup.loss is LossKind.CHUNKED:
        upcast = "an fp32 cross-entropy" if setup.logits_fp32 else "a cross-entropy"
        return [
            f"loss: chunked into {setup.num_loss_chunks} chunks of the counted tokens "
            "(torchtune LinearCrossEntropyLoss, eager as its recipes run it with compile "
            "off): the counted tokens' hidden states copied (index_select), then the LM head "
            f"and {upcast} chunk by chunk; every chunk's fp32 log-probabilities stay saved for "
            "backward, the whole logits and their gradient never exist at once"
        ]
    if setup.loss is LossKind.FUSED_LINEAR:
        from memplan.analytic.losses import liger_chunk_rows

        rows = liger_chunk_rows(
            setup.micro_batch_size * setup.seq_len, spec.hidden_size, spec.vocab_size
        )
        return [
            "loss: Liger fused linear cross-entropy (LigerFusedLinearCrossEntropyFunction), "
            "modelled from its source, not traced (Triton kernels, no CPU path): logits of "
            f"{rows} tokens at a time; the gradients of the hidden states and of a trainable "
            "LM head are computed in the forward and kept until backward"
        ]
    return [
        "loss: Apple cut cross-entropy (cut_cross_entropy.linear_cross_entropy), modelled "
        "from its source, not traced (Triton kernels; its torch.compile fallback materializes "
        "the logits): keeps the hidden states, the LM head weight (16-bit copies under "
        "autocast) and one fp32 log-sum-exp per token; backward recomputes logits in blocks"
    ]


def _stack_lines(setup: TrainingSetup) -> list[str]:
    """The stack, and each default it gave the setup with the source it comes from."""
    from memplan.stacks import Request, stack

    entry = stack(setup.stack)
    request = Request(
        setup.tuning,
        quantized=setup.quant is not Quantization.NONE,
        accumulates=setup.grad_accum_steps > 1,
    )
    given = entry.defaults(request)
    sources = "; ".join(
        f"{f}={_value(getattr(setup, f))} ({given[f].source})"
        for f in setup.defaults_from_stack
        if f in given
    )
    line = f"stack {entry.name}: {entry.summary}"
    lines = [f"{line}; defaults: {sources}" if sources else line]
    return lines + [f"not modelled: {text}" for text in entry.not_modelled]


def _parallel_lines(parallel: ParallelSetup, prediction: Prediction) -> list[str]:
    shard = prediction.shard
    lines = []
    strategy = parallel.fsdp_strategy
    if strategy is not None:
        split = (
            f"model state split {parallel.shard_degree} ways"
            if parallel.zero_stage
            else "every rank holds the whole model state"
        )
        lines.append(
            f"{parallel.num_gpus} GPUs, data-parallel degree {parallel.data_parallel_degree}, "
            f"PyTorch FSDP {strategy.name} ({split}): per-GPU share shown"
        )
        if (
            parallel.zero_stage
            and prediction.state.num_trainable_params < prediction.state.num_params
        ):
            wrap = (
                "whole blocks, frozen and trainable parameters in one FlatParameter: its "
                "gradient covers the frozen part (use_orig_params=True, litgpt/Lightning)"
                if parallel.fsdp_mixed_units
                else "peft's fsdp_auto_wrap_policy (the Hugging Face Trainer's for a peft "
                "model): trainable modules are units of their own, frozen units get no gradient"
            )
            lines.append(f"FSDP units: {wrap}")
    elif parallel.num_gpus > 1 or parallel.zero_stage:
        lines.append(
            f"{parallel.num_gpus} GPUs, data-parallel degree {shard.data_parallel_degree}, "
            f"DeepSpeed ZeRO stage {parallel.zero_stage}: per-GPU share shown"
        )
    if shard.master_weights:
        lines.append("fp32 master weights of the trainable parameters (ZeRO mixed precision)")
    if prediction.requested_amp and strategy is not None:
        lines.append(
            "AMP under FSDP: MixedPrecision keeps the fp32 FlatParameters and their gradient "
            "shards, all-gathers 16-bit copies for compute and reduce-scatters 16-bit "
            "gradients; the optimizer steps the fp32 shards (no master copy, no autocast "
            "weight copies)"
        )
    elif prediction.requested_amp:
        lines.append(
            "AMP under DeepSpeed: 16-bit weights for compute, fp32 master weights (no "
            "autocast weight copies)"
        )
    if parallel.offload is not Offload.NONE:
        lines.append(
            f"offload {parallel.offload.value}: {format_bytes(prediction.cpu_bytes)} of host "
            "memory per GPU"
        )
    if parallel.tensor_parallel_degree > 1:
        lines.append(
            f"tensor parallel degree {parallel.tensor_parallel_degree}: linear layers and "
            "embeddings split, norms and residual activations replicated (no sequence parallelism)"
        )
    if shard.gather_layers:
        lines.append(
            f"parameters of {shard.gather_layers} layers gathered at a time (current + prefetch)"
        )
    if shard.keep_unsharded_until_backward:
        lines.append(
            "FSDP2 SHARD_GRAD_OP (reshard_after_forward=False): parameters sharded between "
            "steps, each unit gathered from its forward until its backward"
        )
    return lines

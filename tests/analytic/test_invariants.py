"""Properties every analytical prediction must have, over families, methods and layouts.

Small catalog models (one per family) keep each prediction to a millisecond or two, so
hypothesis can draw many configurations: methods full/lora/qlora/bitfit/frozen/adapter/prefix,
every precision, checkpointing off/on/every-k, gradient accumulation, ZeRO stages, FSDP,
offload and tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from memplan.analytic.predict import Prediction, check_applicable, predict
from memplan.analytic.sharding import effective_setup
from memplan.architecture import ParamKind, architecture
from memplan.catalog import catalog_names, load_model
from memplan.distributed import check_layout
from memplan.dtypes import dtype_bytes
from memplan.errors import MemplanError
from memplan.methods import method_names
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup
from memplan.trace import MODEL_STATE_CATEGORIES as MODEL_STATE
from memplan.trace import Category, Event, Phase, Trace, allocation_bytes

TINY = tuple(n for n in catalog_names() if n.startswith("tiny-"))
# Real checkpoints whose weights, not a toy's adapters, dominate their model state.
MEDIUM = (
    "gpt2",
    "gpt2-medium",
    "qwen2.5-0.5b",
    "llama-3.2-1b",
    "bert-base",
    "phi-3-mini",
    "llama-2-7b",
    "mistral-7b",
    "opt-6.7b",
    "falcon-7b",
    "bloom-7b1",
    "t5-3b",
    "gemma-2-9b",
)
# What a finished step leaves on the device (plus DeepSpeed's persistent reduce bucket).
PERSISTENT = {
    Category.FROZEN_WEIGHTS,
    Category.QUANT_STATE,
    Category.TRAINABLE_WEIGHTS,
    Category.MASTER_WEIGHTS,
    Category.OPTIMIZER_STATE,
}


@cache
def _spec(name: str) -> ModelSpec:
    return load_model(name)


@cache
def _runs(name: str, method: str) -> bool:
    """The method runs on the model (BitFit needs biases; plan refuses what the libraries
    cannot run, e.g. prefix tuning on multi-query Falcon)."""
    try:
        check_applicable(_spec(name), TrainingSetup(method=method))
    except MemplanError:
        return False
    return True


def _walk(trace: Trace) -> Iterator[tuple[Event, dict[Category, int]]]:
    """Every event and the allocated bytes per category right after it."""
    state: dict[Category, int] = {}
    for event in trace.events():
        state[event.category] = state.get(event.category, 0) + event.delta_bytes
        yield event, state


def _end_of_forward(trace: Trace, step: int = 0) -> dict[Category, int]:
    """Allocated bytes per category when the first forward of ``step`` ends (loss starts)."""
    before: dict[Category, int] = {}
    for event, state in _walk(trace):
        if event.step == step and event.phase is Phase.LOSS:
            return before
        before = dict(state)
    raise AssertionError("no loss phase")


def _max_model_state(trace: Trace) -> int:
    return max(sum(state.get(c, 0) for c in MODEL_STATE) for _, state in _walk(trace))


def _bucket_bytes(prediction: Prediction, setup: TrainingSetup) -> int:
    elements = prediction.shard.reduce_bucket_elements
    return allocation_bytes(elements * dtype_bytes(setup.precision.weight_dtype))


# -- strategies ----------------------------------------------------------------------------

_METHODS = method_names()
_PRECISIONS = ("fp32", "fp16-amp", "bf16-amp", "fp16", "bf16")
_OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "adafactor", "lion")


@st.composite
def training_setups(
    draw: st.DrawFn, name: str, methods: tuple[str, ...] = _METHODS
) -> TrainingSetup:
    method = draw(st.sampled_from([m for m in methods if _runs(name, m)]))
    fields: dict[str, Any] = {
        "method": method,
        "precision": draw(st.sampled_from(("bf16", "fp16") if method == "qlora" else _PRECISIONS)),
        "micro_batch_size": draw(st.integers(1, 3)),
        "seq_len": draw(st.integers(4, 96)),
        "grad_accum_steps": draw(st.integers(1, 3)),
        "attention": draw(st.sampled_from(("eager", "sdpa", "flash"))),
        "optimizer": draw(st.sampled_from(_OPTIMIZERS)),
        "optimizer_impl": draw(st.sampled_from(("fused", "foreach", "for-loop"))),
        "device": draw(st.sampled_from(("cuda", "cpu"))),
    }
    # Checkpoint every k-th layer; 0: off (prefix tuning cannot run with it).
    every = 0 if method == "prefix" else draw(st.sampled_from((0, 1, 2, 3)))
    fields["grad_ckpt"] = every > 0
    fields["grad_ckpt_every"] = max(every, 1)
    if method == "qlora":
        fields["quant"] = draw(st.sampled_from(("nf4", "fp4")))
        fields["double_quant"] = draw(st.booleans())
    elif method in ("lora", "adapter", "prefix"):
        fields["quant"] = draw(st.sampled_from(("none", "none", "int8", "nf4")))
    if method in ("lora", "qlora"):
        fields["lora_dropout"] = draw(st.sampled_from((0.0, 0.1)))
        fields["lora_r"] = draw(st.sampled_from((4, 8, 64)))
    return TrainingSetup(**fields)


@st.composite
def parallel_setups(draw: st.DrawFn, name: str) -> ParallelSetup:
    gpus = draw(st.sampled_from((1, 2, 4)))
    tp = draw(st.sampled_from((1, 2))) if gpus > 1 else 1
    stage = draw(st.integers(0, 3))
    fields: dict[str, Any] = {"num_gpus": gpus, "tensor_parallel_degree": tp, "zero_stage": stage}
    fsdp = stage != 1 and draw(st.booleans())
    if fsdp:
        fields["sharding"] = "fsdp"  # stage 0: NO_SHARD
    if stage >= 1:
        # FSDP's CPUOffload moves parameters too (no optimizer-only offload)
        offloads = ("none", "none") + (() if fsdp else ("optimizer",))
        fields["offload"] = draw(
            st.sampled_from(offloads + (("optimizer+params",) if stage == 3 else ()))
        )
    parallel = ParallelSetup(**fields)
    try:
        check_layout(_spec(name), parallel)
    except MemplanError:
        parallel = parallel.model_copy(update={"tensor_parallel_degree": 1})
    return parallel


@st.composite
def configs(
    draw: st.DrawFn, models: tuple[str, ...] = TINY
) -> tuple[str, TrainingSetup, ParallelSetup]:
    name = draw(st.sampled_from(models))
    return name, draw(training_setups(name)), draw(parallel_setups(name))


def _predict(name: str, setup: TrainingSetup, parallel: ParallelSetup | None = None) -> Prediction:
    return predict(_spec(name), setup, parallel or ParallelSetup())


# -- every trace ---------------------------------------------------------------------------


@given(configs())
def test_peak_is_the_highest_point_of_the_unrolled_trace_and_breakdown_sums_to_it(
    config: tuple[str, TrainingSetup, ParallelSetup],
) -> None:
    trace = _predict(*config).trace
    peak = trace.peak()
    assert sum(peak.breakdown_bytes.values()) == peak.peak_bytes
    highest = max(sum(state.values()) for _, state in _walk(trace))
    assert peak.peak_bytes == highest


@given(configs())
def test_no_category_ever_goes_negative(config: tuple[str, TrainingSetup, ParallelSetup]) -> None:
    for event, state in _walk(_predict(*config).trace):
        assert state[event.category] >= 0, event


@given(configs())
def test_after_the_steps_only_model_state_remains(
    config: tuple[str, TrainingSetup, ParallelSetup],
) -> None:
    name, setup, parallel = config
    prediction = _predict(name, setup, parallel)
    final = {c: v for c, v in prediction.trace.final_bytes().items() if v}
    # DeepSpeed ZeRO-1/2 keeps its gradient reduce bucket for the whole run.
    if prediction.shard.reduce_bucket_elements:
        bucket = _bucket_bytes(prediction, effective_setup(setup, parallel))
        assert final.pop(Category.TEMPORARIES) == bucket
    assert set(final) <= PERSISTENT, final
    # ...and exactly the state put on the device at load time plus the optimizer's.
    assert final.get(Category.OPTIMIZER_STATE, 0) == (
        0
        if prediction.shard.offload_optimizer or not setup.trains_weights
        else prediction.optimizer.state_bytes
    )
    if not prediction.shard.offload_params:
        loaded = prediction.state.bytes_by_category()
        for category in (Category.FROZEN_WEIGHTS, Category.QUANT_STATE, Category.TRAINABLE_WEIGHTS):
            assert final.get(category, 0) == loaded.get(category, 0)


def test_frozen_forward_leaves_nothing_behind(tiny_llama: ModelSpec) -> None:
    # Forward-only (no_grad) with 3 micro-batches: the loss scalar of each goes with its output.
    prediction = predict(tiny_llama, TrainingSetup(method="frozen", grad_accum_steps=3))
    final = {c: v for c, v in prediction.trace.final_bytes().items() if v}
    assert final == {
        Category.FROZEN_WEIGHTS: prediction.state.bytes_by_category()[Category.FROZEN_WEIGHTS]
    }


# -- gradients of trainable parameters -----------------------------------------------------

_PREFIX_GRAD = (
    "prefix tuning: the prefix keys/values' gradients are dropped in backward and the "
    "prefix_encoder.embedding never gets its .grad"
)
_KNOWN_GRAD_BUGS: dict[tuple[str, str], str] = {}


_LAYOUTS = {
    "1 GPU": ParallelSetup(),
    # ZeRO-3 shards parameters and gradients alike: each .grad is its parameter's shard.
    "ZeRO-3 x4": ParallelSetup(num_gpus=4, zero_stage=3),
    # Tensor parallelism splits linear layers and the vocabulary; .grad follows the split.
    "TP 2": ParallelSetup(num_gpus=2, tensor_parallel_degree=2),
}
_TP_LORA = (
    "tensor parallelism: the parameter state splits both LoRA matrices of every linear, the "
    "layer graph (Megatron) only lora_B of column-parallel and lora_A of row-parallel ones"
)
_TP_BIAS = (
    "tensor parallelism: biases of column-parallel linears (q/k/v, up/gate) stay whole in "
    "the parameter state but are split in the layer graph"
)


@cache
def _has_linear_biases(name: str) -> bool:
    return any(t.kind is ParamKind.BIAS for _, t in architecture(_spec(name)).tensors())


def _splittable(name: str, parallel: ParallelSetup) -> bool:
    try:
        check_layout(_spec(name), parallel)
    except MemplanError:
        return False
    return True


def _grad_reason(name: str, method: str, layout: str) -> str | None:
    """Why a case is a known bug (a strict xfail), or None."""
    if (name, method) in _KNOWN_GRAD_BUGS:
        return _KNOWN_GRAD_BUGS[(name, method)]
    return None


def _grad_cases() -> Iterator[Any]:
    for layout, parallel in _LAYOUTS.items():
        for name in TINY:
            if not _splittable(name, parallel):
                continue
            for method in ("full", "lora", "qlora", "bitfit", "adapter", "prefix"):
                if not _runs(name, method):
                    continue
                reason = _grad_reason(name, method, layout)
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(
                    name, method, layout, marks=marks, id=f"{name}-{method}-{layout}"
                )


@pytest.mark.parametrize(("name", "method", "layout"), list(_grad_cases()))
def test_every_trainable_parameter_gets_its_gradient(name: str, method: str, layout: str) -> None:
    """Backward creates one .grad per trainable tensor the step uses, as large as this GPU's
    share of it (a vision tower under text-only inputs trains but gets none)."""
    setup = TrainingSetup(method=method, micro_batch_size=1, seq_len=16)
    prediction = _predict(name, setup, _LAYOUTS[layout])
    trainable = sum(g.allocated_bytes for g in prediction.state.trainable if g.gets_grad)
    most = max(state.get(Category.GRADIENTS, 0) for _, state in _walk(prediction.trace))
    assert trainable > 0
    assert most == trainable


# -- monotone in batch and sequence --------------------------------------------------------


@given(configs(), st.integers(1, 2), st.integers(1, 32))
def test_peak_never_falls_with_a_larger_batch_or_longer_sequence(
    config: tuple[str, TrainingSetup, ParallelSetup], more_batch: int, more_seq: int
) -> None:
    name, setup, parallel = config
    base = _predict(name, setup, parallel).trace.peak().peak_bytes
    wider = setup.model_copy(update={"micro_batch_size": setup.micro_batch_size + more_batch})
    longer = setup.model_copy(update={"seq_len": setup.seq_len + more_seq})
    assert _predict(name, wider, parallel).trace.peak().peak_bytes >= base
    assert _predict(name, longer, parallel).trace.peak().peak_bytes >= base


# -- activation checkpointing --------------------------------------------------------------
#
# Checkpointing trades what the forward leaves for backward against recomputation. So the
# quantity it must never increase is the activations alive when the forward ends. The *peak*
# can rise: recomputing a layer in backward re-creates its transient buffers (dequantized
# 4-bit weights, fp32 norm upcasts) at a moment when most gradients already exist, and when
# activations are small next to the weights that costs more than it saves (see the example
# below).


def _ckpt_cases() -> Iterator[Any]:
    for name in TINY:
        yield pytest.param(name, ("adapter",), id=f"{name}-peft")
        yield pytest.param(name, ("full", "lora", "qlora", "bitfit"), id=f"{name}")


@pytest.mark.parametrize(("name", "methods"), list(_ckpt_cases()))
@given(data=st.data())
def test_checkpointing_never_adds_activations_at_the_end_of_the_forward(
    name: str, methods: tuple[str, ...], data: st.DataObject
) -> None:
    setup = data.draw(training_setups(name, methods))
    plain = setup.model_copy(update={"grad_ckpt": False, "grad_ckpt_every": 1})
    ckpt = setup.model_copy(update={"grad_ckpt": True})
    held = _end_of_forward(_predict(name, plain).trace).get(Category.ACTIVATIONS, 0)
    held_ckpt = _end_of_forward(_predict(name, ckpt).trace).get(Category.ACTIVATIONS, 0)
    assert held_ckpt <= held
    if ckpt.grad_ckpt_every > 1:  # checkpointing every layer holds the least
        every = ckpt.model_copy(update={"grad_ckpt_every": 1})
        assert (
            _end_of_forward(_predict(name, every).trace).get(Category.ACTIVATIONS, 0) <= held_ckpt
        )


def test_checkpointing_can_raise_the_peak_when_activations_are_small(
    tiny_llama: ModelSpec,
) -> None:
    setup = TrainingSetup(
        method="qlora", micro_batch_size=1, seq_len=16, optimizer="adamw", grad_ckpt=False
    )
    plain = predict(tiny_llama, setup)
    ckpt = predict(tiny_llama, setup.model_copy(update={"grad_ckpt": True}))
    # Fewer activations when the forward ends...
    assert (
        _end_of_forward(ckpt.trace)[Category.ACTIVATIONS]
        < _end_of_forward(plain.trace)[Category.ACTIVATIONS]
    )
    # ...but a higher peak: it moves into the recomputation, with every LoRA gradient alive.
    assert ckpt.trace.peak().peak_bytes > plain.trace.peak().peak_bytes
    assert (
        ckpt.trace.peak().breakdown_bytes[Category.GRADIENTS]
        == (ckpt.state.bytes_by_category()[Category.TRAINABLE_WEIGHTS])
    )


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2-medium", "t5-3b"])
def test_checkpointing_lowers_the_peak_when_activations_dominate(name: str) -> None:
    setup = TrainingSetup(method="lora", micro_batch_size=4, seq_len=2048)
    plain = _predict(name, setup).trace.peak().peak_bytes
    assert (
        _predict(name, setup.model_copy(update={"grad_ckpt": True})).trace.peak().peak_bytes < plain
    )


# -- sharding ------------------------------------------------------------------------------


@given(
    st.sampled_from(TINY),
    st.sampled_from(("full", "lora", "qlora", "bitfit")),
    st.sampled_from((True, False, None)),
    st.sampled_from((2, 4, 8)),
    st.sampled_from(("adamw", "sgd", "adamw-8bit", "lion")),
)
def test_a_higher_zero_stage_never_increases_per_gpu_model_state(
    name: str, method: str, master: bool | None, gpus: int, optimizer: str
) -> None:
    """Stage s+1 shards one more kind of state than stage s. With master weights left to the
    default, DeepSpeed adds fp32 masters from stage 1 on, so the comparison starts there."""
    assume(_runs(name, method))
    setup = TrainingSetup(
        method=method,
        precision="bf16",
        master_weights=master,
        optimizer=optimizer,
        micro_batch_size=1,
        seq_len=16,
    )
    stages = range(4) if master is not None else range(1, 4)
    state = [
        _max_model_state(_predict(name, setup, ParallelSetup(num_gpus=gpus, zero_stage=s)).trace)
        for s in stages
    ]
    assert state == sorted(state, reverse=True)


@given(
    st.sampled_from((*TINY, "gpt2", "qwen2.5-0.5b")),
    st.sampled_from(("full", "lora", "qlora")),
    st.sampled_from((1, 2, 4, 8)),
    st.booleans(),
)
def test_more_gpus_under_zero_3_never_increase_per_gpu_memory(
    name: str, method: str, gpus: int, fsdp: bool
) -> None:
    assume(_runs(name, method))
    setup = TrainingSetup(method=method, micro_batch_size=2, seq_len=32)
    sharding = "fsdp" if fsdp else "deepspeed"
    peaks = [
        _predict(name, setup, ParallelSetup(num_gpus=n, zero_stage=3, sharding=sharding))
        .trace.peak()
        .peak_bytes
        for n in (gpus, 2 * gpus)
    ]
    assert peaks[1] <= peaks[0]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_shards_optimizer_state_once(llama_2_7b: ModelSpec, stage: int) -> None:
    # Adam's fp32 moments with master weights: 8 bytes per parameter, split over 64 ranks.
    setup = TrainingSetup(method="full", precision="bf16")
    prediction = predict(llama_2_7b, setup, ParallelSetup(num_gpus=64, zero_stage=stage))
    params = llama_2_7b.num_params
    assert params is not None
    share = prediction.optimizer.state_bytes / (8 * params / 64)
    assert share == pytest.approx(1.0, rel=2e-3)
    assert prediction.master_bytes / (4 * params / 64) == pytest.approx(1.0, rel=2e-3)


# -- methods -------------------------------------------------------------------------------


@given(
    st.sampled_from(MEDIUM),
    st.sampled_from(("bf16", "fp16")),
    st.sampled_from(("adamw", "sgd", "adamw-8bit")),
    st.integers(1, 2),
    st.sampled_from((128, 256)),
    st.booleans(),
    st.sampled_from(((("q", "v")), ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down"))),
    st.sampled_from((8, 16)),
    st.sampled_from(("eager", "sdpa", "flash")),
)
def test_qlora_below_lora_below_full_fine_tuning(
    name: str,
    precision: str,
    optimizer: str,
    batch: int,
    seq: int,
    ckpt: bool,
    targets: tuple[str, ...],
    r: int,
    attention: str,
) -> None:
    """In the regime where model state dominates (a few hundred tokens per micro-batch).

    With thousands of tokens LoRA on every linear can exceed full fine-tuning: peft casts
    each adapted linear's input to the fp32 adapter dtype and lora_A saves that copy, which
    outgrows the gradients and optimizer state LoRA avoids (e.g. bert-base, 2 x 512 tokens,
    SGD).
    """
    common: dict[str, Any] = {
        "precision": precision,
        "optimizer": optimizer,
        "micro_batch_size": batch,
        "seq_len": seq,
        "grad_ckpt": ckpt,
        "attention": attention,
    }
    adapters = {"lora_targets": targets, "lora_r": r, "lora_alpha": 16.0, "lora_dropout": 0.0}
    peaks = {
        method: _predict(
            name, TrainingSetup(method=method, **common, **(adapters if method != "full" else {}))
        )
        .trace.peak()
        .peak_bytes
        for method in ("qlora", "lora", "full")
    }
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]

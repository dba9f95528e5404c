"""ZeRO / FSDP shard plans, tensor-parallel layout checks and the ZeRO paper's accounting."""

from __future__ import annotations

import pytest

from memplan.distributed import (
    DEEPSPEED_MAX_LIVE_PARAMETERS,
    DEEPSPEED_REDUCE_BUCKET_ELEMENTS,
    FSDP_GATHERED_LAYERS,
    master_weights_on,
    shard_plan,
    zero_model_state_bytes,
)
from memplan.errors import MemplanError
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup
from memplan.trace import Category

PSI = 7_500_000_000  # the ZeRO paper's 7.5B-parameter example
N = 64  # data-parallel degree of Figure 1
K = 12  # mixed-precision Adam: fp32 master (4) + momentum (4) + variance (4)


def test_zero_paper_figure_1_per_gpu_model_state() -> None:
    """Rajbhandari et al. 2020 (arXiv:1910.02054), Figure 1: 7.5B parameters, N=64, K=12.

    stage 0: (2 + 2 + K) * psi             = 16 * 7.5e9          = 120 GB
    stage 1: 2 psi + 2 psi + K psi / N     = (4 + 12/64) * 7.5e9 = 31.4 GB
    stage 2: 2 psi + (2 + K) psi / N       = (2 + 14/64) * 7.5e9 = 16.6 GB
    stage 3: (2 + 2 + K) psi / N           = (16/64) * 7.5e9     = 1.9 GB
    """
    per_gpu = [zero_model_state_bytes(PSI, stage, N) for stage in range(4)]
    assert per_gpu == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]
    assert [round(b / 10**9, 1) for b in per_gpu] == [120.0, 31.4, 16.6, 1.9]  # as printed


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_zero_stages_never_increase_per_gpu_state(n: int) -> None:
    per_gpu = [zero_model_state_bytes(PSI, stage, n) for stage in range(4)]
    assert per_gpu == sorted(per_gpu, reverse=True)
    if n == 1:  # one GPU: nothing to shard
        assert len(set(per_gpu)) == 1


def test_zero_optimizer_bytes_per_param_is_a_parameter() -> None:
    # 8-bit Adam keeps ~2 bytes of state: stage 1 with N=8 is 2 + 2 + 2/8 bytes per parameter.
    assert zero_model_state_bytes(8_000, 1, 8, optimizer_bytes_per_param=2) == 8_000 * 4 + 2_000


# -- shard plans ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "divisors"),
    [(0, (1, 1, 1)), (1, (1, 1, 8)), (2, (1, 8, 8)), (3, (8, 8, 8))],
)
def test_each_stage_shards_one_more_kind_of_state(
    llama_2_7b: ModelSpec, stage: int, divisors: tuple[int, int, int]
) -> None:
    plan = shard_plan(
        llama_2_7b, TrainingSetup(precision="bf16"), ParallelSetup(num_gpus=8, zero_stage=stage)
    )
    assert (plan.weight_divisor, plan.grad_divisor, plan.optimizer_divisor) == divisors
    # DeepSpeed ZeRO-3 keeps up to stage3_max_live_parameters (1e9) of the 6.7B parameters
    # gathered; the other stages gather nothing.
    expected = min(DEEPSPEED_MAX_LIVE_PARAMETERS, 6_738_415_616) if stage == 3 else 0
    assert plan.resident_gathered_params == expected
    assert plan.gather_layers == 0  # per-layer gathering is FSDP's


def test_fsdp_full_shard_gathers_two_layers(llama_2_7b: ModelSpec) -> None:
    parallel = ParallelSetup(num_gpus=8, zero_stage=3, sharding="fsdp")
    plan = shard_plan(llama_2_7b, TrainingSetup(precision="bf16"), parallel)
    assert plan.gather_layers == FSDP_GATHERED_LAYERS == 2  # the computing layer + prefetch
    assert plan.resident_gathered_params == 0


def test_tensor_parallelism_divides_the_data_parallel_degree(llama_2_7b: ModelSpec) -> None:
    plan = shard_plan(
        llama_2_7b,
        TrainingSetup(precision="bf16"),
        ParallelSetup(num_gpus=16, tensor_parallel_degree=4, zero_stage=3),
    )
    assert plan.data_parallel_degree == 4
    assert plan.weight_divisor == 4


def test_deepspeed_reduce_bucket_defaults_to_deepspeed_config(llama_2_7b: ModelSpec) -> None:
    setup = TrainingSetup(precision="bf16")
    # DeepSpeed allocates one reduce_bucket_size buffer (default 5e8 elements) at every stage,
    # one GPU included (the peft README's ZeRO-3 offload runs show it before training).
    for parallel in (
        ParallelSetup(num_gpus=8, zero_stage=1),
        ParallelSetup(num_gpus=8, zero_stage=3),
        ParallelSetup(num_gpus=1, zero_stage=2),
    ):
        plan = shard_plan(llama_2_7b, setup, parallel)
        assert plan.reduce_bucket_elements == DEEPSPEED_REDUCE_BUCKET_ELEMENTS == 500_000_000
    # Hugging Face's "auto" config sets hidden_size**2; the field takes any value.
    tuned = ParallelSetup(num_gpus=8, zero_stage=2, reduce_bucket_elements=4096 * 4096)
    assert shard_plan(llama_2_7b, setup, tuned).reduce_bucket_elements == 4096 * 4096
    no_bucket = [
        ParallelSetup(num_gpus=8, zero_stage=2, sharding="fsdp"),
        ParallelSetup(num_gpus=8),
    ]
    for parallel in no_bucket:
        assert shard_plan(llama_2_7b, setup, parallel).reduce_bucket_elements == 0
    frozen = TrainingSetup(method="frozen")
    assert (
        shard_plan(
            llama_2_7b, frozen, ParallelSetup(num_gpus=8, zero_stage=3)
        ).reduce_bucket_elements
        == 0
    )


def test_offload_flags(llama_2_7b: ModelSpec) -> None:
    setup = TrainingSetup(precision="bf16")
    opt = shard_plan(
        llama_2_7b, setup, ParallelSetup(num_gpus=8, zero_stage=2, offload="optimizer")
    )
    assert (opt.offload_optimizer, opt.offload_params) == (True, False)
    both = shard_plan(
        llama_2_7b, setup, ParallelSetup(num_gpus=8, zero_stage=3, offload="optimizer+params")
    )
    assert (both.offload_optimizer, both.offload_params) == (True, True)


# -- master weights ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "method", "parallel", "expected"),
    [
        ("bf16", "full", {"num_gpus": 8, "zero_stage": 1}, True),  # DeepSpeed bf16: fp32 master
        ("fp16", "full", {"num_gpus": 8, "zero_stage": 3}, True),
        ("bf16", "full", {"num_gpus": 8}, False),  # plain data parallel: torch AdamW on bf16
        ("bf16-amp", "full", {"num_gpus": 8, "zero_stage": 2}, False),  # weights already fp32
        ("bf16", "full", {"num_gpus": 8, "zero_stage": 2, "sharding": "fsdp"}, False),
        ("bf16", "frozen", {"num_gpus": 8, "zero_stage": 3}, False),  # nothing to step
        ("bf16", "lora", {"num_gpus": 8, "zero_stage": 2}, True),  # the adapters get masters
    ],
)
def test_master_weights_default(
    precision: str, method: str, parallel: dict[str, object], expected: bool
) -> None:
    setup = TrainingSetup(method=method, precision=precision)
    assert master_weights_on(setup, ParallelSetup(**parallel)) is expected


def test_explicit_master_weights_win() -> None:
    zero = ParallelSetup(num_gpus=8, zero_stage=1)
    assert not master_weights_on(TrainingSetup(precision="bf16", master_weights=False), zero)
    assert master_weights_on(TrainingSetup(precision="bf16", master_weights=True), ParallelSetup())


# -- tensor-parallel layout ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "tp", "field"),
    [
        ("llama-2-7b", 3, "num_attention_heads=32"),
        ("llama-3.1-8b", 16, "num_key_value_heads=8"),  # 32 query heads split, 8 KV heads not
        ("mistral-7b", 32, "num_key_value_heads=8"),
    ],
)
def test_tensor_parallel_degree_must_divide_heads(model: str, tp: int, field: str) -> None:
    from memplan.catalog import load_model

    with pytest.raises(MemplanError, match=f"tensor_parallel_degree={tp} does not divide {field}"):
        shard_plan(
            load_model(model),
            TrainingSetup(precision="bf16"),
            ParallelSetup(num_gpus=tp, tensor_parallel_degree=tp),
        )


def test_tensor_parallel_degree_must_divide_the_mlp(tiny_llama: ModelSpec) -> None:
    # tiny-llama: 4 heads, 2 KV heads, intermediate_size 352 = 2**5 * 11: tp=2 splits all.
    shard_plan(tiny_llama, TrainingSetup(), ParallelSetup(num_gpus=2, tensor_parallel_degree=2))
    spec = tiny_llama.model_copy(update={"intermediate_size": 351})
    with pytest.raises(MemplanError, match="does not divide intermediate_size=351"):
        shard_plan(spec, TrainingSetup(), ParallelSetup(num_gpus=2, tensor_parallel_degree=2))


@pytest.mark.parametrize("mixed", [True, False])
def test_fsdp_accumulation_gradients_follow_the_wrap_units(mixed: bool) -> None:
    """FSDP no_sync under gradient accumulation holds unsharded gradients of every flat
    parameter that requires grad: the whole block when a unit mixes frozen and trainable
    parameters (litgpt's blocks), the adapters alone under peft's wrap policy."""
    from memplan.analytic.predict import predict
    from memplan.catalog import load_model

    spec = load_model("llama-2-70b")
    parallel = ParallelSetup(num_gpus=8, sharding="fsdp", fsdp_mixed_units=mixed)
    lora = TrainingSetup(method="lora", grad_accum_steps=4, grad_ckpt=True)
    single = TrainingSetup(method="lora", grad_ckpt=True)
    accumulated = predict(spec, lora, parallel).trace.category_peaks()[Category.GRADIENTS]
    once = predict(spec, single, parallel).trace.category_peaks()[Category.GRADIENTS]
    state = predict(spec, lora, parallel).state
    held = accumulated - once
    if mixed:  # bf16 unsharded gradients of the whole model
        assert held >= state.num_params * 2 - 512
    else:  # bf16 unsharded adapter gradients at most
        assert held <= state.num_trainable_params * 2 + 512


# -- FSDP: precision policies, strategies, wrap units ---------------------------------------


def _state(spec: ModelSpec, setup: TrainingSetup, parallel: ParallelSetup) -> dict[Category, int]:
    from memplan.analytic.predict import predict

    return predict(spec, setup, parallel).state.bytes_by_category()


def test_fsdp_mixed_precision_keeps_fp32_shards_without_masters(llama_2_7b: ModelSpec) -> None:
    """FSDP MixedPrecision over an fp32 load: the FlatParameter shard is fp32 and the optimizer
    steps it (no master copy); DeepSpeed's bf16 mode keeps 16-bit weights plus fp32 masters."""
    from memplan.analytic.predict import predict

    amp = TrainingSetup(method="full", precision="bf16-amp")
    fsdp8 = ParallelSetup(num_gpus=8, sharding="fsdp")
    fsdp = predict(llama_2_7b, amp, fsdp8)
    deepspeed = predict(llama_2_7b, amp, ParallelSetup(num_gpus=8, zero_stage=3))
    n = llama_2_7b.num_params
    fsdp_state = fsdp.state.bytes_by_category()
    assert fsdp.master_bytes == 0
    # fp32 shards of every parameter: 4 bytes / 8 ranks (each tensor rounded by the allocator)
    assert fsdp_state[Category.TRAINABLE_WEIGHTS] == pytest.approx(n * 4 / 8, rel=1e-3)
    ds_state = deepspeed.state.bytes_by_category()
    assert ds_state[Category.TRAINABLE_WEIGHTS] == pytest.approx(n * 2 / 8, rel=1e-3)
    assert deepspeed.master_bytes == pytest.approx(n * 4 / 8, rel=1e-3)
    # the gradient shard is fp32 (cast after the 16-bit reduce-scatter): 4 bytes / 8 ranks
    grads = fsdp.trace.category_peaks()[Category.GRADIENTS]
    ds_grads = deepspeed.trace.category_peaks()[Category.GRADIENTS]
    assert grads >= n * 4 / 8 > ds_grads
    # pure 16-bit FSDP (a bf16 load): bf16 shards, no masters
    pure = predict(llama_2_7b, TrainingSetup(method="full", precision="bf16"), fsdp8)
    assert pure.master_bytes == 0
    pure_bytes = pure.state.bytes_by_category()[Category.TRAINABLE_WEIGHTS]
    assert pure_bytes == pytest.approx(n * 2 / 8, rel=1e-3)


def test_fsdp_lora_frozen_weights_keep_the_loaded_dtype(llama_2_7b: ModelSpec) -> None:
    amp = TrainingSetup(method="lora", precision="bf16-amp")
    state = _state(llama_2_7b, amp, ParallelSetup(num_gpus=4, sharding="fsdp"))
    assert state[Category.FROZEN_WEIGHTS] == pytest.approx(llama_2_7b.num_params * 4 / 4, rel=1e-3)


def test_hybrid_shard_splits_model_state_within_a_node(llama_2_7b: ModelSpec) -> None:
    """HYBRID_SHARD on 4 nodes of 8: each rank holds what FULL_SHARD on 8 GPUs gives it."""
    setup = TrainingSetup(method="full", precision="bf16")
    hybrid = ParallelSetup(num_gpus=32, sharding="fsdp", shard_group_size=8)
    full8 = ParallelSetup(num_gpus=8, sharding="fsdp")
    full32 = ParallelSetup(num_gpus=32, sharding="fsdp")
    assert _state(llama_2_7b, setup, hybrid) == _state(llama_2_7b, setup, full8)
    assert sum(_state(llama_2_7b, setup, full32).values()) < sum(
        _state(llama_2_7b, setup, hybrid).values()
    )
    assert shard_plan(llama_2_7b, setup, hybrid).weight_divisor == 8


def test_fsdp_no_shard_holds_the_whole_model(llama_2_7b: ModelSpec) -> None:
    setup = TrainingSetup(method="full", precision="bf16")
    no_shard = ParallelSetup(num_gpus=8, sharding="fsdp", zero_stage=0)
    plan = shard_plan(llama_2_7b, setup, no_shard)
    assert (plan.weight_divisor, plan.grad_divisor, plan.optimizer_divisor) == (1, 1, 1)
    assert _state(llama_2_7b, setup, no_shard) == _state(llama_2_7b, setup, ParallelSetup())


def test_fsdp_lora_default_units_give_frozen_weights_no_gradients() -> None:
    """The 70B LoRA run under FSDP with gradient accumulation: with the Hugging Face Trainer's
    wrap policy (peft's, the default) the per-GPU gradients are the adapters' alone."""
    from memplan.analytic.predict import predict
    from memplan.catalog import load_model

    spec = load_model("llama-2-70b")
    setup = TrainingSetup(
        method="lora",
        precision="bf16-amp",
        micro_batch_size=8,
        seq_len=2048,
        grad_accum_steps=4,
        grad_ckpt=True,
        attention="flash",
    )
    prediction = predict(spec, setup, ParallelSetup(num_gpus=8, sharding="fsdp"))
    grads = prediction.trace.category_peaks()[Category.GRADIENTS]
    trainable = prediction.state.num_trainable_params
    assert grads < trainable * 4 * 2  # fp32 adapter gradients, at most a second copy
    assert grads < 0.001 * spec.num_params


# -- NCCL communicators -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "groups"),
    [
        ({}, [1]),
        ({"num_gpus": 2, "zero_stage": 3}, [2]),
        ({"num_gpus": 8, "tensor_parallel_degree": 2}, [8, 2, 4]),
        ({"num_gpus": 8, "tensor_parallel_degree": 8}, [8]),
        ({"num_gpus": 32, "sharding": "fsdp", "shard_group_size": 8}, [32, 8, 4]),
    ],
)
def test_process_groups_of_a_layout(fields: dict[str, object], groups: list[int]) -> None:
    assert ParallelSetup(**fields).process_group_sizes == groups


def test_nccl_communicators_count_on_the_device_outside_the_allocator() -> None:
    from memplan.overheads import (
        NCCL_COMMUNICATOR_BYTES,
        NCCL_PAIR_COMMUNICATOR_BYTES,
        communicator_bytes,
    )
    from memplan.plan import plan

    assert communicator_bytes([1]) == 0
    assert communicator_bytes([2]) == NCCL_PAIR_COMMUNICATOR_BYTES
    assert (
        communicator_bytes([8, 2, 4]) == NCCL_COMMUNICATOR_BYTES * 2 + NCCL_PAIR_COMMUNICATOR_BYTES
    )
    single = plan("llama-2-7b", TrainingSetup(method="lora"))
    assert single.communicator_bytes == 0
    eight = plan("llama-2-7b", TrainingSetup(method="lora"), ParallelSetup(num_gpus=8))
    assert eight.communicator_bytes == NCCL_COMMUNICATOR_BYTES
    assert eight.device_bytes == (
        eight.reserved_bytes + eight.cuda_context_bytes + eight.communicator_bytes
    )
    # the allocated peak of a replicated (DDP) step is the single GPU's
    assert eight.peak_bytes == single.peak_bytes

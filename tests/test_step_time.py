"""The step-time model: each term by hand, then against published step times and throughputs."""

from __future__ import annotations

import pytest

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.hardware import load_profile
from memplan.specs import ModelSpec, ParallelSetup, TrainingSetup
from memplan.step_time import (
    CPU_ADAM_PARAMS_PER_S,
    ModelBytes,
    StepTime,
    TimeEstimate,
    model_bytes,
    step_time,
    time_estimate,
)
from memplan.throughput import UTILISATION_FRACTION, FlopsPerToken, compute_dtype, flops_per_token

H100 = load_profile("h100-sxm")  # AWS p5.48xlarge: 8 per node, NVLink 450 GB/s, 400 GB/s network
PEAK = 989.0  # H100 SXM dense bf16 TFLOP/s (profile)
NVLINK, PER_DEVICE_NETWORK, PCIE5 = 450e9, 400e9 / 8, 63_015_384_615
FLOPS = FlopsPerToken(forward=2 * 10**10, backward=4 * 10**10, recompute=0)
SETUP = TrainingSetup(method="full", precision="bf16", micro_batch_size=2, seq_len=1024)
TOKENS = 2 * 1024
FORWARD_S = 2e10 * TOKENS / (PEAK * 1e12 * UTILISATION_FRACTION)
BACKWARD_S = 2 * FORWARD_S
PARAMS = 10**10
MOVED = ModelBytes(weight_bytes=2 * PARAMS, trainable_bytes=2 * PARAMS, num_trainable_params=PARAMS)


def _step(
    parallel: ParallelSetup, setup: TrainingSetup = SETUP, moved: ModelBytes = MOVED
) -> StepTime:
    return step_time(FLOPS, setup, parallel, moved, H100, PEAK)


def test_one_device_is_compute_at_the_utilisation_fraction() -> None:
    step = _step(ParallelSetup())
    assert step.compute_s == pytest.approx(FORWARD_S + BACKWARD_S)
    assert step.step_s == step.compute_s
    assert (step.collective_s, step.host_transfer_s, step.cpu_optimizer_s) == (0, 0, 0)
    assert step.tokens_per_step == TOKENS
    assert step.bound == "compute"


def test_ddp_all_reduce_hides_behind_the_last_backward() -> None:
    small = ModelBytes(10**9, 10**9, 5 * 10**8)
    step = _step(ParallelSetup(num_gpus=8), moved=small)
    all_reduce = 2 * 7 / 8 * 10**9 / NVLINK  # ring all-reduce: 2(N-1)/N of the data per device
    assert all_reduce < BACKWARD_S
    assert step.collective_s == pytest.approx(all_reduce)
    assert step.step_s == pytest.approx(FORWARD_S + BACKWARD_S)  # fully hidden
    large = ModelBytes(2 * 10**11, 2 * 10**11, 10**11)
    setup = SETUP.model_copy(update={"grad_accum_steps": 4})
    accumulating = _step(ParallelSetup(num_gpus=8), setup, large)
    exposed = 2 * 7 / 8 * 2 * 10**11 / NVLINK - BACKWARD_S  # once a step, past the last backward
    assert exposed > 0
    assert accumulating.step_s == pytest.approx(4 * (FORWARD_S + BACKWARD_S) + exposed)
    assert accumulating.tokens_per_step == 4 * 8 * TOKENS


def test_zero3_gathers_twice_and_overlaps_each_pass() -> None:
    step = _step(ParallelSetup(num_gpus=8, zero_stage=3))
    gather = 7 / 8 * 2 * PARAMS / NVLINK
    scatter = 7 / 8 * 2 * PARAMS / NVLINK
    assert step.collective_s == pytest.approx(2 * gather + scatter)  # ZeRO section 7: 3 psi
    assert step.step_s == pytest.approx(max(FORWARD_S, gather) + max(BACKWARD_S, gather + scatter))


def test_fsdp_full_shard_reduce_scatters_only_the_last_micro_batch() -> None:
    setup = SETUP.model_copy(update={"grad_accum_steps": 3})
    step = _step(ParallelSetup(num_gpus=8, zero_stage=3, sharding="fsdp"), setup)
    gather = 7 / 8 * 2 * PARAMS / NVLINK
    assert step.collective_s == pytest.approx(3 * 2 * gather + gather)  # no_sync: one scatter


def test_zero2_adds_its_collectives_to_compute() -> None:
    step = _step(ParallelSetup(num_gpus=8, zero_stage=2))
    scatter = gather = 7 / 8 * 2 * PARAMS / NVLINK  # gradients, then updated weights
    assert step.step_s == pytest.approx(FORWARD_S + BACKWARD_S + scatter + gather)


def test_beyond_a_node_the_network_share_sets_the_pace() -> None:
    within = _step(ParallelSetup(num_gpus=8, zero_stage=2))
    across = _step(ParallelSetup(num_gpus=16, zero_stage=2))
    assert within.collective_s == pytest.approx(2 * 7 / 8 * 2 * PARAMS / NVLINK)
    assert across.collective_s == pytest.approx(2 * 15 / 16 * 2 * PARAMS / PER_DEVICE_NETWORK)


def test_zero_offload_moves_four_bytes_per_parameter_on_one_gpu() -> None:
    """ZeRO-Offload (arXiv:2101.06840): 16-bit gradients to the CPU, 16-bit
    parameters back: 4 bytes per parameter over PCIe; the CPU steps every parameter."""
    step = _step(ParallelSetup(zero_stage=2, offload="optimizer"))
    assert step.host_transfer_s == pytest.approx(4 * PARAMS / PCIE5)
    assert step.cpu_optimizer_s == pytest.approx(PARAMS / CPU_ADAM_PARAMS_PER_S)
    assert step.collective_s == 0
    assert step.step_s == pytest.approx(
        FORWARD_S + BACKWARD_S + step.host_transfer_s + step.cpu_optimizer_s
    )
    assert step.bound == "CPU optimizer"


def test_the_cpu_steps_the_partitions_of_its_node() -> None:
    step = _step(ParallelSetup(num_gpus=16, zero_stage=3, offload="optimizer"))
    assert step.cpu_optimizer_s == pytest.approx(PARAMS / 16 * 8 / CPU_ADAM_PARAMS_PER_S)


def test_parameter_offload_fetches_weights_in_forward_and_backward() -> None:
    step = _step(ParallelSetup(zero_stage=3, offload="optimizer+params"))
    fetch = 2 * PARAMS / PCIE5
    assert step.host_transfer_s == pytest.approx(fetch + fetch + 2 * PARAMS / PCIE5)
    assert step.step_s == pytest.approx(
        max(FORWARD_S, fetch) + max(BACKWARD_S, 2 * fetch) + step.cpu_optimizer_s
    )


def test_time_and_cost_of_a_job() -> None:
    est = time_estimate(
        FLOPS, SETUP, ParallelSetup(num_gpus=8, zero_stage=3), MOVED, H100, "bf16", 10**9
    )
    assert est is not None
    assert est.tokens_per_second == pytest.approx(est.step.tokens_per_step / est.step.step_s)
    assert est.hours == pytest.approx(10**9 / est.tokens_per_second / 3600)
    assert est.usd_per_hour == pytest.approx(8 * 3.78)  # Lambda 1x H100 SXM, the cheapest offer
    assert est.cost_usd == pytest.approx(est.hours * est.usd_per_hour)
    assert est.usd_per_million_tokens == pytest.approx(est.cost_usd / 1000)
    apple = load_profile("m2-ultra-192gb")  # no published matrix rate
    assert time_estimate(FLOPS, SETUP, ParallelSetup(), MOVED, apple, "bf16") is None


def test_model_bytes_unshard_the_prediction() -> None:
    spec = load_model("llama-2-7b")
    setup = TrainingSetup(method="full")  # bf16-amp: DDP keeps fp32 weights, ZeRO 16-bit ones
    ddp = model_bytes(predict(spec, setup, ParallelSetup()))
    zero3 = model_bytes(predict(spec, setup, ParallelSetup(num_gpus=8, zero_stage=3)))
    assert ddp.trainable_bytes == 4 * 6_738_415_616
    assert zero3.trainable_bytes == 2 * 6_738_415_616
    # The rest is the fp32 rotary inv_freq buffers (2 x 64), which ZeRO-3 does not partition:
    # counted once per shard there, 4 KiB too many.
    assert ddp.weight_bytes - ddp.trainable_bytes == 2 * 64 * 4
    assert zero3.weight_bytes - zero3.trainable_bytes == 8 * 2 * 64 * 4
    lora = model_bytes(predict(spec, TrainingSetup(method="lora"), ParallelSetup()))
    assert lora.num_trainable_params == 4_194_304  # r=8 on q and v: 32 x 2 x (4096 x 8 x 2)
    assert lora.trainable_bytes == 4 * 4_194_304  # fp32 adapters
    assert lora.weight_bytes == 2 * 6_738_415_616 + lora.trainable_bytes + 2 * 64 * 4


# ------------------------------------------------------------------ against published numbers


def _estimate(
    model: str | ModelSpec, setup: TrainingSetup, parallel: ParallelSetup, gpu: str
) -> tuple[TimeEstimate, int]:
    """memplan's estimate, and the FLOPs per token behind it."""
    spec = load_model(model) if isinstance(model, str) else model
    prediction = predict(spec, setup, parallel)
    flops = flops_per_token(spec, setup, prediction.state.num_trainable_params)
    profile = load_profile(gpu)
    dtype = compute_dtype(setup, profile)
    assert dtype is not None
    est = time_estimate(flops, setup, parallel, model_bytes(prediction), profile, dtype)
    assert est is not None
    return est, flops.total


# torchtune README "Memory and training speed" (pytorch/torchtune commit 30b8519e8, 2024-09-24):
# Llama 3.1, batch size 2, no gradient accumulation, packed to 2048 tokens, torch.compile, bf16,
# tokens/s over one epoch; the rest of each setup is the recipe's config of that commit
# (recipes/configs/llama3_1/*.yaml): activation checkpointing on, LoRA rank and targets, the
# optimizer, FSDP FULL_SHARD on 8 GPUs. The A6000 rows are left out: their peak memory (37.4 and
# 30.3 GiB, twice the 4090 rows) shows checkpointing was off there, which the table does not say.
TORCHTUNE = {"micro_batch_size": 2, "seq_len": 2048, "grad_ckpt": True, "precision": "bf16"}
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
_FSDP8 = ParallelSetup(num_gpus=8, zero_stage=3, sharding="fsdp")
PUBLISHED_TOKENS_PER_S = [
    pytest.param(
        "llama-3.1-8b",
        TrainingSetup(method="full", optimizer="paged-adamw-8bit", **TORCHTUNE),
        ParallelSetup(),
        "rtx-4090",
        1650,
        id="torchtune 8B full, 1x RTX 4090: 1650 tok/s",
    ),
    pytest.param(
        "llama-3.1-8b",
        TrainingSetup(
            method="lora", lora_r=8, lora_targets=("q", "v"), optimizer="adamw", **TORCHTUNE
        ),
        ParallelSetup(),
        "rtx-4090",
        3083,
        id="torchtune 8B LoRA, 1x RTX 4090: 3083 tok/s",
    ),
    pytest.param(
        "llama-3.1-8b",
        TrainingSetup(
            method="qlora", lora_r=8, lora_targets=ALL_LINEAR, optimizer="adamw", **TORCHTUNE
        ),
        ParallelSetup(),
        "rtx-4090",
        2413,
        id="torchtune 8B QLoRA, 1x RTX 4090: 2413 tok/s",
    ),
    pytest.param(
        "llama-3.1-70b",
        TrainingSetup(
            method="lora", lora_r=16, lora_targets=("q", "k", "v"), optimizer="adamw", **TORCHTUNE
        ),
        _FSDP8,
        "a100-80gb-sxm",
        3497,
        id="torchtune 70B LoRA, 8x A100 FSDP: 3497 tok/s",
    ),
    pytest.param(
        "llama-3.1-405b",
        TrainingSetup(
            method="qlora",
            lora_r=16,
            lora_targets=ALL_LINEAR,
            optimizer="adamw",
            **{**TORCHTUNE, "micro_batch_size": 1},
        ),
        _FSDP8,
        "a100-80gb-sxm",
        653,
        id="torchtune 405B QLoRA, 8x A100 FSDP: 653 tok/s",
    ),
]
# The tolerance: memplan assumes 40% of the dense peak (memplan.throughput, below the MFU of large
# tuned pretraining runs). Single-node torchtune runs with torch.compile reach more (the 8B LoRA row
# implies about 90% of the RTX 4090's 165 TFLOP/s at memplan's FLOP count), so memplan's throughput
# is low by up to 2.3x there; a factor of 2.5 either way is what a FLOPs model at a fixed
# utilisation can promise. The bias is on the slow side (time and cost are overestimated), the
# same for every accelerator, so rankings are unaffected.
FACTOR = 2.5


@pytest.mark.parametrize(("model", "setup", "parallel", "gpu", "published"), PUBLISHED_TOKENS_PER_S)
def test_throughput_within_a_factor_of_published_runs(
    model: str, setup: TrainingSetup, parallel: ParallelSetup, gpu: str, published: float
) -> None:
    est, _ = _estimate(model, setup, parallel, gpu)
    ratio = est.tokens_per_second / published
    assert 1 / FACTOR <= ratio <= FACTOR, (
        f"memplan {est.tokens_per_second:,.0f} tok/s, {ratio:.2f}x"
    )
    assert ratio < 1  # memplan errs on the slow side: 0.44-0.65 on these rows


def _gpt2_10b() -> ModelSpec:
    """The ZeRO-Offload tutorial's 10B GPT-2 (Megatron-LM GPT-2: 50 layers, hidden 4096, 32 heads,
    sequence 1024), https://www.deepspeed.ai/tutorials/zero-offload/."""
    data = load_model("gpt2").model_dump()
    data |= {
        "name": "gpt2-10b",
        "num_decoder_layers": 50,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "intermediate_size": 4 * 4096,
        "max_position_embeddings": 1024,
        "num_params": None,  # gpt2's published count does not apply
    }
    return ModelSpec.model_validate(data)


def test_zero_offload_10b_on_one_v100() -> None:
    """ZeRO-Offload (Ren et al. 2021, arXiv:2101.06840, abstract): 40 TFLOPS on a single V100 for
    a 10B-parameter model (ZeRO-2 with the optimizer on the CPU; DGX-2, PCIe 3.0 host link).

    Setup from DeepSpeed's ZeRO-Offload tutorial, which trains that model on one V100-SXM3 32GB:
    batch 10, sequence 1024, activation checkpointing, fp16. memplan counts the FLOPs the GPU runs
    (recomputation included), as Megatron's TFLOPS counter does. memplan: 31.9 TFLOPS (0.80x),
    the step split into compute, 4 bytes/parameter over PCIe and DeepSpeedCPUAdam.
    """
    spec = _gpt2_10b()
    setup = TrainingSetup(
        method="full", precision="fp16", micro_batch_size=10, seq_len=1024, grad_ckpt=True
    )
    parallel = ParallelSetup(zero_stage=2, offload="optimizer")
    est, per_token = _estimate(spec, setup, parallel, "v100-32gb")
    tflops = per_token * est.step.tokens_per_step / est.step.step_s / 1e12
    assert 40 / 2 <= tflops <= 40 * 2, f"memplan {tflops:.1f} TFLOPS"
    assert est.step.cpu_optimizer_s > 0
    assert est.step.host_transfer_s > 0


def test_cpu_adam_step_of_a_72b_model_on_four_a100_nodes() -> None:
    """DeepSpeed issue #6834 (2024-12): Qwen-72B, ZeRO-3 with optimizer and parameters offloaded,
    4 nodes of 8 A100-80GB, about 8192 tokens per batch; a maintainer reads the optimizer step as
    "~10s" with offload (vs ~0.2 s without). memplan: each node's CPU steps 8/32 of the
    parameters at CPU_ADAM_PARAMS_PER_S, 12.8 s (1.3x); within a factor of 2."""
    setup = TrainingSetup(method="full", precision="bf16", seq_len=8192)
    parallel = ParallelSetup(num_gpus=32, zero_stage=3, offload="optimizer+params")
    est, _ = _estimate("qwen2.5-72b", setup, parallel, "a100-80gb-sxm")
    assert 10 / 2 <= est.step.cpu_optimizer_s <= 10 * 2

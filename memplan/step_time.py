"""Time of one training step on a data-parallel layout, and of a job of N tokens: an estimate.

Each term is one mechanism, charged per device per optimizer step (``grad_accum_steps``
micro-batches of ``micro_batch_size`` sequences on each of N devices):

1. **compute**: the step's FLOPs (:mod:`memplan.throughput`) at ``UTILISATION_FRACTION`` of the
   device's dense 16-bit peak;
2. **collectives** over the device link of the profile's node (NVLink/NVSwitch, Infinity Fabric,
   ICI, RoCE, or PCIe for cards without one), and over the node's network once the run spans
   nodes (:meth:`memplan.hardware.Node.collective_bytes_per_s`). Ring algorithms move, per device,
   (N-1)/N of the data for an all-gather or a reduce-scatter and 2(N-1)/N for an all-reduce
   (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication operations in
   MPICH"; NCCL's bus bandwidth, nccl-tests doc/PERFORMANCE.md). What each layout sends follows
   ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054, section 7: 2x the parameters for data
   parallelism and ZeRO-1/2, 3x for ZeRO-3) and the FSDP paper (Zhao et al. 2023,
   arXiv:2304.11277: all-gather before forward and before backward, reduce-scatter
   after backward);
3. **host transfers** over the device's host link for CPU offload: ZeRO-Offload sends the 16-bit
   gradients to the CPU and the updated 16-bit parameters back, 4x the parameters in bytes for one
   GPU (Ren et al. 2021, arXiv:2101.06840), each device its own partition; with
   parameters offloaded as well (ZeRO-Infinity, Rajbhandari et al. 2021, arXiv:2104.07857) each
   device fetches its parameter partition from host memory before the forward and again before
   the backward all-gather;
4. **CPU optimizer**: the host's DeepSpeedCPUAdam updates the partitions of every device in its
   node at ``CPU_ADAM_PARAMS_PER_S``.

Overlap is charged as each stack schedules it, and nowhere else:

- PyTorch FSDP issues all-gathers and reduce-scatters on their own CUDA streams, overlapping
  compute (FSDP paper); DeepSpeed ZeRO-3 overlaps too (``overlap_comm`` defaults to
  true at stage 3, ``deepspeed/runtime/zero/config.py``, with parameter prefetch). A forward or
  backward pass then takes max(compute, communication), its host transfers included;
- DDP all-reduces gradient buckets while backward runs (Li et al. 2020, arXiv:2006.15704):
  the once-per-step all-reduce overlaps the last micro-batch's backward;
- DeepSpeed ZeRO-1/2 leave ``overlap_comm`` off by default: their collectives and gradient copies
  to the host add to compute;
- the CPU optimizer step and the copy of updated parameters back to the devices sit between the
  last backward and the next forward (DeepSpeed does not delay the parameter update): they add.

Not charged: the GPU optimizer step (memory-bound, small next to compute), paging of paged
optimizer state, dequantization of 4-bit weights (not in the FLOPs), stragglers, data loading,
and latency of small messages; bandwidths are link peaks, which NCCL and PCIe reach only in
part. Tensor parallelism is not modelled (recommend searches data-parallel layouts only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from memplan.analytic.predict import Prediction
from memplan.hardware import HardwareProfile
from memplan.specs.parallel import Offload, ParallelSetup, Sharding
from memplan.specs.training import TrainingSetup
from memplan.throughput import UTILISATION_FRACTION, FlopsPerToken
from memplan.trace import Category
from memplan.units import TB

# DeepSpeedCPUAdam throughput, one node's CPU: 11.6e9 parameters stepped in 8.2 s (GPT-2 11.6B,
# Adam step with DeepSpeedCPUAdam, down from 56 s with torch.optim.Adam; measured by an author of
# ZeRO-Offload, DeepSpeed PR #735, 2021-02-08; the PR does not name the host CPU). DeepSpeed's
# features page states 5.1x-6.5x over PyTorch's CPU Adam for 1B-10B parameters (PR #378), the
# speed-up ZeRO-Offload (arXiv:2101.06840) builds on. Hosts differ widely: a desktop-class CPU is
# far slower (DeepSpeed issue #1635: 1.35B parameters in 22.9 s on a 10-core Xeon Silver 4210R).
_CPU_ADAM_PARAMS: Final = 11_600_000_000
_CPU_ADAM_SECONDS: Final = 8.2
CPU_ADAM_PARAMS_PER_S: Final = _CPU_ADAM_PARAMS / _CPU_ADAM_SECONDS
_TERA: Final = TB  # TFLOP/s -> FLOP/s
_SECONDS_PER_HOUR: Final = 3600
_MILLION: Final = 1_000_000
_WEIGHTS: Final = (Category.FROZEN_WEIGHTS, Category.QUANT_STATE, Category.TRAINABLE_WEIGHTS)

Bound = Literal["compute", "collectives", "host link", "CPU optimizer"]


@dataclass(frozen=True, slots=True)
class ModelBytes:
    """What a layout moves: the whole model's weights as stored on a device (gathered under
    ZeRO-3/FSDP), its trainable weights (their gradients have the same dtype and size), and the
    number of trainable parameters the optimizer steps."""

    weight_bytes: int
    trainable_bytes: int
    num_trainable_params: int


def model_bytes(prediction: Prediction) -> ModelBytes:
    """The unsharded weight and gradient bytes behind one device's prediction (its share of a
    sharded weight times the shard count)."""
    divisor = prediction.shard.weight_divisor
    weights = trainable = 0
    for group in prediction.state.groups:
        if group.category in _WEIGHTS:
            size = group.nbytes * group.count * divisor
            weights += size
            if group.category is Category.TRAINABLE_WEIGHTS:
                trainable += size
    return ModelBytes(weights, trainable, prediction.state.num_trainable_params)


class StepTime(BaseModel):
    """One optimizer step on one device, by mechanism (seconds), and what it adds up to."""

    model_config = ConfigDict(frozen=True)

    compute_s: float = Field(description="FLOPs of all micro-batches at the utilisation fraction.")
    collective_s: float = Field(description="All-gathers, reduce-scatters, all-reduces.")
    host_transfer_s: float = Field(description="Offload traffic over the host link.")
    cpu_optimizer_s: float = Field(description="DeepSpeedCPUAdam step of this node's partitions.")
    step_s: float = Field(description="The step, after the overlap each stack schedules.")
    tokens_per_step: int = Field(description="Tokens of one optimizer step, all devices.")
    bound: Bound = Field(description="The largest of the four terms.")


@dataclass(frozen=True, slots=True)
class _Pass:
    compute_s: float
    device_link_s: float = 0.0
    host_link_s: float = 0.0

    def time(self, *, overlap: bool) -> float:
        comm = self.device_link_s + self.host_link_s
        return max(self.compute_s, comm) if overlap else self.compute_s + comm


def _ring(num_devices: int) -> float:
    """Share of the data one device sends in a ring all-gather or reduce-scatter."""
    return (num_devices - 1) / num_devices


def step_time(
    flops: FlopsPerToken,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    moved: ModelBytes,
    profile: HardwareProfile,
    peak_tflops: float,
) -> StepTime:
    """One optimizer step of ``setup`` on ``parallel`` devices of ``profile`` (see the module
    docstring for each term and its overlap)."""
    n = parallel.data_parallel_degree
    node = profile.node
    link = node.collective_bytes_per_s(n) if n > 1 else None
    host = node.host_link_bytes_per_s
    ring = _ring(n)
    params, grads = moved.weight_bytes, moved.trainable_bytes

    def over_link(num_bytes: float) -> float:
        if num_bytes == 0:
            return 0.0
        if link is None:
            raise ValueError(f"{profile.name}: {n} devices cannot be joined (node has no link)")
        return num_bytes / link

    def over_host(num_bytes: float) -> float:
        if num_bytes == 0:
            return 0.0
        if host is None:
            raise ValueError(f"{profile.name}: no host link to offload over")
        return num_bytes / host

    tokens = setup.micro_batch_size * setup.seq_len
    rate = peak_tflops * _TERA * UTILISATION_FRACTION
    forward_s = flops.forward * tokens / rate
    backward_s = (flops.backward + flops.recompute) * tokens / rate
    micro = setup.grad_accum_steps
    stage, fsdp = parallel.zero_stage, parallel.sharding is Sharding.FSDP
    offload_params = parallel.offload is Offload.OPTIMIZER_AND_PARAMS
    offload = parallel.offload is not Offload.NONE
    overlap = stage == 3 or (fsdp and stage >= 2)

    fwd = _Pass(forward_s)
    bwd = bwd_last = _Pass(backward_s)
    after_step: list[_Pass] = []  # collectives and transfers between backward and forward
    exposed_allreduce = 0.0
    if stage == 3 or (fsdp and stage == 2):
        fwd = _Pass(forward_s, over_link(ring * params), over_host(params / n * offload_params))
    if stage == 3:
        gather_again = ring * params
        scatter = ring * grads
        to_host = over_host(grads / n * offload) + over_host(params / n * offload_params)
        if fsdp:  # no_sync: only the last micro-batch reduce-scatters
            bwd = _Pass(backward_s, over_link(gather_again))
            bwd_last = _Pass(backward_s, over_link(gather_again + scatter))
        else:  # DeepSpeed partitions gradients as each micro-batch's backward produces them
            bwd = bwd_last = _Pass(backward_s, over_link(gather_again + scatter), to_host)
    elif fsdp and stage == 2:
        bwd_last = _Pass(backward_s, over_link(ring * grads))
    elif stage == 2:  # DeepSpeed ZeRO-2: reduce-scatter (and copy to the host) every micro-batch
        bwd = bwd_last = _Pass(backward_s, over_link(ring * grads), over_host(grads / n * offload))
        after_step.append(_Pass(0.0, over_link(ring * grads)))  # all-gather updated weights
    elif stage == 1:
        after_step.append(_Pass(0.0, over_link(2 * ring * grads)))  # reduce-scatter + all-gather
    elif n > 1:  # DDP: one all-reduce of the accumulated gradients, during the last backward
        exposed_allreduce = max(0.0, over_link(2 * ring * grads) - backward_s)

    cpu_s = 0.0
    if offload:
        node_params = moved.num_trainable_params / n * node.devices_per_node(n)
        cpu_s = node_params / CPU_ADAM_PARAMS_PER_S
        if not offload_params:  # updated 16-bit partition back to the device
            after_step.append(_Pass(0.0, 0.0, over_host(grads / n)))

    passes = [fwd, bwd] * (micro - 1) + [fwd, bwd_last]
    step_s = sum(p.time(overlap=overlap) for p in passes)
    step_s += sum(p.time(overlap=False) for p in after_step) + exposed_allreduce + cpu_s
    everything = passes + after_step
    collective_s = sum(p.device_link_s for p in everything)
    if stage == 0 and n > 1:
        collective_s += over_link(2 * ring * grads)
    terms: dict[Bound, float] = {
        "compute": micro * (forward_s + backward_s),
        "collectives": collective_s,
        "host link": sum(p.host_link_s for p in everything),
        "CPU optimizer": cpu_s,
    }
    return StepTime(
        compute_s=terms["compute"],
        collective_s=terms["collectives"],
        host_transfer_s=terms["host link"],
        cpu_optimizer_s=cpu_s,
        step_s=step_s,
        tokens_per_step=tokens * micro * n,
        bound=max(terms, key=lambda k: terms[k]),
    )


class TimeEstimate(BaseModel):
    """Throughput, time and cost of a layout on one accelerator (an estimate; see module doc)."""

    model_config = ConfigDict(frozen=True)

    num_devices: int
    dtype: str = Field(description="16-bit format used: bf16, or fp16 where bf16 is missing.")
    peak_tflops: float = Field(description="Dense peak of one device in that format (profile).")
    utilisation_fraction: float
    step: StepTime
    tokens_per_second: float = Field(description="tokens_per_step / step_s, all devices.")
    usd_per_hour: float | None = Field(description="num_devices x cheapest $/GPU-hour.")
    usd_per_million_tokens: float | None = Field(
        description="usd_per_hour / tokens per hour x 1e6 (orders layouts as job cost does)."
    )
    tokens: int | None = Field(default=None, description="Training tokens of the job, if given.")
    hours: float | None = Field(default=None, description="tokens / tokens_per_second / 3600.")
    cost_usd: float | None = Field(default=None, description="hours x usd_per_hour.")


def time_estimate(
    flops: FlopsPerToken,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    moved: ModelBytes,
    profile: HardwareProfile,
    dtype: str,
    tokens: int | None = None,
) -> TimeEstimate | None:
    """Throughput and (with ``tokens``) time and cost; None without a published peak."""
    peak = profile.bf16_tflops if dtype == "bf16" else profile.fp16_tflops
    if peak is None:
        return None
    step = step_time(flops, setup, parallel, moved, profile, peak)
    per_second = step.tokens_per_step / step.step_s
    price = profile.cheapest_usd_per_gpu_hour
    usd_per_hour = None if price is None else parallel.num_gpus * price
    per_million = None
    if usd_per_hour is not None:
        per_million = usd_per_hour / (per_second * _SECONDS_PER_HOUR) * _MILLION
    hours = None if tokens is None else tokens / per_second / _SECONDS_PER_HOUR
    return TimeEstimate(
        num_devices=parallel.num_gpus,
        dtype=dtype,
        peak_tflops=peak,
        utilisation_fraction=UTILISATION_FRACTION,
        step=step,
        tokens_per_second=per_second,
        usd_per_hour=usd_per_hour,
        usd_per_million_tokens=per_million,
        tokens=tokens,
        hours=hours,
        cost_usd=None if hours is None or usd_per_hour is None else hours * usd_per_hour,
    )

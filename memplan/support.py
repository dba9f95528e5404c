"""Which accelerators can run a setup on a layout: the software each needs, checked against the
profile's ``software`` (each feature with its source), and the machine it needs, checked against
the profile's ``node``.

A setup needs bitsandbytes for 4-bit or 8-bit base weights and for its optimizers (8-bit,
paged, Lion: memplan models the bitsandbytes implementations), flash-attn for
``attention="flash"``; a layout needs DeepSpeed for ZeRO (and its CPU offload), PyTorch FSDP for
SHARD_GRAD_OP / FULL_SHARD. Plain data parallelism and a single device need neither.
"""

from __future__ import annotations

from typing import Final

from memplan.dtypes import Quantization
from memplan.hardware import HardwareProfile, SoftwareFeature
from memplan.specs.parallel import Offload, ParallelSetup, Sharding
from memplan.specs.training import Attention, Optimizer, TrainingSetup

# bitsandbytes optimizers memplan models (memplan.analytic.optimizer): bnb.optim.AdamW8bit,
# PagedAdamW32bit, PagedAdamW8bit, Lion32bit.
_BNB_OPTIMIZERS: Final = (
    Optimizer.ADAMW_8BIT,
    Optimizer.PAGED_ADAMW,
    Optimizer.PAGED_ADAMW_8BIT,
    Optimizer.LION,
)
_PAGED: Final = (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT)


def setup_needs(setup: TrainingSetup) -> tuple[SoftwareFeature, ...]:
    """Software features ``setup`` needs on any layout.

    >>> setup_needs(TrainingSetup(method="qlora"))
    ('bitsandbytes-4bit', 'bitsandbytes-optimizers', 'bitsandbytes-paged')
    """
    needs: list[SoftwareFeature] = []
    if setup.quant in (Quantization.NF4, Quantization.FP4):
        needs.append("bitsandbytes-4bit")
    if setup.quant is Quantization.INT8:
        needs.append("bitsandbytes-int8")
    if setup.trains_weights and setup.optimizer in _BNB_OPTIMIZERS:
        needs.append("bitsandbytes-optimizers")
        if setup.optimizer in _PAGED:
            needs.append("bitsandbytes-paged")
    if setup.attention is Attention.FLASH:
        needs.append("flash-attn")
    return tuple(needs)


def layout_needs(parallel: ParallelSetup) -> tuple[SoftwareFeature, ...]:
    """Software features the layout ``parallel`` needs (plain data parallelism: none)."""
    if parallel.uses_deepspeed:
        offload = parallel.offload is not Offload.NONE
        return ("deepspeed", "deepspeed-offload") if offload else ("deepspeed",)
    if parallel.sharding is Sharding.FSDP and parallel.zero_stage >= 2:
        return ("fsdp",)
    return ()


def missing(profile: HardwareProfile, needs: tuple[SoftwareFeature, ...]) -> dict[str, str]:
    """The features of ``needs`` that ``profile`` lacks, each with the source that says so."""
    return {f: profile.software[f].source for f in needs if not profile.supports(f)}


def machine_fits(profile: HardwareProfile, parallel: ParallelSetup, host_bytes: int) -> bool:
    """Whether the profile's machines can hold the layout: its devices can be joined (one node,
    or nodes with a network) and, when it offloads, ``host_bytes`` per device times the devices
    sharing a node fit the node's host memory (unpublished host memory: no offload)."""
    node = profile.node
    if not node.spans(parallel.num_gpus):
        return False
    if parallel.offload is Offload.NONE:
        return True
    if node.host_memory_bytes is None or node.host_link_bytes_per_s is None:
        return False
    return host_bytes * node.devices_per_node(parallel.num_gpus) <= node.host_memory_bytes

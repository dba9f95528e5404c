"""One rank of an FSDP2 run on one machine: torch's fake process group and ``fully_shard``.

torch ships a process group for tests whose collectives return at once without moving data
(``torch.testing._internal.distributed.fake_pg``; PyTorch's FSDP memory tracker tests run
``fully_shard`` on it). Every rank of an FSDP run holds the same shapes (each parameter is
padded to a multiple of the world size on dim 0), so rank 0's trace is every rank's.

The model is sharded as accelerate's FSDP2 path shards it (``accelerate/utils/fsdp_utils.py``
``fsdp2_prepare_model``, fsdp_version 2 with the transformer-layer wrap policy): each decoder
layer is a unit; the input embedding another (unless tied to the LM head); the final norm and
the LM head (with a tied embedding) one more, kept unsharded from the end of the forward to the
start of the backward (``reshard_after_forward=False``); the root last (what is left: rotary
buffers). ``reshard_after_forward`` of the other units is True for FULL_SHARD and False for
SHARD_GRAD_OP. Under an AMP precision accelerate upcasts trainable parameters to fp32 and sets
``MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=bf16/fp16)``
(``FullyShardedDataParallelPlugin.set_mixed_precision``): parameters are all-gathered and
gradients reduce-scattered in 16 bits, and the fp32 sharded parameters are what the optimizer
steps. A 16-bit model runs with the default policy (no casts).

Parameters are sharded on the meta device and then given storage (``to_empty``, as
accelerate's ``cpu_ram_efficient_loading`` shards before loading), so no rank ever holds the
whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memplan.dtypes import Quantization
from memplan.errors import MemplanError
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.specs.parallel import FSDPStrategy
from memplan.torchsim.models import COMPUTE_DTYPES, decoder_layer_stacks
from memplan.torchsim.tracker import MemoryTracker


def check_shardable(setup: TrainingSetup) -> None:
    """Raise MemplanError for a setup whose model ``fully_shard`` cannot shard here.

    peft's FSDP-QLoRA stores each 4-bit weight in a float ``bnb_4bit_quant_storage`` (bf16)
    so that FSDP flattens and all-gathers it like any parameter; the tracer's 4-bit layers
    (:mod:`memplan.torchsim.quant`) keep bitsandbytes' uint8 packing, and its bitsandbytes
    optimizers are custom ops with no DTensor sharding rule.
    """
    if setup.quant is not Quantization.NONE:
        raise MemplanError(
            f"simulate traces FSDP2 without quantization, not quant={setup.quant.value}: the "
            "tracer's 4-bit layers keep uint8 packed weights, not a bf16 quant_storage "
            "fully_shard can shard (memplan plan covers it)"
        )


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[Any]:
    """A fake process group of ``world_size`` ranks for the duration; yields its 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def mixed_precision_policy(setup: TrainingSetup) -> Any:
    """accelerate's policy: 16-bit all-gather and reduce-scatter under AMP, else no casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not setup.precision.is_amp:
        return MixedPrecisionPolicy()
    half = COMPUTE_DTYPES[setup.precision]
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=half)


def shard_model(model: nn.Module, setup: TrainingSetup, parallel: ParallelSetup, mesh: Any) -> None:
    """Apply ``fully_shard`` to ``model`` (on the meta device) unit by unit, as accelerate."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    reshard = parallel.fsdp_strategy is not FSDPStrategy.SHARD_GRAD_OP
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mixed_precision_policy(setup)}
    if setup.precision.is_amp:  # fsdp2_prepare_model: "upcast ... to fp32 master weights"
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    for stack in decoder_layer_stacks(model):
        for layer in stack:
            fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    embed = _input_embeddings(model)
    head = _output_embeddings(model)
    tied = embed is not None and head is not None and embed.weight is head.weight
    if embed is not None and not tied:
        fully_shard(embed, reshard_after_forward=reshard, **kwargs)
    tail = [m for m in (_final_norm(model), embed if tied else None, head) if m is not None]
    if tail:
        fully_shard(tail, reshard_after_forward=False, **kwargs)
    if not isinstance(model, FSDPModule):
        fully_shard(model, **kwargs)  # the root: reshard_after_forward=None resolves to False


def _base(model: nn.Module) -> Any:
    unwrap: Any = getattr(model, "get_base_model", None)  # peft
    return unwrap() if callable(unwrap) else model


def _input_embeddings(model: nn.Module) -> Any:
    get = getattr(_base(model), "get_input_embeddings", None)
    return get() if callable(get) else None


def _output_embeddings(model: nn.Module) -> Any:
    get = getattr(_base(model), "get_output_embeddings", None)
    return get() if callable(get) else None


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The decoder's final norm (accelerate's ``_find_final_norm``: ``model.norm`` and kin)."""
    inner = getattr(_base(model), "model", None) or getattr(_base(model), "transformer", None)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def materialize_sharded(model: nn.Module) -> None:
    """Give each rank's parameter shards (padded on dim 0) and the buffers storage, one FSDP
    unit at a time (``FSDPModule._apply`` re-pads its shards as each unit is done)."""
    model.to_empty(device="cpu")


@contextlib.contextmanager
def reporting_resizes(tracker: MemoryTracker) -> Iterator[None]:
    """Tell ``tracker`` when FSDP2 allocates or frees an unsharded parameter in place.

    FSDP2 keeps each unsharded parameter's storage and resizes it to 0 after resharding and
    back before the next all-gather (``_fsdp_param.py`` ``alloc_storage``/``free_storage``):
    no aten op reports that, so the two functions are wrapped for the duration.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    original_alloc, original_free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def alloc(tensor: torch.Tensor) -> None:
        original_alloc(tensor)
        tracker.resized(tensor, "all-gather output")
        tracker.mark_gathered(tensor)

    def free(tensor: torch.Tensor) -> None:
        original_free(tensor)
        tracker.resized(tensor, "reshard")

    modules = (_fsdp_param, _fsdp_param_group)
    saved = [(m, m.__dict__.get("alloc_storage"), m.__dict__.get("free_storage")) for m in modules]
    for module in modules:
        if "alloc_storage" in module.__dict__:
            module.alloc_storage = alloc  # type: ignore[attr-defined]
        if "free_storage" in module.__dict__:
            module.free_storage = free  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, alloc_fn, free_fn in saved:
            if alloc_fn is not None:
                module.alloc_storage = alloc_fn  # type: ignore[attr-defined]
            if free_fn is not None:
                module.free_storage = free_fn  # type: ignore[attr-defined]

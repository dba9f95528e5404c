"""Measure real training steps on a CUDA device (extras ``torch``, ``hf``, ``quant``, ``gpu``).

The model is built from its config with random weights straight on the device in the requested
dtype (no hub): on the meta device first, then every parameter materialized on the GPU; for
QLoRA each linear is created in 16-bit on the GPU and packed to NF4 by bitsandbytes at once,
so a 65B model never exists in 16-bit. The method is applied as in training (peft LoRA,
bitsandbytes 4-bit/8-bit), then a warm-up step and N measured steps run on random tokens. At
every phase boundary the allocator's counters (peaks reset per phase) and NVML's device
memory are recorded. An out-of-memory error is a result, not a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memplan import __version__
from memplan.catalog import load_model
from memplan.errors import MemplanError
from memplan.loop import TrainingLoop
from memplan.measure.records import Environment, MeasuredRun, OutOfMemory, PhaseSample
from memplan.specs import (
    ModelSpec,
    Offload,
    Optimizer,
    ParallelSetup,
    Sharding,
    TrainingSetup,
)
from memplan.torchsim.materialize import materialize
from memplan.torchsim.methods import (
    QuantizedLinearFactory,
    apply_method,
    prepare_for_kbit_training,
    quantize_linears,
)
from memplan.torchsim.models import COMPUTE_DTYPES, BuiltModel, build_meta_model, load_dtype
from memplan.torchsim.optimizers import LEARNING_RATE, param_groups, torch_optimizer
from memplan.torchsim.runner import third_party_warnings_muted
from memplan.torchsim.session import enable_checkpointing, forward_loss, synthetic_batch
from memplan.units import GiB, KiB, MiB

_OOM_REQUEST = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)")
_UNITS = {"GiB": GiB, "MiB": MiB, "KiB": KiB, "B": 1}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def nvml_used() -> Callable[[], int] | None:
    """A reader of NVML's used bytes for device 0, or None without pynvml."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        # NVML numbers devices physically; asking torch would initialise CUDA (and its context)
        # before the baseline is read.
        handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index())
    except pynvml.NVMLError:
        return None
    return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _physical_index() -> int:
    """NVML index of this rank's GPU: cuda:LOCAL_RANK, through CUDA_VISIBLE_DEVICES if set."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return local
    entries = [e.strip() for e in visible.split(",")]
    entry = entries[local] if local < len(entries) else ""
    return int(entry) if entry.isdigit() else local


def environment(device: str) -> Environment:
    driver = None
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        driver = str(pynvml.nvmlSystemGetDriverVersion())
    cuda = device == "cuda"
    return Environment(
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        total_memory_bytes=torch.cuda.get_device_properties(
            torch.cuda.current_device()
        ).total_memory
        if cuda
        else 0,
        driver=driver,
        cuda=torch.version.cuda,
        torch=torch.__version__,
        transformers=_version("transformers"),
        peft=_version("peft"),
        bitsandbytes=_version("bitsandbytes"),
        python=platform.python_version(),
        memplan=__version__,
    )


def cuda_context_bytes(used: Callable[[], int] | None) -> tuple[int | None, int | None]:
    """(NVML used before CUDA init, context bytes): init CUDA and cuBLAS with one matmul."""
    before = used() if used is not None else None
    a = torch.ones(64, 64, device="cuda")
    (a @ a).sum().item()
    torch.cuda.synchronize()
    if before is None or used is None:
        return None, None
    del a
    torch.cuda.empty_cache()
    return before, used() - before - torch.cuda.memory_reserved()


# -- building ---------------------------------------------------------------------------------

# The model ready to step, its optimizer (None when nothing trains), and how it was built.
Prepared = tuple[nn.Module, torch.optim.Optimizer | None, BuiltModel]


def _bnb() -> Any:
    """bitsandbytes, imported on first use (it ships no type information)."""
    return importlib.import_module("bitsandbytes")


def _bnb_linear_factory(setup: TrainingSetup) -> QuantizedLinearFactory:
    """bitsandbytes' own layers, as transformers' load_in_4bit / load_in_8bit puts them."""
    bnb = _bnb()
    compute = COMPUTE_DTYPES[setup.precision]

    def make(in_f: int, out_f: int, bias: bool, weight_dtype: torch.dtype) -> nn.Module:
        layer: nn.Module
        if setup.quant.value == "int8":
            layer = bnb.nn.Linear8bitLt(
                in_f, out_f, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta"
            )
        else:
            layer = bnb.nn.Linear4bit(
                in_f,
                out_f,
                bias=bias,
                compute_dtype=compute,
                compress_statistics=setup.double_quant,
                quant_type=setup.quant.value,
                device="meta",
            )
        return layer

    return make


def _quantized_materializer(device: str, weight_dtype: torch.dtype) -> Callable[[nn.Module], bool]:
    """Takes over bitsandbytes' layers in ``materialize``: the 16-bit weight is created on the
    device and bitsandbytes packs it there (Params4bit / Int8Params quantize on ``.to``)."""
    bnb = _bnb()

    def take(module: nn.Module) -> bool:
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            return False
        shape = (module.out_features, module.in_features)
        weight = torch.empty(shape, dtype=weight_dtype, device=device).normal_(0.0, 0.02)
        if isinstance(module, bnb.nn.Linear4bit):
            old = module.weight
            packed = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
            )
        else:
            packed = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        module.weight = packed.to(device)
        del weight
        if module.bias is not None:
            bias = torch.zeros(module.out_features, dtype=weight_dtype, device=device)
            module.bias = nn.Parameter(bias, requires_grad=False)
        return True

    return take


def build(spec: ModelSpec, setup: TrainingSetup, device: str) -> tuple[nn.Module, BuiltModel]:
    """The model with the method applied, materialized on ``device``."""
    with third_party_warnings_muted():
        return _build(spec, setup, device)


def _build(spec: ModelSpec, setup: TrainingSetup, device: str) -> tuple[nn.Module, BuiltModel]:
    built = build_meta_model(spec, setup)
    if setup.quant.value != "none":
        # bitsandbytes quantizes real weights, so the model is materialized before the method
        # adds its tensors.
        quantize_linears(built.model, setup, _bnb_linear_factory(setup))
        built.model.requires_grad_(False)
        # The weights are quantized from the dtype the model is loaded in (QuantState.dtype).
        take = _quantized_materializer(device, load_dtype(setup))
        materialize(built.model, fill=True, device=device, materialize_module=take)
        if setup.kbit_prep:  # on the loaded model, as the recipe calls it
            prepare_for_kbit_training(built.model)
        model = setup.tuning.apply(built, spec, setup)
    else:
        model = apply_method(built, spec, setup)
        materialize(model, fill=True, device=device)
    model.train()
    trains = any(p.requires_grad for p in model.parameters())
    if setup.grad_ckpt and trains:
        enable_checkpointing(model, built, setup.grad_ckpt_every)
    return model, built


def build_optimizer(
    model: nn.Module, setup: TrainingSetup, notes: list[str]
) -> torch.optim.Optimizer | None:
    """The optimizer Trainer would build, with bitsandbytes for the 8-bit/paged/Lion ones."""
    groups = param_groups(model)
    if not any(g["params"] for g in groups):
        return None
    optimizer = torch_optimizer(groups, setup, notes)
    if optimizer is not None:
        return optimizer
    bnb = _bnb()
    classes = {
        Optimizer.ADAMW_8BIT: bnb.optim.AdamW8bit,
        Optimizer.PAGED_ADAMW: bnb.optim.PagedAdamW,
        Optimizer.PAGED_ADAMW_8BIT: bnb.optim.PagedAdamW8bit,
        Optimizer.LION: bnb.optim.Lion,
    }
    bnb_optimizer: torch.optim.Optimizer = classes[setup.optimizer](groups, lr=LEARNING_RATE)
    return bnb_optimizer


# -- running ----------------------------------------------------------------------------------


class Probe:
    """Reads the allocator counters at phase ends; resets the peaks for the next phase."""

    def __init__(self, device: str, used: Callable[[], int] | None) -> None:
        self.cuda = device == "cuda"
        self.used = used
        self.samples: list[PhaseSample] = []

    def sample(self, step: int, phase: str, micro_batch: int = 0) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            stats = (
                torch.cuda.memory_allocated(),
                torch.cuda.max_memory_allocated(),
                torch.cuda.memory_reserved(),
                torch.cuda.max_memory_reserved(),
            )
            torch.cuda.reset_peak_memory_stats()
        else:
            stats = (0, 0, 0, 0)
        nvml = self.used() if self.used is not None else None
        self.samples.append(
            PhaseSample(
                step=step,
                micro_batch=micro_batch,
                phase=phase,
                allocated_bytes=stats[0],
                max_allocated_bytes=stats[1],
                reserved_bytes=stats[2],
                max_reserved_bytes=stats[3],
                nvml_used_bytes=nvml,
            )
        )


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    built: BuiltModel,
    setup: TrainingSetup,
    device: str,
    probe: Probe,
    step: int,
    where: list[str],
    accelerator: Any = None,
) -> None:
    """One optimizer step of :class:`memplan.loop.TrainingLoop`, sampled at every phase end."""
    trains = optimizer is not None
    loop = TrainingLoop.of(setup)
    for micro in range(loop.micro_batches):
        where[0] = "forward"
        batch = synthetic_batch(
            model, setup, encoder_decoder=built.is_encoder_decoder, device=device
        )
        loss = forward_loss(
            model,
            setup,
            batch,
            trains=trains,
            is_hf=built.is_hf,
            device=device,
            # Under accelerate, prepare() wrapped the forward in autocast already.
            autocast=accelerator is None,
        )
        loss = loss / loop.micro_batches  # Trainer scales each micro-batch's loss
        probe.sample(step, "forward", micro)
        if trains:
            where[0] = "backward"
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()  # type: ignore[no-untyped-call]
            probe.sample(step, "backward", micro)
        del loss, batch
    if optimizer is None:
        return
    where[0] = "optimizer"
    optimizer.step()
    probe.sample(step, "optimizer")
    where[0] = "zero_grad"
    optimizer.zero_grad(set_to_none=True)
    probe.sample(step, "zero_grad")


def _oom(exc: BaseException, step: int, phase: str) -> OutOfMemory:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    match = _OOM_REQUEST.search(str(exc))
    requested = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None
    return OutOfMemory(step=step, phase=phase, requested_bytes=requested, message=text[:300])


def run(
    spec: ModelSpec,
    setup: TrainingSetup,
    *,
    model_name: str | None = None,
    device: str = "cuda",
    steps: int = 2,
    warmup: int = 1,
    used: Callable[[], int] | None = None,
    memory_fraction: float | None = None,
    context_bytes: int | None = None,
    label: str = "",
) -> MeasuredRun:
    """Build, warm up and measure ``steps`` steps of ``setup`` on ``spec``."""
    start = time.perf_counter()
    probe = Probe(device, used)
    notes: list[str] = []

    def prepare() -> Prepared:
        model, built = build(spec, setup, device)
        notes.extend(built.notes)
        return model, build_optimizer(model, setup, notes), built

    with _fresh(device, memory_fraction), third_party_warnings_muted():
        at_start = torch.cuda.memory_allocated() if device == "cuda" else 0
        oom = _run_steps(prepare, setup, device, probe, steps, warmup)
    return _measured(
        model_name or spec.name,
        setup,
        ParallelSetup(),
        device=device,
        probe=probe,
        oom=oom,
        at_start_bytes=at_start,
        start=start,
        notes=notes,
        label=label,
        context_bytes=context_bytes,
        memory_fraction=memory_fraction,
    )


def _measured(
    model: str,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    *,
    device: str,
    probe: Probe,
    oom: OutOfMemory | None,
    at_start_bytes: int,
    start: float,
    notes: list[str],
    label: str,
    context_bytes: int | None,
    memory_fraction: float | None = None,
    rank: int = 0,
) -> MeasuredRun:
    return MeasuredRun(
        model=model,
        setup=setup.model_dump(mode="json"),
        parallel=parallel.model_dump(mode="json"),
        rank=rank,
        environment=environment(device),
        cuda_context_bytes=context_bytes,
        memory_fraction=memory_fraction,
        allocated_at_start_bytes=at_start_bytes,
        samples=probe.samples,
        oom=oom,
        wall_time_s=time.perf_counter() - start,
        notes=notes,
        label=label,
    )


def _run_steps(
    prepare: Callable[[], Prepared],
    setup: TrainingSetup,
    device: str,
    probe: Probe,
    steps: int,
    warmup: int,
    accelerator: Any = None,
) -> OutOfMemory | None:
    """Prepare the model, then warm-up and measured steps; an OOM ends them and is returned."""
    where = ["load"]
    step = -warmup
    model = optimizer = None
    try:
        model, optimizer, built = prepare()
        probe.sample(-warmup, "load")
        for step in range(-warmup, steps):
            _step(model, optimizer, built, setup, device, probe, step, where, accelerator)
    except torch.cuda.OutOfMemoryError as exc:
        return _oom(exc, step, where[0])
    finally:
        del model, optimizer
    return None


def _accelerator(setup: TrainingSetup, parallel: ParallelSetup) -> Any:
    """An accelerate Accelerator configured for the layout (DeepSpeed ZeRO, FSDP or plain DDP)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    if parallel.tensor_parallel_degree > 1:
        raise MemplanError("measure: tensor parallelism is not measured (use --tp 1)")
    # AMP precisions autocast in accelerate; pure 16-bit runs keep the weights' own dtype.
    mixed = {"bf16-amp": "bf16", "fp16-amp": "fp16"}.get(setup.precision.value, "no")
    kwargs: dict[str, Any] = {}
    offload_params = parallel.offload is Offload.OPTIMIZER_AND_PARAMS
    if parallel.sharding is Sharding.FSDP and parallel.zero_stage:
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            # FULL_SHARD (~ZeRO-3) frees gathered parameters after forward; SHARD_GRAD_OP keeps.
            reshard_after_forward=parallel.zero_stage == 3,
            cpu_offload=offload_params,
        )
    elif parallel.zero_stage:
        offload_optimizer = parallel.offload is not Offload.NONE
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=parallel.zero_stage,
            gradient_accumulation_steps=setup.grad_accum_steps,
            offload_optimizer_device="cpu" if offload_optimizer else "none",
            offload_param_device="cpu" if offload_params else "none",
        )
    return Accelerator(
        mixed_precision=mixed, gradient_accumulation_steps=setup.grad_accum_steps, **kwargs
    )


def run_sharded(
    spec: ModelSpec,
    setup: TrainingSetup,
    parallel: ParallelSetup,
    *,
    model_name: str | None = None,
    steps: int = 2,
    warmup: int = 1,
    used: Callable[[], int] | None = None,
    context_bytes: int | None = None,
    label: str = "",
) -> MeasuredRun:
    """One rank of a multi-GPU run under ``accelerate launch``: the model is built on the host,
    ``Accelerator.prepare`` shards it onto this rank's GPU, and the step runs as in ``run``."""
    start = time.perf_counter()
    accelerator = _accelerator(setup, parallel)
    probe = Probe("cuda", used)
    notes: list[str] = []

    def prepare() -> Prepared:
        model, built = build(spec, setup, "cpu")
        notes.extend(built.notes)
        wrapped, optimizer = accelerator.prepare(model, build_optimizer(model, setup, notes))
        return wrapped, optimizer, built

    with third_party_warnings_muted():
        at_start = torch.cuda.memory_allocated()
        oom = _run_steps(prepare, setup, "cuda", probe, steps, warmup, accelerator)
    return _measured(
        model_name or spec.name,
        setup,
        parallel,
        device="cuda",
        probe=probe,
        oom=oom,
        at_start_bytes=at_start,
        start=start,
        notes=notes,
        label=label,
        context_bytes=context_bytes,
        rank=accelerator.process_index,
    )


@contextlib.contextmanager
def _fresh(device: str, memory_fraction: float | None) -> Iterator[None]:
    """A clean allocator before and after a run, and the memory cap while it runs."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(memory_fraction)
    try:
        yield
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            if memory_fraction is not None:
                torch.cuda.set_per_process_memory_fraction(1.0)


def measure_cli(args: argparse.Namespace) -> int:
    """``memplan measure --device cuda``: one configuration, printed and written as JSON."""
    from memplan.cli import parallel_from_args, setup_from_args

    spec = load_model(args.model)
    setup = setup_from_args(args, spec)
    parallel = parallel_from_args(args)
    # Under `accelerate launch` every rank runs this; WORLD_SIZE says how many there are.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and (parallel.num_gpus > 1 or parallel.zero_stage):
        raise MemplanError(
            "a sharded layout is measured with one process per GPU: "
            "accelerate launch --num_processes N -m memplan.measure ..."
        )
    if not torch.cuda.is_available():
        raise MemplanError("--device cuda: no CUDA device is visible to PyTorch")
    used = nvml_used()
    out = Path(args.out) if args.out else None
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # this rank's GPU
    _, context = cuda_context_bytes(used)
    if world > 1:
        if parallel.num_gpus != world:
            parallel = ParallelSetup(**{**parallel.model_dump(), "num_gpus": world})
        result = run_sharded(
            spec,
            setup,
            parallel,
            model_name=args.model,
            steps=args.steps,
            used=used,
            context_bytes=context,
        )
        if out is not None:
            out = out.with_name(f"{out.stem}.rank{result.rank}{out.suffix}")
    else:
        result = run(
            spec, setup, model_name=args.model, steps=args.steps, used=used, context_bytes=context
        )
    payload: dict[str, Any] = result.model_dump(mode="json")
    payload["peak_allocated_bytes"] = result.peak_allocated_bytes
    payload["peak_reserved_bytes"] = result.peak_reserved_bytes
    payload["peak_nvml_bytes"] = result.peak_nvml_bytes
    if out is not None:
        out.write_text(json.dumps(payload, indent=2))
    if args.json:
        print(json.dumps(payload, indent=2))
    elif result.rank == 0:
        from memplan.report import print_verification
        from memplan.verify import summarize, verify_run

        verification = verify_run(result)
        print_verification(
            [verification], summarize([verification], result.environment.device_name)
        )
    return 0

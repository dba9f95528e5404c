"""One traced run: build the model on meta, apply the method, run the steps under the tracker.

Also the same run without the tracker (:func:`run_steps`), for other instruments.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from memplan.specs import LossKind, ModelSpec, ParallelSetup, RefModel, TrainingSetup
from memplan.torchsim.cuda_kernels import cuda_kernels
from memplan.torchsim.fake import fake_tensors
from memplan.torchsim.hooks import ModuleHooks
from memplan.torchsim.methods import apply_method
from memplan.torchsim.models import (
    Backend,
    BuiltModel,
    build_meta_model,
    decoder_layer_stacks,
    lm_head_of,
)
from memplan.torchsim.session import Session, load_session, train_step
from memplan.torchsim.tracker import MemoryTracker

Mode = Literal["fake", "cpu"]
Kernels = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class RunRequest:
    """What to run: the model, the setup, on fake or CPU tensors, for how many steps."""

    spec: ModelSpec
    setup: TrainingSetup
    mode: Mode = "fake"
    steps: int = 2
    backend: Backend = "auto"
    hf_config: dict[str, Any] | None = None
    seed: int = 0
    num_layers: int | None = None  # a shorter copy of the model (layer folding)
    parallel: ParallelSetup | None = None  # FSDP: rank 0 of a fake process group
    kernels: Kernels = "cpu"  # "cuda": CUDA's kernels on fake tensors (torchsim.cuda_kernels)

    @property
    def sharded(self) -> bool:
        return self.parallel is not None and self.parallel.fsdp_strategy is not None

    def with_layers(self, num_layers: int) -> RunRequest:
        return replace(self, num_layers=num_layers)


@dataclass
class TracedRun:
    """The tracker and the session of one traced run (before folding)."""

    tracker: MemoryTracker
    session: Session
    layer_prefix: str
    notes: list[str]


def traced_run(request: RunRequest) -> TracedRun:
    """Run ``request`` with every storage tracked, from model loading to the last zero_grad."""
    torch.manual_seed(request.seed)
    if not request.sharded:
        return _traced_run(request, None)
    from memplan.torchsim.fsdp import check_shardable, fake_process_group

    assert request.parallel is not None
    check_shardable(request.setup)
    with fake_process_group(request.parallel.shard_degree) as mesh:
        return _traced_run(request, mesh)


def _traced_run(request: RunRequest, mesh: Any) -> TracedRun:
    model, built = prepare_model(request)
    if mesh is not None:
        from memplan.torchsim.fsdp import shard_model

        assert request.parallel is not None
        shard_model(model, request.setup, request.parallel, mesh)
        built.notes.append(
            f"rank 0 of {request.parallel.shard_degree} (FSDP2 fully_shard on a fake process "
            "group; every rank holds the same padded shapes)"
        )
    tracker = MemoryTracker()
    fake = request.mode == "fake"
    fake_scope = _fake_mode(fake, built.notes)
    if request.kernels == "cuda" and not fake:
        raise ValueError("CUDA kernels are traced on fake tensors only (mode='fake')")
    # Entered after the tracker, so the tracker records what CUDA's kernels allocate.
    kernels = cuda_kernels() if request.kernels == "cuda" else contextlib.nullcontext()
    resizes = _resizes(tracker) if mesh is not None else contextlib.nullcontext()
    with (
        third_party_warnings_muted(),
        fake_scope,
        tracker,
        kernels,
        _unpacked_sequences(),
        resizes,
    ):
        session = load_session(
            model, built, request.setup, fake=fake, tracker=tracker, sharded=mesh is not None
        )
        hooks = ModuleHooks(
            tracker,
            model,
            lm_head=lm_head_of(model),
            layers=_layers(model),
            head_input_ends_logits=request.setup.loss is LossKind.FULL,
        )
        with hooks, tracker.saving_hooks():
            for step in range(request.steps):
                train_step(session, step)
    tracker.close()
    return TracedRun(tracker, session, _layer_prefix(model), built.notes)


def _resizes(tracker: MemoryTracker) -> contextlib.AbstractContextManager[None]:
    from memplan.torchsim.fsdp import reporting_resizes

    return reporting_resizes(tracker)


def prepare_model(request: RunRequest) -> tuple[nn.Module, BuiltModel]:
    """The model on the meta device with the method applied (allocates nothing)."""
    from memplan.analytic.predict import check_traceable

    check_traceable(request.spec, request.setup)
    with third_party_warnings_muted():
        built = build_meta_model(
            request.spec,
            request.setup,
            backend=request.backend,
            hf_config=request.hf_config,
            num_layers=request.num_layers,
        )
        model = apply_method(built, request.spec, request.setup)
        if request.setup.reference is RefModel.COPY:
            # trl: a second model from the same checkpoint, in the policy's dtype.
            copy = request.setup.model_copy(update={"method": "full"})
            ref_built = build_meta_model(
                request.spec,
                copy,
                backend=request.backend,
                hf_config=request.hf_config,
                num_layers=request.num_layers,
            )
            built.reference = apply_method(ref_built, request.spec, copy)
        return model, built


def run_steps(
    model: nn.Module,
    built: BuiltModel,
    request: RunRequest,
    *,
    before_step: Callable[[int], None] | None = None,
) -> Session:
    """Materialize on the CPU and train, with no tracker (for other instruments: MemTracker)."""
    with third_party_warnings_muted(), _unpacked_sequences():
        session = load_session(model, built, request.setup, fake=False, tracker=None)
        for step in range(request.steps):
            if before_step is not None:
                before_step(step)
            train_step(session, step)
    return session


def _layers(model: nn.Module) -> list[nn.Module]:
    return [layer for stack in decoder_layer_stacks(model) for layer in stack]


def _layer_prefix(model: nn.Module) -> str:
    """Dotted name of the decoder layer list (``model.layers``; under peft with its prefix)."""
    stacks = decoder_layer_stacks(model)
    if len(stacks) != 1:
        return "<no single layer stack>"
    first = stacks[0][0]
    name = next(n for n, m in model.named_modules() if m is first)
    return str(name.rsplit(".", 1)[0])


@contextlib.contextmanager
def _fake_mode(fake: bool, notes: list[str]) -> Iterator[None]:
    if not fake:
        yield
        return
    with fake_tensors() as placeholders:
        yield
    if placeholders.reads:
        notes.append(f"{placeholders.reads} value reads of fake tensors answered with 1")


@contextlib.contextmanager
def _unpacked_sequences() -> Iterator[None]:
    """Tell transformers the batch holds one sequence per row.

    Without an attention mask, transformers reads position_ids to detect packed sequences
    (masking_utils.find_packed_sequence_indices); on fake tensors it cannot read them and
    assumes packing, building a mask a real run would not. Our batches are never packed.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def third_party_warnings_muted() -> Iterator[None]:
    """transformers and peft deprecate their own internals between releases and log advice
    meant for their users (caching under checkpointing, ...): not ours to show."""
    hf_logging: Any = None
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity() if hf_logging is not None else None
    if hf_logging is not None:
        hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # bitsandbytes on a CPU: "Paged optimizers are not supported on CPU" (falls back).
        warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
        try:
            yield
        finally:
            if hf_logging is not None and verbosity is not None:
                hf_logging.set_verbosity(verbosity)

"""One training setup made runnable: the model materialized, classified and ready to step.

``load_session`` is the LOAD phase (materialize, apply checkpointing, build the optimizer);
``train_step`` is one optimizer step of :class:`memplan.loop.TrainingLoop`, the loop the
analytical model and the measured runner follow too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer as TorchOptimizer

from memplan.errors import MemplanError
from memplan.loop import TrainingLoop
from memplan.specs import LossKind, Objective, TrainingSetup
from memplan.torchsim.losses import chunked_loss
from memplan.torchsim.materialize import materialize
from memplan.torchsim.models import COMPUTE_DTYPES, BuiltModel, lm_head_of
from memplan.torchsim.optimizers import OptimizerInBackward, build_optimizer, state_placement
from memplan.torchsim.quant import Linear4bit
from memplan.torchsim.tracker import MemoryTracker
from memplan.trace import Category, Phase


@dataclass
class Session:
    model: nn.Module
    built: BuiltModel
    setup: TrainingSetup
    fake: bool
    tracker: MemoryTracker | None = None
    optimizer: TorchOptimizer | None = None
    trainable: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def trains(self) -> bool:
        return bool(self.trainable)

    def set_phase(self, phase: Phase, step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.set_phase(phase, step)


# -- LOAD ---------------------------------------------------------------------------------------


def load_session(
    model: nn.Module,
    built: BuiltModel,
    setup: TrainingSetup,
    *,
    fake: bool,
    tracker: MemoryTracker | None,
    sharded: bool = False,
) -> Session:
    """``sharded``: ``model`` is FSDP2-sharded on the meta device; each rank's shards are
    allocated (:func:`memplan.torchsim.fsdp.materialize_sharded`)."""
    session = Session(model, built, setup, fake, tracker)
    session.set_phase(Phase.LOAD, 0)
    if sharded:
        from memplan.torchsim.fsdp import materialize_sharded

        if tracker is not None:
            tracker.push_module("")
        materialize_sharded(model)
        if tracker is not None:
            tracker.pop_module()
    elif tracker is None:
        materialize(model, fill=not fake)
    else:
        tracker.push_module("")
        materialize(model, fill=not fake, entering=tracker.rename_module)
        tracker.pop_module()
    model.train()
    session.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if setup.objective is Objective.DPO:
        _load_reference(session, tracker)
    if tracker is not None:
        mark_weights(tracker, model)
        for name, param in session.trainable:
            param.register_hook(_gradient_marker(tracker, f"{name}.grad"))  # type: ignore[no-untyped-call]
    if setup.grad_ckpt and session.trains:
        enable_checkpointing(model, built, setup.grad_ckpt_every)
    if session.trains:
        session.optimizer = build_optimizer(model, setup, built.notes)
    return session


def _load_reference(session: Session, tracker: MemoryTracker | None) -> None:
    """DPO: trl's fused LM head on the policy (and on a reference copy, materialized after
    it: its weights are frozen weights, though trl leaves them requiring grad)."""
    from memplan.torchsim.preference import add_fused_head

    if not session.built.is_hf:
        raise MemplanError("objective=dpo is traced through transformers models only")
    add_fused_head(session.model)
    reference = session.built.reference
    if reference is None:
        return
    if tracker is None:
        materialize(reference, fill=not session.fake)
    else:
        tracker.push_module("reference")
        materialize(reference, fill=not session.fake)
        tracker.pop_module()
        for name, param in reference.named_parameters():
            tracker.mark_weight(param, Category.FROZEN_WEIGHTS, f"reference.{name}")
        for name, buffer in reference.named_buffers():
            tracker.mark_weight(buffer, Category.FROZEN_WEIGHTS, f"reference.{name}")
    reference.train()
    add_fused_head(reference)


def _gradient_marker(tracker: MemoryTracker, name: str) -> Any:
    def mark(grad: torch.Tensor) -> None:
        tracker.mark_gradient(grad, name)

    return mark


def mark_weights(tracker: MemoryTracker, model: nn.Module) -> None:
    """Parameters: trainable or frozen; quantization state: its own; other buffers: frozen."""
    quant_ids = {
        id(getattr(m, name))
        for m in model.modules()
        if isinstance(m, Linear4bit)
        for name in m.quant_state_buffers()
    }
    for name, param in model.named_parameters():
        category = Category.TRAINABLE_WEIGHTS if param.requires_grad else Category.FROZEN_WEIGHTS
        tracker.mark_weight(param, category, name)
    for name, buffer in model.named_buffers():
        category = Category.QUANT_STATE if id(buffer) in quant_ids else Category.FROZEN_WEIGHTS
        tracker.mark_weight(buffer, category, name)


def enable_checkpointing(model: nn.Module, built: BuiltModel, every_n_layers: int) -> None:
    """Non-reentrant checkpointing of every n-th layer, and input embeddings that require grad."""
    unwrap: Any = getattr(model, "get_base_model", None)  # peft wraps the transformers model
    base: Any = unwrap() if callable(unwrap) else model
    if not built.is_hf:
        base.gradient_checkpointing_enable(every_n_layers=every_n_layers)
        return
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers
        )
    else:  # transformers before activation_checkpointing_enable
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# -- one step -----------------------------------------------------------------------------------


def synthetic_batch(
    model: nn.Module, setup: TrainingSetup, *, encoder_decoder: bool, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random token ids; labels are the inputs (the causal-LM collator copies them)."""
    vocab = _vocab(model)
    shape = (setup.micro_batch_size, setup.seq_len)
    input_ids = torch.randint(0, vocab, shape, device=device)
    if encoder_decoder:
        labels_shape = (setup.micro_batch_size, setup.decoder_seq_len)
        labels = torch.randint(0, vocab, labels_shape, device=device)
    else:
        labels = input_ids.clone()
    return {"input_ids": input_ids, "labels": labels}


def _vocab(model: nn.Module) -> int:
    """Vocabulary size from the config (HF) or the spec (reference decoder), through wrappers
    (peft's get_base_model, DDP / DeepSpeed / FSDP's ``.module``)."""
    inner: Any = model
    while True:
        config = getattr(inner, "config", None)
        # A multimodal config keeps the vocabulary in its text part (get_text_config).
        getter = getattr(config, "get_text_config", None)
        text = getter() if callable(getter) else config
        size = getattr(text, "vocab_size", None) or getattr(
            getattr(inner, "spec", None), "vocab_size", None
        )
        if size:
            return int(size)
        unwrap = getattr(inner, "get_base_model", None)
        if callable(unwrap):
            inner = unwrap()
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        else:
            raise ValueError("cannot find the vocabulary size of the model")


def forward_loss(
    model: nn.Module,
    setup: TrainingSetup,
    batch: dict[str, torch.Tensor],
    *,
    trains: bool,
    is_hf: bool,
    device: str = "cpu",
    autocast: bool = True,
    on_hidden: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Trainer.compute_loss: the model's own loss; the output object dies before backward.

    ``autocast=False`` where a wrapper (accelerate) autocasts the forward itself. With
    ``loss=chunked`` the model's forward stops before its LM head and torchtune's chunked loss
    runs on the final hidden states (:mod:`memplan.torchsim.losses`); ``on_hidden`` sees them.
    """
    precision = setup.precision
    amp: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if precision.is_amp and autocast:
        amp = torch.autocast(device, dtype=COMPUTE_DTYPES[precision])
    grad = contextlib.nullcontext() if trains else torch.no_grad()
    extra = {"use_cache": False} if is_hf else {}
    with grad, amp:
        if setup.loss is LossKind.CHUNKED:
            head = lm_head_of(model)
            if head is None:
                raise MemplanError("loss=chunked needs a model with an LM head")
            return chunked_loss(
                model, head, batch, setup.num_loss_chunks, extra=extra, on_hidden=on_hidden
            )
        if setup.loss is not LossKind.FULL:
            raise MemplanError(
                f"loss={setup.loss.value} runs Triton kernels: modelled from source, not traced"
            )
        outputs = model(**batch, **extra)
        loss: torch.Tensor = outputs.loss
        del outputs
    return loss


def _dpo_micro_step(session: Session, step: int) -> None:
    """trl DPOTrainer's training step on one micro-batch of pairs (:mod:`.preference`)."""
    from memplan.torchsim.preference import dpo_loss, dpo_step, preference_batch

    session.set_phase(Phase.FORWARD, step)
    tracker = session.tracker
    batch = preference_batch(session.setup, _vocab(session.model))
    with dpo_step(session.fake):
        loss = dpo_loss(
            session.model,
            session.built.reference,
            session.setup,
            batch,
            set_phase=session.set_phase,
            on_hidden=(lambda hidden: None) if tracker is None else _loss_start(tracker),
        )
        session.set_phase(Phase.BACKWARD)
        if tracker is not None:
            tracker.logits_window = True
        loss.backward()  # type: ignore[no-untyped-call]
        if tracker is not None:
            tracker.logits_window, tracker.backward_context = False, ""
            for name, param in session.trainable:
                if param.grad is not None:
                    tracker.mark_gradient(param.grad, f"{name}.grad")
    del loss, batch


def _micro_step(session: Session, step: int) -> None:
    if session.setup.objective is Objective.DPO:
        _dpo_micro_step(session, step)
        return
    session.set_phase(Phase.FORWARD, step)
    built = session.built
    batch = synthetic_batch(session.model, session.setup, encoder_decoder=built.is_encoder_decoder)
    tracker = session.tracker
    loss = forward_loss(
        session.model,
        session.setup,
        batch,
        trains=session.trains,
        is_hf=built.is_hf,
        on_hidden=None if tracker is None else _loss_start(tracker),
    )
    if session.trains:
        session.set_phase(Phase.BACKWARD)
        if tracker is not None:
            tracker.logits_window = True
        loss.backward()  # type: ignore[no-untyped-call]
        if tracker is not None:
            tracker.logits_window, tracker.backward_context = False, ""
            for name, param in session.trainable:
                if param.grad is not None:
                    tracker.mark_gradient(param.grad, f"{name}.grad")
    del loss, batch


def _loss_start(tracker: MemoryTracker) -> Callable[[torch.Tensor], None]:
    """A loss run outside the model starts the LOSS phase at the final hidden states, and
    backward leaves the logits window when their gradient is complete."""

    def start(hidden: torch.Tensor) -> None:
        tracker.set_phase(Phase.LOSS)
        if hidden.requires_grad and torch.is_grad_enabled():
            hidden.register_hook(_end_logits_window(tracker))  # type: ignore[no-untyped-call]

    return start


def _end_logits_window(tracker: MemoryTracker) -> Callable[[torch.Tensor], None]:
    def end(grad: torch.Tensor) -> None:
        tracker.logits_window = False

    return end


def train_step(session: Session, step: int) -> None:
    for _ in range(TrainingLoop.of(session.setup).micro_batches):
        _micro_step(session, step)
    optimizer = session.optimizer
    if optimizer is None:
        return
    session.set_phase(Phase.OPTIMIZER)
    optimizer.step()
    if session.tracker is not None:
        mark_optimizer_state(session.tracker, optimizer, session.model)
    session.set_phase(Phase.ZERO_GRAD)
    optimizer.zero_grad(set_to_none=True)


def mark_optimizer_state(
    tracker: MemoryTracker, optimizer: TorchOptimizer, model: nn.Module
) -> None:
    if isinstance(optimizer, OptimizerInBackward):
        for inner in optimizer.optimizers.values():
            mark_optimizer_state(tracker, inner, model)
        return
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                name = f"{names.get(id(param), 'param')}.{key}"
                tracker.mark_optimizer_state(value, name, state_placement(optimizer, key, value))

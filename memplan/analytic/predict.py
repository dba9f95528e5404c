"""The analytical prediction: a full memory trace of training steps, torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.analytic.context import StepContext
from memplan.analytic.model_graph import build_model_graph
from memplan.analytic.optimizer import OptimizerBytes, optimizer_bytes
from memplan.analytic.step import StepComposer
from memplan.analytic.weights import ModelState, model_state
from memplan.architecture import architecture
from memplan.dtypes import DType
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import ParallelSetup
from memplan.specs.training import Method, TrainingSetup
from memplan.trace import Category, Event, Phase, Repeat, Trace, TraceItem, allocation_bytes


@dataclass
class Prediction:
    """The analytical trace and the model-state facts behind it."""

    trace: Trace
    state: ModelState
    optimizer: OptimizerBytes


def _net(items: list[TraceItem], category: Category) -> int:
    return Trace("net", list(items)).final_bytes().get(category, 0)


def predict(
    spec: ModelSpec, setup: TrainingSetup, parallel: ParallelSetup | None = None, *, steps: int = 2
) -> Prediction:
    """Trace ``steps`` optimizer steps of ``setup`` on ``spec`` analytically."""
    parallel = parallel or ParallelSetup()
    arch = architecture(spec)
    ctx = StepContext.build(spec, setup, tensor_parallel_degree=parallel.tensor_parallel_degree)
    state = model_state(arch, setup, ctx)
    trace = Trace("analytical")
    for category, nbytes in state.bytes_by_category.items():
        trace.add(Event(nbytes, category, Phase.LOAD, 0, f"model {category.value}"))

    autograd = setup.trains_weights
    graph = build_model_graph(
        spec,
        ctx,
        grad_ckpt=setup.grad_ckpt,
        ckpt_every=setup.grad_ckpt_every,
        autograd=autograd,
        # enable_input_require_grads: HF turns it on with checkpointing (and PEFT k-bit prep).
        input_grads_hook=setup.grad_ckpt and autograd,
    )
    composer = StepComposer(graph)
    opt = optimizer_bytes(
        state.trainable,
        setup.optimizer,
        setup.optimizer_impl,
        master_dtype=None,
        device=setup.device,
    )
    batch_bytes = 2 * allocation_bytes(ctx.num_tokens * 8)  # int64 input_ids and labels
    for step in range(steps):
        micro: list[list[TraceItem]] = []
        for accumulate in (False, True)[: min(setup.grad_accum_steps, 2)]:
            items: list[TraceItem] = [
                Event(batch_bytes, Category.TEMPORARIES, Phase.FORWARD, step, "batch")
            ]
            fwd, deferred = composer.forward_items(step)
            items += fwd
            items += composer.loss_items(step, deferred)
            if autograd:
                items += composer.backward_items(step, accumulate=accumulate)
                items.append(
                    Event(-batch_bytes, Category.TEMPORARIES, Phase.BACKWARD, step, "batch")
                )
            else:
                items.append(Event(-batch_bytes, Category.TEMPORARIES, Phase.LOSS, step, "batch"))
                items += _forward_only_cleanup(items, step)
            micro.append(items)
        trace.extend(micro[0])
        if setup.grad_accum_steps > 1:
            trace.add(Repeat(tuple(micro[1]), setup.grad_accum_steps - 1, "micro-batches"))
        if not autograd:
            continue
        if step == 0 and (opt.state_bytes):
            trace.add(
                Event(
                    opt.state_bytes,
                    Category.OPTIMIZER_STATE,
                    Phase.OPTIMIZER,
                    step,
                    "optimizer state (lazy init)",
                )
            )
        if opt.step_temp_bytes:
            trace.add(
                Event(
                    opt.step_temp_bytes,
                    Category.TEMPORARIES,
                    Phase.OPTIMIZER,
                    step,
                    "optimizer step workspace",
                )
            )
            trace.add(
                Event(
                    -opt.step_temp_bytes,
                    Category.TEMPORARIES,
                    Phase.OPTIMIZER,
                    step,
                    "optimizer step workspace",
                )
            )
        grads = _net(micro[0], Category.GRADIENTS)
        if grads:
            trace.add(
                Event(
                    -grads, Category.GRADIENTS, Phase.ZERO_GRAD, step, "zero_grad(set_to_none=True)"
                )
            )
    return Prediction(trace, state, opt)


def _forward_only_cleanup(items: list[TraceItem], step: int) -> list[TraceItem]:
    """Under no_grad nothing is saved; whatever the forward left allocated is freed at its end."""
    left = Trace("net", list(items)).final_bytes()
    return [
        Event(-nbytes, category, Phase.LOSS, step, "forward outputs released")
        for category, nbytes in left.items()
        if nbytes and category in (Category.ACTIVATIONS, Category.TEMPORARIES, Category.LOGITS)
    ]


_ = (DType, Method)

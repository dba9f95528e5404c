"""A symbolic autograd: replays a segment of a model's ops and emits its memory events.

Each op is recorded with its output size and the tensors autograd saves for it
(``tools/autograd/derivatives.yaml``: an input is saved only when the gradient of another
input that requires grad needs it). Replaying the forward allocates outputs and frees every
tensor after its last use unless it is saved or kept; replaying the backward in reverse
allocates input gradients, releases saved tensors once their node ran (autograd's
``release_variables``) and frees each gradient once consumed. Sizes are plain ints, so a
segment of 30 ops replays in microseconds, and one decoder layer's events are repeated for
every identical layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from memplan.analytic.symbolic import Count
from memplan.dtypes import DType, dtype_bytes
from memplan.trace import Category, Event, Phase, allocation_bytes


@dataclass(eq=False)
class Tensor:
    """A symbolic tensor: its size, whether it requires grad, and whose storage it uses."""

    numel: Count
    dtype: DType
    requires_grad: bool
    label: str
    base: Tensor | None = None  # views share their base's storage
    persistent: bool = False  # owned outside the segment (parameters, rotary tables)
    # Its category unless a replay says otherwise (``categories`` of forward_events and
    # backward_events: a boundary tensor's category depends on the neighbouring segments).
    category: Category = Category.TEMPORARIES
    storage: Tensor = field(init=False, repr=False)  # the tensor owning the memory

    def __post_init__(self) -> None:
        self.storage = self.base.storage if self.base is not None else self

    @property
    def nbytes(self) -> Count:
        return self.numel * dtype_bytes(self.dtype)


@dataclass(frozen=True, slots=True)
class ParamGrad:
    """A trainable parameter used by an op: its ``.grad`` appears in the op's backward."""

    label: str
    grad_bytes: Count  # this GPU's share of .grad
    # Shared with an op that runs earlier in backward (tied LM head): adds into that .grad.
    accumulates: bool = False
    # Under sharded gradients (ZeRO-2/3, FSDP) the full gradient exists until reduce-scatter.
    unsharded_bytes: int = 0
    # Tied weights (LM head = token embedding) have one AccumulateGrad node: its input buffer
    # holds the head's contribution ("first", in the loss's category) until the embedding's
    # ("last") arrives; their sum becomes .grad.
    tie: str = ""
    buffered_in: Category = Category.LOGITS  # category of the buffered first contribution
    # Computed in the forward by a fused kernel and saved for backward (Liger's fused linear
    # cross-entropy): backward hands this buffer to AccumulateGrad, which steals it as .grad.
    precomputed: Tensor | None = None
    # The optimizer steps this parameter in its post-accumulate-grad hook and frees .grad
    # (torchtune's optimizer_in_bwd): the state it creates on the first step, the step's
    # temporaries.
    in_backward_step: tuple[int, int] | None = None
    # FSDP2: the gradient accumulates unsharded in the unsharded parameter's .grad through
    # the unit's backward; its post-backward reduce-scatters it into this rank's shard
    # (_fsdp_param_group.py post_backward, _fsdp_collectives.py foreach_reduce).
    reduced_per_unit: bool = False


@dataclass(eq=False)
class Op:
    name: str
    inputs: tuple[Tensor, ...]
    output: Tensor
    saved: tuple[Tensor, ...] = ()
    param_grads: tuple[ParamGrad, ...] = ()
    passthrough_grad: bool = False  # input grads are views of the output grad (add, view, split)
    fwd_workspace_bytes: int = 0  # transient inside the forward kernel
    bwd_workspace_bytes: int = 0  # transient inside the backward (e.g. re-dequantized weight)
    # Autograd also saves a parameter (resident, no memory of its own): a frozen linear's
    # weight kept for its input's gradient. It counts for checkpointing's early stop.
    saves_params: bool = False
    # The kernel also returns tensors recorded as ops of their own before it (native_layer_norm's
    # mean and rstd), saved as its outputs: packed after the kernel ran.
    saves_kernel_outputs: bool = False
    # Transient in the backward before the input gradients are allocated (a dequantized
    # weight and its compute-dtype copy, the first freed before grad_input exists).
    bwd_pre_workspace_bytes: int = 0
    # A hold that only autograd makes: the saved tensors of a graph no gradient ever reaches
    # (a detached product's), alive while that graph is; without autograd it does nothing.
    autograd_only: bool = False
    # A saved tensor the backward returns as its input's gradient (a fused kernel computed
    # it in the forward): no new gradient is allocated, the saved one is handed on.
    input_grad_from_saved: Tensor | None = None


@dataclass
class Segment:
    """Ops of one part of the model (embedding, one layer, the head), in forward order."""

    label: str
    saved_category: Category = Category.ACTIVATIONS
    temp_category: Category = Category.TEMPORARIES
    ops: list[Op] = field(default_factory=list)
    # Weight casts held by the autocast cache until the forward's autocast context exits.
    autocast_cached: list[Tensor] = field(default_factory=list)
    _saved_ids: tuple[int, frozenset[int]] | None = field(default=None, repr=False)
    # Tensors a caller's local variables keep until its forward returns (the model's
    # inputs_embeds): kept past their last use here and released by the composer.
    model_locals: list[Tensor] = field(default_factory=list)
    # Those of them a method's forward around the model keeps (peft's prompt-tuning
    # inputs_embeds): released when that forward returns, after the loss.
    outer_locals: list[Tensor] = field(default_factory=list)
    # Tensors a layer makes for every layer of its stack (T5's first layer's position bias):
    # kept past the layer and released by the composer when the stack no longer needs them.
    stack_held: list[Tensor] = field(default_factory=list)
    # Tensors a KV cache holds (peft's prefix DynamicCache) until the model's output is
    # dropped after the loss: kept past their last use and released by the composer.
    cache_held: list[Tensor] = field(default_factory=list)
    # The batch's labels when the segment reads them as they are (a view, not a shifted copy).
    batch_labels: Tensor | None = None

    def saved_storage_ids(self) -> frozenset[int]:
        """ids of the storages any op of the segment saves for backward (cached)."""
        if self._saved_ids is None or self._saved_ids[0] != len(self.ops):
            ids = frozenset(id(t.storage) for op in self.ops for t in op.saved)
            self._saved_ids = (len(self.ops), ids)
        return self._saved_ids[1]

    def hold(self, *tensors: Tensor, label: str = "hold", autograd_only: bool = False) -> None:
        """Keep ``tensors`` alive until this point: a Python variable still refers to them
        (the caller's ``hidden_states`` during a layer, a norm's output during the module
        that reads it); ``autograd_only``: only when autograd records (see Op)."""
        self.op(label, tensors, 0, DType.UINT8, requires_grad=False)
        self.ops[-1].autograd_only = autograd_only

    def input(
        self, numel: int, dtype: DType, label: str, *, requires_grad: bool, persistent: bool = False
    ) -> Tensor:
        """A tensor made before this segment; freed here after its last use unless persistent."""
        return Tensor(numel, dtype, requires_grad, label, persistent=persistent)

    def op(
        self,
        name: str,
        inputs: Iterable[Tensor],
        numel: int,
        dtype: DType,
        *,
        saves: Iterable[Tensor | None] = (),
        saves_output: bool = False,
        param_grads: Iterable[ParamGrad] = (),
        view_of: Tensor | None = None,
        requires_grad: bool | None = None,
        passthrough_grad: bool = False,
        fwd_workspace_bytes: int = 0,
        bwd_workspace_bytes: int = 0,
        category: Category | None = None,
        saves_params: bool = False,
        saves_kernel_outputs: bool = False,
        bwd_pre_workspace_bytes: int = 0,
    ) -> Tensor:
        """Record an op. ``saves`` is what autograd keeps when the output requires grad;
        ``saves_params``: it also keeps a parameter; ``saves_kernel_outputs``: some of the saved
        tensors are other outputs of its kernel."""
        ins = tuple(inputs)
        grads = tuple(g for g in param_grads if g.grad_bytes)
        if requires_grad is None:
            requires_grad = any(t.requires_grad for t in ins) or bool(grads)
        out = Tensor(
            numel,
            dtype,
            requires_grad,
            f"{self.label}.{name}",
            base=view_of,
            category=category or self.temp_category,
        )
        saved = tuple(s for s in saves if s is not None) if requires_grad else ()
        if saves_output and requires_grad:
            saved += (out,)
        self.ops.append(
            Op(
                name,
                ins,
                out,
                saved,
                grads,
                passthrough_grad,
                fwd_workspace_bytes,
                bwd_workspace_bytes,
                saves_params and requires_grad,
                saves_kernel_outputs and requires_grad,
                bwd_pre_workspace_bytes,
            )
        )
        return out


@dataclass
class _Ledger:
    phase: Phase
    step: int
    events: list[Event] = field(default_factory=list)

    def alloc(self, nbytes: int, category: Category, label: str) -> None:
        if size := allocation_bytes(nbytes):
            self.events.append(Event(size, category, self.phase, self.step, label))

    def free(self, nbytes: int, category: Category, label: str) -> None:
        if size := allocation_bytes(nbytes):
            self.events.append(Event(-size, category, self.phase, self.step, label))

    def transient(self, nbytes: int, category: Category, label: str) -> None:
        self.alloc(nbytes, category, label)
        self.free(nbytes, category, label)


@dataclass
class ForwardResult:
    events: list[Event]
    saved: list[Tensor]  # storages left allocated for backward
    deferred: list[Tensor]  # storages kept until the end of the forward (autocast cache)


Categories = Mapping[Tensor, Category]
"""Categories of a replay's boundary tensors (others keep their own ``Tensor.category``)."""


def _category(
    segment: Segment, storage: Tensor, categories: Categories, *, saved: bool
) -> Category:
    """A storage's category in this replay: saved temporaries of a segment count as its saved
    category."""
    category = categories.get(storage, storage.category)
    if saved and category is segment.temp_category:
        return segment.saved_category
    return category


def recompute_stop(segment: Segment) -> tuple[int, bool]:
    """Where a checkpoint's recomputation stops: the index of the last op whose autograd node
    saves anything, and whether that op's output exists by then.

    Non-reentrant checkpointing raises _StopRecomputationError once the last saved tensor is
    repacked (torch/utils/checkpoint.py, early_stop=True). Autograd packs an op's saved inputs
    before its kernel runs and its saved output after, so the recomputation ends before the
    output of an op that saves only inputs.
    """
    for index in reversed(range(len(segment.ops))):
        op = segment.ops[index]
        if op.saved or op.saves_params:
            return index, op.saves_kernel_outputs or any(t is op.output for t in op.saved)
    return -1, False


def forward_events(
    segment: Segment,
    *,
    phase: Phase,
    step: int,
    keep_saved: bool,
    keep: Iterable[Tensor] = (),
    defer: Iterable[Tensor] = (),
    early_stop: bool = False,
    categories: Categories | None = None,
) -> ForwardResult:
    """Events of running ``segment`` forward.

    ``keep_saved``: autograd records the graph (training without checkpointing): saved
    tensors stay allocated, tagged with the segment's saved category. ``keep``: storages that
    outlive the segment (its output, an input the caller still holds). ``defer``: storages
    freed only when the whole forward ends rather than after their last use (the autocast
    weight cache). ``early_stop``: a checkpoint's recomputation, which stops after the last op
    that saves a tensor; the unsaved tensors its locals still hold are then dropped.
    ``categories``: the categories of boundary tensors in this replay. The segment is only
    read: one replay never depends on another.
    """
    cats: Categories = categories or {}
    ledger = _Ledger(phase, step)
    keep_ids = {id(t.storage) for t in keep}
    defer_ids = {id(t.storage) for t in defer}
    last_use: dict[int, int] = {}
    skipped = {index for index, op in enumerate(segment.ops) if op.autograd_only and not keep_saved}
    for index, op in enumerate(segment.ops):
        if index in skipped:
            continue
        for t in op.inputs:
            last_use[id(t.storage)] = index
    saved: dict[int, Tensor] = {}
    if keep_saved:
        for op in segment.ops:
            for t in op.saved:
                saved.setdefault(id(t.storage), t.storage)
    deferred: dict[int, Tensor] = {}
    temp, saved_category = segment.temp_category, segment.saved_category
    ops = segment.ops
    stop, stop_output = len(ops) - 1, True
    if early_stop:
        stop, stop_output = recompute_stop(segment)
    live: dict[int, Tensor] = {}  # storages the recomputation's locals hold at its stop
    for index, op in enumerate(ops[: stop + 1]):
        if index in skipped:
            continue
        out = op.output
        if index == stop and not stop_output:
            live.update((id(t.storage), t.storage) for t in op.inputs)
            break
        if out.base is None:
            category = cats.get(out, out.category)
            if category is temp and id(out) in saved:
                category = saved_category
            ledger.alloc(out.numel * dtype_bytes(out.dtype), category, out.label)
        if op.fwd_workspace_bytes:
            ledger.transient(op.fwd_workspace_bytes, temp, f"{out.label} workspace")
        done: set[int] = set()
        for t in (*op.inputs, out):
            storage = t.storage
            sid = id(storage)
            if sid in done:
                continue
            done.add(sid)
            if storage.persistent or sid in keep_ids or sid in saved:
                continue
            if last_use.get(sid, index) > index:
                live[sid] = storage
                continue
            live.pop(sid, None)
            if sid in defer_ids:
                deferred[sid] = storage
                continue
            category = cats.get(storage, storage.category)
            ledger.free(storage.numel * dtype_bytes(storage.dtype), category, storage.label)
    if stop < len(ops) - 1 or not stop_output:
        for sid, storage in live.items():
            if not (storage.persistent or sid in keep_ids or sid in saved):
                label = f"{storage.label} (recompute stopped)"
                ledger.free(storage.nbytes, cats.get(storage, storage.category), label)
    return ForwardResult(ledger.events, list(saved.values()), list(deferred.values()))


def _tied_bytes(g: ParamGrad) -> int:
    """Bytes of one contribution to a tied gradient: the whole table's when gradients are
    sharded, since autograd's InputBuffer sums the contributions before AccumulateGrad (and
    the reduce-scatter behind it) runs."""
    return g.unsharded_bytes or g.grad_bytes


def _tied_sum(ledger: _Ledger, g: ParamGrad, *, accumulate: bool, first_step: bool) -> None:
    """The embedding's gradient, summed with the buffered LM-head one into .grad.

    AccumulateGrad runs after the embedding's node has released its incoming gradient.
    Under sharded gradients the sum is the unsharded parameter's gradient: FSDP2's
    post-backward copies it into the reduce-scatter input and writes this rank's shard
    (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py foreach_reduce), then frees it
    (_fsdp_param_group.py post_backward: ``fsdp_param.unsharded_param.grad = None``).
    """
    part = _tied_bytes(g)
    sharded = g.unsharded_bytes > 0
    if sharded:
        ledger.alloc(part, Category.TEMPORARIES, f"{g.label} grad (tied sum)")
        ledger.free(part, Category.TEMPORARIES, f"{g.label} grad")
        ledger.free(part, g.buffered_in, f"{g.label} grad (tied, buffered)")
        ledger.transient(part, Category.TEMPORARIES, f"{g.label} reduce-scatter input")
        if accumulate:
            ledger.transient(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad shard")
        else:
            ledger.alloc(g.grad_bytes, Category.GRADIENTS, f"{g.label}.grad")
        ledger.free(part, Category.TEMPORARIES, f"{g.label} grad (tied sum)")
    else:
        if accumulate:  # the sum is added into the existing .grad in place
            ledger.transient(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad (tied sum)")
        else:
            ledger.alloc(g.grad_bytes, Category.GRADIENTS, f"{g.label}.grad")
        ledger.free(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad")
        ledger.free(g.grad_bytes, g.buffered_in, f"{g.label} grad (tied, buffered)")
    if not accumulate:
        step_in_backward(ledger, g, first_step=first_step)


def step_in_backward_events(g: ParamGrad, step: int, *, first_step: bool) -> list[Event]:
    """:func:`step_in_backward` for a gradient written outside a segment's replay."""
    ledger = _Ledger(Phase.BACKWARD, step)
    step_in_backward(ledger, g, first_step=first_step)
    return ledger.events


def step_in_backward(ledger: _Ledger, g: ParamGrad, *, first_step: bool) -> None:
    """The post-accumulate-grad hook of torchtune's optimizer_in_bwd, once ``g``'s .grad is
    complete: ``optimizer.step()`` (the state created on the first step, the step's
    temporaries), then ``zero_grad()`` frees .grad (torchtune/modules/optim.py)."""
    if g.in_backward_step is None:
        return
    state_bytes, temp_bytes = g.in_backward_step
    if first_step:
        ledger.alloc(state_bytes, Category.OPTIMIZER_STATE, f"{g.label} optimizer state")
    ledger.transient(temp_bytes, Category.TEMPORARIES, f"{g.label} optimizer step")
    ledger.free(g.grad_bytes, Category.GRADIENTS, f"{g.label}.grad (stepped)")


@dataclass(slots=True)
class _GradBuffer:
    nbytes: int
    refs: int  # gradients sharing it (passthrough ops hand it on)
    category: Category


GradBytes = tuple[int, Category]  # bytes of a gradient buffer and the category it was made in


def _split_of(op: Op) -> Tensor | None:
    """The tensor ``op`` takes a part of (a passthrough view with fewer elements), if any."""
    base = op.output.base
    if op.passthrough_grad and base is not None and op.output.numel != base.numel:
        return base
    return None


def _split_parts(segment: Segment) -> dict[int, int]:
    """For each split tensor, the number of its parts some later op reads (their gradients
    all arrive before SplitBackward runs)."""
    read = {id(t) for op in segment.ops for t in op.inputs}
    counts: dict[int, int] = {}
    for op in segment.ops:
        base = _split_of(op)
        if base is not None and id(op.output) in read:
            counts[id(base)] = counts.get(id(base), 0) + 1
    return counts


def backward_events(
    segment: Segment,
    *,
    phase: Phase,
    step: int,
    output_grads: dict[int, GradBytes],
    accumulate: bool = False,
    recompute: tuple[int, list[Event]] | None = None,
    keep: Iterable[Tensor] = (),
    categories: Categories | None = None,
    held_output_grads: bool = False,
    first_step: bool = True,
) -> tuple[list[Event], dict[int, GradBytes]]:
    """Events of the segment's backward, given the gradients of its outputs.

    ``output_grads`` maps ``id(output tensor)`` to its incoming gradient (allocated by the
    segment above; freed here once consumed). Returns the events and the gradients of the
    segment's external inputs (by ``id``), left allocated for the segment below. With
    ``accumulate`` (a later micro-batch of gradient accumulation) parameter gradients are
    computed into a temporary and added into the existing ``.grad``. ``recompute``: a
    checkpoint's recomputation (op index, events), run when backward first unpacks a saved
    tensor, at that op; the ops after it have run their backward by then. ``keep``: saved
    storages the caller still holds past their last use (a checkpointed layer's input);
    ``categories`` as in :func:`forward_events`. ``held_output_grads``: the caller holds the
    output gradients past their use (the seed torch.autograd.backward makes), so they are
    not freed here. ``first_step``: an optimizer stepping in backward creates its state.
    """
    ledger = _Ledger(phase, step)
    cats: Categories = categories or {}
    keep_ids = {id(t.storage) for t in keep}
    category = segment.temp_category
    buffers: dict[int, _GradBuffer] = {}  # buffer id -> its bytes, references and category
    grad_of: dict[int, int] = {}  # tensor id -> buffer id
    counter = [0]

    def new_buffer(nbytes: int, cat: Category, *, allocate: bool) -> int:
        counter[0] += 1
        buffers[counter[0]] = _GradBuffer(nbytes, 1, cat)
        if allocate:
            ledger.alloc(nbytes, cat, "grad")
        return counter[0]

    def release(buffer: int) -> None:
        entry = buffers[buffer]
        entry.refs -= 1
        if entry.refs == 0:
            ledger.free(entry.nbytes, entry.category, "grad")
            del buffers[buffer]

    for tensor_id, (nbytes, cat) in output_grads.items():
        grad_of[tensor_id] = new_buffer(nbytes, cat, allocate=False)
        buffers[grad_of[tensor_id]].refs += held_output_grads

    save_refs: dict[int, int] = {}
    storages: dict[int, Tensor] = {}
    for op in segment.ops:
        for t in op.saved:
            save_refs[id(t.storage)] = save_refs.get(id(t.storage), 0) + 1
            storages[id(t.storage)] = t.storage

    produced = {id(op.output) for op in segment.ops}
    reduced: list[ParamGrad] = []  # FSDP2 gradients reduce-scattered when the segment ends
    num_parts = _split_parts(segment)
    split_grads: dict[int, list[int]] = {}  # tensor id -> gradient buffers of its parts
    for index in reversed(range(len(segment.ops))):
        op = segment.ops[index]
        if recompute is not None and index == recompute[0]:
            ledger.events += recompute[1]
        out_buffer = grad_of.pop(id(op.output), None)
        if out_buffer is None:
            continue
        if op.bwd_pre_workspace_bytes:
            label = f"{op.output.label} backward"
            ledger.transient(op.bwd_pre_workspace_bytes, category, label)
        new_grads: list[tuple[Tensor, int]] = []
        stolen: set[int] = set()  # saved buffers AccumulateGrad takes as .grad
        for t in op.inputs:
            if not t.requires_grad:
                continue
            src = op.input_grad_from_saved
            if src is not None:
                stolen.add(id(src.storage))
                cat = _category(segment, src.storage, cats, saved=True)
                new_grads.append((t, new_buffer(src.nbytes, cat, allocate=False)))
                continue
            # Views, adds and other passthrough ops hand the output gradient on unchanged when
            # no dtype cast is needed; otherwise autograd casts it (a new tensor).
            if op.passthrough_grad and t.dtype is op.output.dtype:
                buffers[out_buffer].refs += 1
                new_grads.append((t, out_buffer))
            else:
                new_grads.append((t, new_buffer(t.nbytes, category, allocate=True)))
        for g in op.param_grads:
            if g.precomputed is not None:
                # The kernel's saved gradient buffer: stolen as .grad, or added into it (and
                # freed with the saved tensors) by a later micro-batch.
                if not (accumulate or g.accumulates):
                    stolen.add(id(g.precomputed.storage))
                    step_in_backward(ledger, g, first_step=first_step)
                continue
            if g.reduced_per_unit and not g.tie:
                ledger.alloc(g.unsharded_bytes, Category.TEMPORARIES, f"{g.label} unsharded grad")
                reduced.append(g)
                continue
            tied = g.tie in ("first", "last")  # reduce-scattered once summed (_tied_sum)
            if g.unsharded_bytes > g.grad_bytes and not tied:
                # full gradient, reduce-scattered into a shard
                ledger.transient(
                    g.unsharded_bytes, Category.TEMPORARIES, f"{g.label} unsharded grad"
                )
            if g.tie == "first":
                ledger.alloc(_tied_bytes(g), category, f"{g.label} grad (tied, buffered)")
            elif g.tie == "middle":
                # InputBuffer adds this contribution to the buffered one out of place: the
                # sum (a temporary) replaces the buffered gradient.
                ledger.alloc(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad")
                ledger.alloc(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad (tied sum)")
                ledger.free(g.grad_bytes, g.buffered_in, f"{g.label} grad (tied, buffered)")
                ledger.free(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad")
            elif g.tie in ("sum", "sum-last"):
                # A weight used by several ops of one segment (the LM head run chunk by
                # chunk): its AccumulateGrad's InputBuffer adds each contribution to the
                # buffered ones out of place; after the last, the sum is stolen as .grad.
                ledger.alloc(g.grad_bytes, category, f"{g.label} grad")
                last = g.tie == "sum-last"
                if last and (accumulate or g.accumulates):
                    ledger.transient(g.grad_bytes, Category.TEMPORARIES, f"{g.label}.grad +=")
                else:
                    sum_category = Category.GRADIENTS if last else g.buffered_in
                    ledger.alloc(g.grad_bytes, sum_category, f"{g.label} grad (sum)")
                ledger.free(g.grad_bytes, g.buffered_in, f"{g.label} grad (buffered)")
                ledger.free(g.grad_bytes, category, f"{g.label} grad")
                if last and not (accumulate or g.accumulates):
                    step_in_backward(ledger, g, first_step=first_step)
            elif g.tie == "last":  # the node's contribution; summed once the node is done
                ledger.alloc(_tied_bytes(g), Category.TEMPORARIES, f"{g.label} grad")
            elif accumulate or g.accumulates:  # AccumulateGrad adds into the existing .grad
                ledger.transient(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad")
            else:  # the first gradient is stolen into .grad without a copy
                ledger.alloc(g.grad_bytes, Category.GRADIENTS, f"{g.label}.grad")
                step_in_backward(ledger, g, first_step=first_step)
        if op.bwd_workspace_bytes:
            ledger.transient(op.bwd_workspace_bytes, category, f"{op.output.label} backward")
        for t in op.saved:
            sid = id(t.storage)
            save_refs[sid] -= 1
            kept = t.storage.persistent or sid in keep_ids or sid in stolen
            if save_refs[sid] == 0 and not kept:
                storage = storages[sid]
                freed_as = _category(segment, storage, cats, saved=True)
                ledger.free(storage.nbytes, freed_as, storage.label)
        release(out_buffer)
        for g in op.param_grads:
            if g.tie == "last":
                _tied_sum(ledger, g, accumulate=accumulate, first_step=first_step)
        for t, buffer in new_grads:
            if _split_of(op) is t:
                # The gradient of one part of a split (chunk, split): SplitBackward concatenates
                # the parts' gradients into one of the whole's size once all of them are in.
                parts = split_grads.setdefault(id(t), [])
                parts.append(buffer)
                if len(parts) < num_parts[id(t)]:
                    continue
                buffer = new_buffer(t.nbytes, category, allocate=True)
                for part in split_grads.pop(id(t)):
                    release(part)
            if id(t) in grad_of:  # InputBuffer::accumulate: old + new, out of place
                ledger.transient(t.nbytes, category, "grad accumulation")
                release(buffer)
            else:
                grad_of[id(t)] = buffer
    for g in reduced:  # the unit's post-backward: this rank's shard of each gradient
        if accumulate or g.accumulates:  # added into the existing sharded .grad
            ledger.transient(g.grad_bytes, Category.TEMPORARIES, f"{g.label} grad shard")
        else:
            ledger.alloc(g.grad_bytes, Category.GRADIENTS, f"{g.label}.grad")
        ledger.free(g.unsharded_bytes, Category.TEMPORARIES, f"{g.label} unsharded grad")
    remaining: dict[int, GradBytes] = {}
    for tensor_id, buffer in grad_of.items():
        if tensor_id not in produced and buffer in buffers:
            entry = buffers[buffer]
            remaining[tensor_id] = (entry.nbytes, entry.category)
    return ledger.events, remaining

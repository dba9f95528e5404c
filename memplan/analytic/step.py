"""Compose one micro-batch's forward, loss and backward events from the model's segments.

The order mirrors a Hugging Face Trainer step: the forward runs every stack (embedding,
layers, final norm) under autocast when AMP is on, the loss follows (LM head, logits,
cross-entropy; the output object is dropped before backward, and the autocast weight cache is
cleared when the autocast context exits), then backward runs the segments in reverse.
Identical layers become one :class:`Repeat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from memplan.analytic.graph import (
    GradBytes,
    Segment,
    Tensor,
    backward_events,
    forward_events,
    recompute_stop,
    step_in_backward_events,
)
from memplan.analytic.model_graph import LayerPlan, ModelGraph, Stack
from memplan.methods.base import Step
from memplan.trace import Category, Event, Phase, Repeat, TraceItem, allocation_bytes

_ACT: Final = Category.ACTIVATIONS
_TMP: Final = Category.TEMPORARIES


def _saves(seg: Segment, tensor: Tensor) -> bool:
    """Whether any op of ``seg`` saves ``tensor``'s storage for backward."""
    return id(tensor.storage) in seg.saved_storage_ids()


@dataclass
class _LayerForward:
    events: list[Event]
    deferred_bytes: int  # autocast-cached weight copies freed when the forward ends


class StepComposer:
    """Trace items of one micro-batch for a ModelGraph."""

    def __init__(
        self,
        graph: ModelGraph,
        *,
        gather_bytes: int = 0,
        prefetch_bytes: int = 0,
        tail_gather_bytes: int = 0,
        reduce_buffer_bytes: int = 0,
        tail_reduce_bytes: int = 0,
        tail_gathered_from_start: bool = False,
        layer_gather_bytes: int = 0,
        held_gathered: bool = False,
        embed_gather_bytes: int = 0,
        last_prefetch_bytes: int = 0,
    ) -> None:
        self.graph = graph
        self._first_step = True  # of the backward being composed (optimizer in backward)
        # FSDP2: the final norm + LM head unit, gathered from the end of the forward to its
        # backward (its flat all-gather output as well, until the loss is computed), and the
        # reduce-scatter input one unit keeps through the next unit's backward
        # (:meth:`memplan.analytic.sharding.Sharded.fsdp2_buffers`).
        self.tail_gather_bytes = allocation_bytes(tail_gather_bytes)
        self.reduce_buffer_bytes = allocation_bytes(reduce_buffer_bytes)
        self.tail_reduce_bytes = allocation_bytes(tail_reduce_bytes)
        # A tied embedding joins that unit, whose pre-forward hook then fires at the embedding:
        # it stays gathered from the start of the forward to the end of the backward (the
        # embedding's), its all-gather output freed at the first layer's all-gather.
        self.tail_from_start = tail_gathered_from_start
        # No all-gather follows the last layer's then: its flat all-gather output lives until
        # the root's post-forward, after the loss (_fsdp_state.py _post_forward frees
        # ``comm_ctx.all_gather_state``), and the first reduce-scatter is the last layer's.
        layer = allocation_bytes(layer_gather_bytes)
        self.last_gather_bytes = layer if self.tail_from_start else 0
        # Otherwise it lives until the tail unit's all-gather has been copied out
        # (_fsdp_param_group.py wait_for_unshard frees the previous ``all_gather_state``).
        self.handoff_gather_bytes = 0 if self.tail_from_start else layer
        # Each layer's forward all-gather likewise: the previous unit's all-gather output is
        # freed once this one's is copied out (``prev_all_gather_state`` in wait_for_unshard).
        self.layer_gather_bytes = layer
        # FSDP2 SHARD_GRAD_OP (reshard_after_forward=False): each layer's unsharded parameters
        # stay from its forward to its post-backward, its flat all-gather output only until
        # the next layer's all-gather; the embedding's unit likewise, from the start of the
        # forward to the end of the backward.
        self.held_layer_bytes = layer if held_gathered else 0
        self.embed_gather_bytes = allocation_bytes(embed_gather_bytes)
        self.autograd = graph.autograd
        # ZeRO-3 / FULL_SHARD: each layer's parameters are all-gathered (with the next layer
        # prefetched) before it runs and released after, in forward and again in backward.
        self.gather_bytes = gather_bytes
        # The part of it that is the next layer, prefetched: the last layer to run backward
        # prefetches the unit before it in forward order instead, if any (FSDP2's embedding
        # unit; _fsdp_param_group.py _backward_prefetch).
        self.prefetch_bytes = prefetch_bytes
        self.last_prefetch_bytes = last_prefetch_bytes
        # Category of each tensor handed from one segment to the next: an activation when the
        # receiving segment saves it or holds it for recomputation, else a temporary.
        self.loss_boundary = _ACT if self.autograd and _saves(graph.loss, graph.loss_in) else _TMP
        self.boundaries = [self._stack_boundaries(i, s) for i, s in enumerate(graph.stacks)]

    def _stack_boundaries(self, index: int, stack: Stack) -> list[Category]:
        cats = []
        for plan in stack.layers:
            held = plan.checkpointed or (
                self.autograd and _saves(plan.graph.segment, plan.graph.input)
            )
            cats.append(_ACT if held else _TMP)
        if stack.norm_out is stack.norm_in:  # no final norm: the last output goes straight on
            cats.append(self._stack_output_category(index))
        else:
            cats.append(_ACT if self.autograd and _saves(stack.norm, stack.norm_in) else _TMP)
        return cats

    @property
    def saves_batch_labels(self) -> bool:
        """Whether backward keeps the batch's labels themselves (nll_loss saves its target)."""
        labels = self.graph.loss.batch_labels
        return labels is not None and self.autograd and _saves(self.graph.loss, labels)

    # -- forward ---------------------------------------------------------------------------
    def forward_items(self, step: int) -> tuple[list[TraceItem], int]:
        """Events of every stack's forward, and the bytes deferred to the end of the forward."""
        items: list[TraceItem] = _steps(self.graph.outside_forward, Phase.FORWARD, step)
        if self.embed_gather_bytes:
            label = "gathered embedding"
            items.append(Event(self.embed_gather_bytes, _TMP, Phase.FORWARD, step, label))
        if self.tail_from_start and self.tail_gather_bytes:
            label = "gathered embedding and final norm"
            items.append(Event(self.tail_gather_bytes, _TMP, Phase.FORWARD, step, label))
        deferred = 0
        for index, stack in enumerate(self.graph.stacks):
            stack_items, stack_deferred = self._stack_forward(index, stack, step)
            items += stack_items
            deferred += stack_deferred
        return items, deferred

    def _stack_forward(self, index: int, stack: Stack, step: int) -> tuple[list[TraceItem], int]:
        bounds = self.boundaries[index]
        model_locals = stack.embed.model_locals
        items: list[TraceItem] = list(
            forward_events(
                stack.embed,
                phase=Phase.FORWARD,
                step=step,
                keep_saved=self.autograd,
                keep=[stack.embed_out, *model_locals, *_grad_leaves(stack)],
                categories=self._embed_categories(index),
            ).events
        )
        items += self._shared_events(stack, step, "alloc")
        cache: dict[tuple[int, bool, Category, Category, bool], _LayerForward] = {}
        keys = []
        deferred = 0
        # Tensors made for the stack that later checkpointed layers keep as arguments are
        # saved for backward (a recomputation makes temporaries).
        held_category = self._stack_held_category(stack)
        stack_made = dict.fromkeys(_stack_held(stack), held_category)
        for i, plan in enumerate(stack.layers):
            key = (id(plan.graph), plan.checkpointed, bounds[i], bounds[i + 1], i == 0)
            if key not in cache:
                # The model's `inputs_embeds` keeps the first layer's input alive until the
                # stack's forward returns.
                held = i == 0 and any(t is stack.embed_out for t in model_locals)
                cache[key] = self._layer_forward(
                    plan, key[2], key[3], step, hold_input=held, stack_made=stack_made
                )
            keys.append(key)
            deferred += cache[key].deferred_bytes
        items += _compress([cache[k].events for k in keys], keys)
        if stack.norm_out is not stack.norm_in:
            items += forward_events(
                stack.norm,
                phase=Phase.FORWARD,
                step=step,
                keep_saved=self.autograd,
                keep=[stack.norm_out],
                categories=self._norm_categories(index),
            ).events
        items += self._shared_events(stack, step, "forward")
        if self._stack_held_release(stack) is None:
            items += _stack_held_events(stack, Phase.FORWARD, step, _TMP)
        items += self._release_locals(stack, step)
        return items, deferred

    def _stack_held_release(self, stack: Stack) -> int | None:
        """The layer after whose backward the tensors one layer made for the whole stack die:
        the first later checkpointed layer keeps them as arguments (None: the stack's forward
        drops them when it returns)."""
        if not self.autograd:
            return None
        return next((i for i, p in enumerate(stack.layers) if i and p.checkpointed), None)

    def _stack_held_category(self, stack: Stack) -> Category:
        return _TMP if self._stack_held_release(stack) is None else _ACT

    def _release_locals(self, stack: Stack, step: int, *, outer: bool = False) -> list[Event]:
        """The model forward returns: its locals (inputs_embeds ...) die unless still needed;
        ``outer``: those a method's forward around the model keeps, which die after the loss."""
        saved = stack.embed.saved_storage_ids() if self.autograd else frozenset()
        index = self.graph.stacks.index(stack)
        released = []
        leaves = _grad_leaves(stack)
        for t in stack.embed.model_locals:
            if any(t is o for o in stack.embed.outer_locals) != outer:
                continue
            if t is stack.embed_out:  # handed to the first layer: kept when that layer holds it
                if stack.layers and self.boundaries[index][0] is _TMP:
                    released.append((t, "inputs_embeds released"))
            elif id(t.storage) not in saved and t not in leaves:
                released.append((t, f"{t.label} released"))
        phase = Phase.LOSS if outer else Phase.FORWARD
        return [
            Event(-allocation_bytes(t.nbytes), _TMP, phase, step, label) for t, label in released
        ]

    def _embed_categories(self, index: int) -> dict[Tensor, Category]:
        """The embedding's output is the first layer's input (or the final norm's)."""
        return {self.graph.stacks[index].embed_out: self.boundaries[index][0]}

    def _norm_categories(self, index: int) -> dict[Tensor, Category]:
        """The final norm reads the last layer's output and hands on the stack's output."""
        stack = self.graph.stacks[index]
        return {
            stack.norm_in: self.boundaries[index][-1],
            stack.norm_out: self._stack_output_category(index),
        }

    def _loss_categories(self) -> dict[Tensor, Category]:
        return {self.graph.loss_in: self.loss_boundary}

    def _stack_output_category(self, index: int) -> Category:
        if index == len(self.graph.stacks) - 1:
            return self.loss_boundary
        reader = self.graph.stacks[index + 1]
        # The reader's layers save the encoder output, or checkpointed ones keep it as an
        # argument until their backward.
        held = (
            self.autograd
            and reader.cross_input is not None
            and any(
                p.checkpointed or _saves(p.graph.segment, p.graph.shared[0])
                for p in reader.layers
                if p.graph.shared
            )
        )
        return _ACT if held else _TMP

    def _layer_forward(
        self,
        plan: LayerPlan,
        in_cat: Category,
        out_cat: Category,
        step: int,
        *,
        hold_input: bool = False,
        stack_made: dict[Tensor, Category] | None = None,
    ) -> _LayerForward:
        lg = plan.graph
        keep = [lg.output, lg.input] if plan.checkpointed or hold_input else [lg.output]
        keep += self._cache_held(lg.segment) + lg.segment.stack_held
        result = forward_events(
            lg.segment,
            phase=Phase.FORWARD,
            step=step,
            keep_saved=self.autograd and not plan.checkpointed,
            keep=keep,
            defer=lg.segment.autocast_cached,
            categories={**(stack_made or {}), lg.input: in_cat, lg.output: out_cat},
        )
        deferred = sum(allocation_bytes(t.nbytes) for t in result.deferred)
        return _LayerForward(self._gathered(result.events, Phase.FORWARD, step), deferred)

    def _cache_held(self, seg: Segment) -> list[Tensor]:
        """Tensors of ``seg`` a KV cache holds past the layer (those autograd saves live on
        until the layer's backward instead)."""
        return [t for t in seg.cache_held if not (self.autograd and _saves(seg, t))]

    def _gathered(
        self, events: list[Event], phase: Phase, step: int, *, prefetch: bool = True
    ) -> list[Event]:
        if self.held_layer_bytes:
            return self._held_gathered(events, phase, step)
        if not self.gather_bytes:
            return events
        size = self.gather_bytes
        if not prefetch:
            size += self.last_prefetch_bytes - self.prefetch_bytes
        size = allocation_bytes(size)
        return [
            Event(size, _TMP, phase, step, "gathered parameters"),
            *self._handoff(phase, step),
            *events,
            Event(-size, _TMP, phase, step, "gathered parameters"),
        ]

    def _handoff(self, phase: Phase, step: int) -> list[Event]:
        """FSDP2's forward: the previous all-gather output, alive through this copy-out."""
        if phase is not Phase.FORWARD or not self.layer_gather_bytes:
            return []
        size, label = self.layer_gather_bytes, "previous all-gather output"
        return [Event(size, _TMP, phase, step, label), Event(-size, _TMP, phase, step, label)]

    def _held_gathered(self, events: list[Event], phase: Phase, step: int) -> list[Event]:
        """FSDP2 SHARD_GRAD_OP: all-gathered for the forward, resharded after the backward."""
        size, output = self.held_layer_bytes, "all-gather output"
        unsharded = "unsharded parameters"
        if phase is Phase.BACKWARD:
            return [*events, Event(-size, _TMP, phase, step, f"{unsharded} (resharded)")]
        return [
            Event(size, _TMP, phase, step, output),
            Event(size, _TMP, phase, step, unsharded),
            *self._handoff(phase, step),
            *events,
            Event(-size, _TMP, phase, step, output),
        ]

    def _shared(self, stack: Stack) -> list[tuple[str, int, str]]:
        """Tensors a stack's forward makes once and every layer reads: (label, bytes, lifetime).

        Rotary cos/sin are ``saved`` when the rotary multiplications keep them for backward;
        they and the eager causal mask are ``held`` by checkpointed layers (the checkpoint keeps
        its arguments) until the layers' backward ends; otherwise they die with the
        ``forward`` of the stack (locals of the model's forward).
        """
        if not stack.layers:
            return []
        graphs = list({id(p.graph): p.graph for p in stack.layers}.values())
        held = self.autograd and any(p.checkpointed for p in stack.layers)
        out = []
        # A decoder's first shared tensor is the encoder output, made by the encoder stack.
        first = 1 if stack.cross_input is not None else 0
        for i, tensor in enumerate(graphs[0].shared[first:], start=first):
            saved = self.autograd and any(_saves(g.segment, g.shared[i]) for g in graphs)
            life = "saved" if saved else "held" if held else "forward"
            out.append((tensor.label, allocation_bytes(tensor.nbytes), life))
        size = allocation_bytes(stack.mask_bytes)
        out += [("causal mask", size, "held" if held else "forward")] * stack.num_masks
        out += [
            (label, allocation_bytes(nbytes), "held" if held else "forward")
            for label, nbytes in stack.shared_tensors
        ]
        return out

    def _shared_events(self, stack: Stack, step: int, when: str) -> list[Event]:
        """Allocations (``when="alloc"``) or the frees due at the end of the stack's forward
        (``"forward"``) or after its layers' backward (``"backward"``)."""
        events = []
        for label, size, life in self._shared(stack):
            category = _ACT if life == "saved" else _TMP
            if when == "alloc":
                events.append(Event(size, category, Phase.FORWARD, step, label))
            elif (when == "forward") == (life == "forward"):
                phase = Phase.FORWARD if when == "forward" else Phase.BACKWARD
                events.append(Event(-size, category, phase, step, label))
        return events

    # -- loss ------------------------------------------------------------------------------
    def loss_items(self, step: int, deferred_bytes: int) -> list[TraceItem]:
        g = self.graph
        result = forward_events(
            g.loss,
            phase=Phase.LOSS,
            step=step,
            keep_saved=self.autograd,
            keep=[g.logits, g.loss_out],
            categories=self._loss_categories(),
        )
        items: list[TraceItem] = []
        tail, label = self.tail_gather_bytes, "gathered final norm and LM head"
        if self.tail_from_start:
            tail = 0
        last_label = "last layer's all-gather output"
        if tail:
            handoff = self.handoff_gather_bytes
            items += [Event(handoff, _TMP, Phase.LOSS, step, last_label)]
            items += [Event(tail, _TMP, Phase.LOSS, step, f"{label} (all-gather output)")]
            items += [Event(tail, _TMP, Phase.LOSS, step, label)]
            items += [Event(-handoff, _TMP, Phase.LOSS, step, last_label)]
        if self.last_gather_bytes:
            items.append(Event(self.last_gather_bytes, _TMP, Phase.LOSS, step, last_label))
        items += result.events
        if tail:
            items.append(Event(-tail, _TMP, Phase.LOSS, step, f"{label} (all-gather output)"))
        if self.last_gather_bytes:
            items.append(Event(-self.last_gather_bytes, _TMP, Phase.LOSS, step, last_label))
        items += _steps(g.forward_end, Phase.LOSS, step)
        for stack in g.stacks:
            items += self._release_locals(stack, step, outer=True)
        # The training loop drops the model output before backward: its KV cache (peft's
        # prefix DynamicCache) and the logits; the autocast weight cache is cleared when the
        # forward's autocast context exits.
        for stack in g.stacks:
            for plan in stack.layers:
                for t in self._cache_held(plan.graph.segment):
                    size = allocation_bytes(t.nbytes)
                    items.append(Event(-size, _TMP, Phase.LOSS, step, "KV cache dropped"))
        if g.logits.storage is not g.loss_out.storage and not _saves(g.loss, g.logits):
            items.append(
                Event(
                    -allocation_bytes(g.logits.nbytes),
                    Category.LOGITS,
                    Phase.LOSS,
                    step,
                    "model output dropped",
                )
            )
        if not self.autograd:  # no backward consumes the loss: it goes with the outputs
            items.append(
                Event(
                    -allocation_bytes(g.loss_out.nbytes),
                    Category.LOGITS,
                    Phase.LOSS,
                    step,
                    "loss dropped",
                )
            )
        if deferred_bytes:
            items.append(Event(-deferred_bytes, _TMP, Phase.LOSS, step, "autocast cache cleared"))
        for index, stack in enumerate(g.stacks[:-1]):
            if (
                self._stack_output_category(index) is _TMP
            ):  # encoder output dropped with the outputs
                items.append(
                    Event(
                        -allocation_bytes(stack.norm_out.nbytes),
                        _TMP,
                        Phase.LOSS,
                        step,
                        "encoder output dropped",
                    )
                )
        return items

    # -- backward --------------------------------------------------------------------------
    def backward_items(
        self, step: int, *, accumulate: bool, first_step: bool = True
    ) -> list[TraceItem]:
        """``first_step``: an optimizer stepping inside backward creates its state."""
        self._first_step = first_step
        g = self.graph
        # loss.backward() seeds the loss's gradient with ones_like(loss) (autograd's
        # _make_grads); it and the loss are held until backward returns.
        seed = allocation_bytes(g.loss_out.nbytes)
        items: list[TraceItem] = [Event(seed, Category.LOGITS, Phase.BACKWARD, step, "loss seed")]
        events, grads = backward_events(
            g.loss,
            phase=Phase.BACKWARD,
            step=step,
            output_grads={id(g.loss_out): (g.loss_out.nbytes, Category.LOGITS)},
            accumulate=accumulate,
            categories=self._loss_categories(),
            held_output_grads=True,
            first_step=first_step,
        )
        items += events
        if self.tail_gather_bytes and not self.tail_from_start:
            label = "gathered final norm and LM head"
            items.append(Event(-self.tail_gather_bytes, _TMP, Phase.BACKWARD, step, label))
        reduce = self.reduce_buffer_bytes
        if self._untied_tail_reduce:
            label = "reduce-scatter input (final norm and LM head)"
            items.append(Event(self.tail_reduce_bytes, _TMP, Phase.BACKWARD, step, label))
        grad = grads.get(id(g.loss_in))
        cross_grad: GradBytes | None = None
        held: list[list[int]] = []
        for index in reversed(range(len(g.stacks))):
            stack = g.stacks[index]
            if index < len(g.stacks) - 1:
                grad = cross_grad
                if self._stack_output_category(index) is _ACT:  # the decoder layers held it
                    items.append(
                        Event(
                            -allocation_bytes(stack.norm_out.nbytes),
                            _ACT,
                            Phase.BACKWARD,
                            step,
                            "encoder output released",
                        )
                    )
            stack_items, grad, cross_grad = self._stack_backward(
                index, stack, grad, step, accumulate, held
            )
            items += stack_items
        if self.embed_gather_bytes:
            label = "gathered embedding"
            items.append(Event(-self.embed_gather_bytes, _TMP, Phase.BACKWARD, step, label))
        if reduce:
            items.append(Event(-reduce, _TMP, Phase.BACKWARD, step, "reduce-scatter input"))
        items += self._tail_items(step, accumulate, held)
        if self.tail_from_start and self.tail_gather_bytes:
            label = "gathered embedding and final norm"
            items.append(Event(-self.tail_gather_bytes, _TMP, Phase.BACKWARD, step, label))
        # The graph is freed: leaves made for a stack go, with their .grad.
        for stack in g.stacks:
            for t in _stack_held(stack, leaves=True):
                size = allocation_bytes(t.nbytes)
                category = self._stack_held_category(stack)
                items.append(Event(-size, category, Phase.BACKWARD, step, f"{t.label} freed"))
                items.append(Event(-size, _TMP, Phase.BACKWARD, step, f"{t.label}.grad freed"))
        items += [
            Event(-seed, Category.LOGITS, Phase.BACKWARD, step, label)
            for label in ("loss seed", "loss released")
        ]
        return items

    def _tail_items(self, step: int, accumulate: bool, held: list[list[int]]) -> list[TraceItem]:
        """The method's backward outside the layers (releasing the gradients the layers left
        it, ``held``) and the gradients written when backward ends."""
        before: list[Step] = [(-nbytes, "grad") for layer in held for nbytes in layer]
        after: list[Step] = []
        if self.graph.outside_backward is not None:
            before, after = self.graph.outside_backward(held)
        items: list[TraceItem] = _steps(before, Phase.BACKWARD, step)
        for g in self.graph.tail_grads:
            size = allocation_bytes(g.grad_bytes)
            if accumulate or g.accumulates:
                items.append(Event(size, _TMP, Phase.BACKWARD, step, f"{g.label} grad"))
                items.append(Event(-size, _TMP, Phase.BACKWARD, step, f"{g.label} grad"))
            else:
                items.append(
                    Event(size, Category.GRADIENTS, Phase.BACKWARD, step, f"{g.label}.grad")
                )
                items += step_in_backward_events(g, step, first_step=self._first_step)
        return items + _steps(after, Phase.BACKWARD, step)

    def _stack_backward(
        self,
        index: int,
        stack: Stack,
        grad: GradBytes | None,
        step: int,
        accumulate: bool,
        held: list[list[int]],
    ) -> tuple[list[TraceItem], GradBytes | None, GradBytes | None]:
        """Backward of one stack; ``held`` gathers the gradients its layers leave the method."""
        bounds = self.boundaries[index]
        items: list[TraceItem] = []
        if stack.norm_out is not stack.norm_in:
            events, grads = backward_events(
                stack.norm,
                phase=Phase.BACKWARD,
                step=step,
                output_grads={id(stack.norm_out): grad} if grad else {},
                accumulate=accumulate,
                categories=self._norm_categories(index),
                first_step=self._first_step,
            )
            items += events
            grad = grads.get(id(stack.norm_in))
        # A leaf made for the stack gets its .grad from the last layer's backward on.
        items += [
            Event(allocation_bytes(t.nbytes), _TMP, Phase.BACKWARD, step, f"{t.label}.grad")
            for t in _stack_held(stack, leaves=True)
        ]
        cross: GradBytes | None = None
        cache: dict[tuple[object, ...], tuple[list[Event], list[list[int]]]] = {}
        keys = []
        release = self._stack_held_release(stack)
        # FSDP2: the last layer's post-backward makes its reduce-scatter input and frees the
        # tail unit's (none with the embedding in the tail: it is reduced at the very end).
        reduce_after = len(stack.layers) - 1 if self._reduce_after_last_layer(index) else None
        for i in reversed(range(len(stack.layers))):
            plan = stack.layers[i]
            key = (
                id(plan.graph),
                plan.checkpointed,
                bounds[i],
                bounds[i + 1],
                cross is not None,
                grad,
                i == release,
                i == reduce_after,
                i == 0 and index == 0,  # the last layer to run backward
            )
            if key not in cache:
                events, grad, layer_cross, layer_held = self._layer_backward(
                    plan, key[2], key[3], grad, step, accumulate, cross, last=bool(key[-1])
                )
                if i == release:
                    events = events + _stack_held_events(stack, Phase.BACKWARD, step, _ACT)
                if i == reduce_after:
                    size, label = self.reduce_buffer_bytes, "reduce-scatter input"
                    events = [*events, Event(size, _TMP, Phase.BACKWARD, step, label)]
                    if self._untied_tail_reduce:
                        tail, label = self.tail_reduce_bytes, f"{label} (final norm and LM head)"
                        events.append(Event(-tail, _TMP, Phase.BACKWARD, step, label))
                cache[key] = events, layer_held
                cross = cross or layer_cross
            keys.append(key)
            held += cache[key][1]
        items += _compress([cache[k][0] for k in keys], keys)
        # The rotary tables die with the last layer that saved them, before the embedding's
        # backward runs.
        items += self._shared_events(stack, step, "backward")
        if grad is not None and stack.embed_out.requires_grad:
            events, _ = backward_events(
                stack.embed,
                phase=Phase.BACKWARD,
                step=step,
                output_grads={id(stack.embed_out): grad},
                accumulate=accumulate,
                categories=self._embed_categories(index),
                first_step=self._first_step,
            )
            items += events
        elif grad is not None:
            items.append(Event(-allocation_bytes(grad[0]), grad[1], Phase.BACKWARD, step, "grad"))
        items += [
            Event(-allocation_bytes(t.nbytes), _TMP, Phase.BACKWARD, step, f"{t.label} released")
            for t in _grad_leaves(stack)
        ]
        return items, None, cross

    def _reduce_after_last_layer(self, index: int) -> bool:
        return bool(self.reduce_buffer_bytes) and index == len(self.graph.stacks) - 1

    @property
    def _untied_tail_reduce(self) -> bool:
        return bool(self.tail_reduce_bytes) and not self.tail_from_start

    def _layer_backward(
        self,
        plan: LayerPlan,
        in_cat: Category,
        out_cat: Category,
        grad: GradBytes | None,
        step: int,
        accumulate: bool,
        cross: GradBytes | None,
        *,
        last: bool = False,
    ) -> tuple[list[Event], GradBytes | None, GradBytes | None, list[list[int]]]:
        """Events of one layer's backward, the gradients of its input and of the encoder
        output it reads, and the bytes of gradients it leaves the method's own inputs."""
        lg = plan.graph
        categories = {lg.input: in_cat, lg.output: out_cat}
        events: list[Event] = []
        # A checkpointed layer's input is held by the checkpoint until its backward is done.
        checkpoint_holds = [lg.input] if plan.checkpointed else []
        recompute = None
        if plan.checkpointed:  # non-reentrant checkpoint: recomputed at the first unpack
            recompute = (
                recompute_stop(lg.segment)[0],
                forward_events(
                    lg.segment,
                    phase=Phase.BACKWARD,
                    step=step,
                    keep_saved=True,
                    keep=checkpoint_holds,
                    early_stop=True,
                    categories=categories,
                ).events,
            )
        if grad is None:
            return (recompute[1] if recompute else []), None, None, []
        bwd, grads = backward_events(
            lg.segment,
            phase=Phase.BACKWARD,
            step=step,
            output_grads={id(lg.output): grad},
            accumulate=accumulate,
            recompute=recompute,
            keep=checkpoint_holds,
            categories=categories,
            first_step=self._first_step,
        )
        events += bwd
        if plan.checkpointed:
            events.append(
                Event(
                    -allocation_bytes(lg.input.nbytes),
                    in_cat,
                    Phase.BACKWARD,
                    step,
                    "checkpointed layer input",
                )
            )
        # Gradients of the method's inputs (prefix keys/values) wait for its own backward.
        known = {id(lg.input), *(id(t) for t in lg.shared)}
        left = [nbytes for tid, (nbytes, _) in grads.items() if tid not in known]
        held = [left] if left else []
        new_cross = None
        for shared in lg.shared:
            got = grads.get(id(shared))
            if got is None:
                continue
            if cross is None:  # the first decoder layer's gradient of the encoder output stays
                new_cross = got
            else:  # later layers add theirs into it
                events.append(
                    Event(
                        -allocation_bytes(got[0]),
                        got[1],
                        Phase.BACKWARD,
                        step,
                        "encoder output grad accumulated",
                    )
                )
        # FSDP2 all-gathers the layer again in its pre-backward and prefetches the next one
        # (_fsdp_state.py _pre_backward, _fsdp_param_group.py _backward_prefetch).
        events = self._gathered(events, Phase.BACKWARD, step, prefetch=not last)
        return events, grads.get(id(lg.input)), new_cross, held


def _steps(steps: Sequence[Step], phase: Phase, step: int) -> list[TraceItem]:
    """Events of a method's steps outside the layers (temporaries)."""
    return [
        Event(allocation_bytes(n) if n > 0 else -allocation_bytes(-n), _TMP, phase, step, label)
        for n, label in steps
    ]


def _stack_held(stack: Stack, *, leaves: bool | None = None) -> list[Tensor]:
    """Tensors a layer made for every layer of its stack; ``leaves``: only those that
    require grad (leaves autograd keeps, with their .grad, until the graph is freed), or only
    the others (None: all)."""
    graphs = {id(p.graph): p.graph for p in stack.layers}.values()
    return [
        t
        for g in graphs
        for t in g.segment.stack_held
        if leaves is None or t.requires_grad == leaves
    ]


def _stack_held_events(stack: Stack, phase: Phase, step: int, category: Category) -> list[Event]:
    """The release of the tensors a layer made for every layer of its stack."""
    return [
        Event(-allocation_bytes(t.nbytes), category, phase, step, f"{t.label} released")
        for t in _stack_held(stack, leaves=False)
    ]


def _grad_leaves(stack: Stack) -> list[Tensor]:
    """Embedding outputs made leaves that require grad (peft's enable_input_require_grads on a
    frozen table: an output that requires grad while none of its op's inputs do) that nothing
    else keeps for backward: autograd's AccumulateGrad node holds them, and the gradient it
    stores in their ``.grad``, until the graph is freed after backward (the first layer's
    input and saved tensors are released with their readers)."""
    saved = stack.embed.saved_storage_ids()
    return [
        op.output
        for op in stack.embed.ops
        if not any(t.requires_grad for t in op.inputs)
        and not op.param_grads
        and op.output.requires_grad
        and op.output is not stack.embed_out
        and id(op.output.storage) not in saved
    ]


def _compress(chunks: list[list[Event]], keys: Sequence[object]) -> list[TraceItem]:
    """Run-length encode the layer schedule into Repeats of its repeating pattern."""
    items: list[TraceItem] = []
    i = 0
    while i < len(keys):
        span = _period(keys[i:])
        block = keys[i : i + span]
        times = 1
        while keys[i + times * span : i + (times + 1) * span] == block:
            times += 1
        events = tuple(e for chunk in chunks[i : i + span] for e in chunk)
        items.append(Repeat(events, times, "layers"))
        i += times * span
    return items


def _period(keys: Sequence[object]) -> int:
    """Length of the pattern that repeats from the start of ``keys`` (every-k checkpointing)."""
    for p in range(1, min(len(keys), 16) + 1):
        reps = len(keys) // p
        if reps >= 2 and all(keys[j] == keys[j % p] for j in range(reps * p)):
            return p
    return 1

"""Record every tensor-storage allocation and free of a torch program, storage by storage.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every aten op's outputs pass through it, and
the first time it sees an output's untyped storage it records an allocation of
``storage.nbytes()``; a weakref finalizer on the storage records the free (the mechanism of
PyTorch's ``torch/distributed/_tools/mem_tracker.py``). Ops run inside a kernel below the mode
(custom ops, fused kernels) show only their outputs, like a CUDA kernel's scratch that never
reaches the caching allocator.

A storage first seen as the output of a view or in-place op existed before tracking began
(a tensor built outside, e.g. a constant held by a library): it is *external*, and neither its
allocation nor its free is counted. Frees that happen together are listed in allocation order.

A tensor subclass that wraps others (DTensor: FSDP2's sharded parameters, their gradients
and optimizer states) has no storage of its own: the tracker follows it to the plain tensors it
holds (``__tensor_flatten__``), as PyTorch's MemTracker does. A storage resized in place
(FSDP2 frees and re-allocates its unsharded parameters with ``UntypedStorage.resize_``, which
no aten op reports) is reported by the caller through :meth:`MemoryTracker.resized`.

Categories are decided per storage after the fact (see :class:`StorageRecord`): the runner marks
weights, gradients and optimizer state; the pack hook of ``saved_tensors_hooks`` marks tensors
saved for backward; the phase at allocation marks logits. :meth:`MemoryTracker.trace` then
turns the raw events into a :class:`memplan.trace.Trace` with byte counts rounded to the
caching allocator's 512-byte blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from memplan.torchsim.records import Placement, RawEvent, StorageRecord
from memplan.trace import ALLOCATION_GRANULARITY_BYTES, Category, Event, Phase, Trace

ALL_PLACEMENTS = tuple(Placement)


def rounded_bytes(num_bytes: int, granularity_bytes: int) -> int:
    """``num_bytes`` rounded up to whole blocks (512: the CUDA caching allocator, 1: exact)."""
    if num_bytes <= 0:
        return 0
    return -(-num_bytes // granularity_bytes) * granularity_bytes


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    if tensor.device.type == "meta":  # holds no memory (e.g. host-side RNG state of a kernel)
        return None
    try:
        return tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):  # sparse and other storage-less layouts
        return None


def plain_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor``, or the plain tensors a wrapper subclass (DTensor) holds, recursively."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from plain_tensors(inner)
    else:
        yield tensor


class MemoryTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Dispatch mode that keeps one :class:`StorageRecord` per storage and a list of events."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.phase = Phase.LOAD
        self.step = 0
        self.logits_window = False  # backward has not yet left the LM head
        self.backward_context = ""  # decoder layer being differentiated
        self.records: list[StorageRecord] = []
        self.events: list[RawEvent] = []
        self._modules: list[str] = []
        self._live: dict[int, tuple[StorageRecord, weakref.ref[Any]]] = {}
        self._held: dict[int, int] = {}  # record index -> bytes it holds now
        self._closed = False

    # -- what runs now ---------------------------------------------------------------------

    def set_phase(self, phase: Phase, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step

    def push_module(self, name: str) -> None:
        self._modules.append(name)

    def pop_module(self) -> None:
        if self._modules:
            self._modules.pop()

    def rename_module(self, name: str) -> None:
        """Replace the innermost module name (materialization walks modules one by one)."""
        if self._modules:
            self._modules[-1] = name

    @property
    def context(self) -> str:
        """The innermost running module, else the layer whose backward runs, else ''."""
        if self._modules:
            return self._modules[-1]
        return self.backward_context

    # -- observing storages -----------------------------------------------------------------

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self._closed:
            return out
        outputs, _ = tree_flatten(out)
        op = func.overloadpacket.__name__
        allocates = _allocates(func)
        for position, value in enumerate(outputs):
            if isinstance(value, torch.Tensor):
                source = partial(_source_record, self, args, position)
                for plain in plain_tensors(value):
                    self._observe(plain, op, source, allocates)
        return out

    def observe(self, tensor: torch.Tensor) -> StorageRecord | None:
        """The record of ``tensor``'s storage (of the first plain tensor a subclass holds);
        an unseen one is external (made before)."""
        records = [
            self._observe(plain, "external", lambda: None, allocates=False)
            for plain in plain_tensors(tensor)
        ]
        return next((r for r in records if r is not None), None)

    def resized(self, tensor: torch.Tensor, op: str = "resize_") -> StorageRecord | None:
        """Record the new size of ``tensor``'s storage after an in-place ``resize_``; an
        unseen storage is new (allocated by the resize)."""
        if self._closed:
            return None
        return self._observe(tensor, op, lambda: None, allocates=True)

    def record_of(self, tensor: torch.Tensor) -> StorageRecord | None:
        tensor = next(plain_tensors(tensor), tensor)
        storage = _storage(tensor)
        entry = None if storage is None else self._live.get(id(storage))
        return None if entry is None else entry[0]

    def _observe(
        self,
        tensor: torch.Tensor,
        op: str,
        source: Callable[[], StorageRecord | None],
        allocates: bool,
    ) -> StorageRecord | None:
        storage = _storage(tensor)
        if storage is None:
            return None
        key = id(storage)
        nbytes = int(storage.nbytes())
        entry = self._live.get(key)
        if entry is not None:
            record = entry[0]
            held = self._held.get(record.index, 0)
            if held != nbytes and not record.external:  # resize_ in place
                self._emit(record, held, nbytes)
            return record
        record = self._new_record(tensor, nbytes, op, self.context)
        record.external = not allocates
        if not record.module:
            record.source = source()
        ref = weakref.ref(storage, partial(self._freed, key, record.index))
        self._live[key] = (record, ref)
        if allocates:
            self._emit(record, 0, nbytes)
        return record

    def _new_record(self, tensor: torch.Tensor, nbytes: int, op: str, module: str) -> StorageRecord:
        if self.phase is Phase.BACKWARD:
            node = torch._C._current_autograd_node()
            op = f"{node.name()}:{op}" if node is not None else op
        in_loss = self.phase is Phase.LOSS or (self.phase is Phase.BACKWARD and self.logits_window)
        record = StorageRecord(
            index=len(self.records),
            nbytes=nbytes,
            op=op,
            module=module,
            shape=tuple(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            phase=self.phase,
            step=self.step,
            in_logits_window=in_loss,
        )
        self.records.append(record)
        return record

    def _freed(self, key: int, index: int, _ref: object) -> None:
        self._live.pop(key, None)
        record = self.records[index]
        held = self._held.get(index, 0)
        if not self._closed and not record.external and held:
            self._emit(record, held, 0)

    def _emit(self, record: StorageRecord, old_nbytes: int, new_nbytes: int) -> None:
        if new_nbytes:
            record.nbytes = new_nbytes
        self._held[record.index] = new_nbytes
        self.events.append(
            RawEvent(record.index, old_nbytes, new_nbytes, self.phase, self.step, self.context)
        )

    def close(self) -> None:
        """Stop recording: later frees (interpreter teardown) are not part of the program."""
        self._closed = True

    # -- classification ---------------------------------------------------------------------

    def mark_weight(self, tensor: torch.Tensor, category: Category, name: str) -> None:
        record = self.observe(tensor)
        if record is not None:
            record.weight_category, record.name = category, name

    def mark_gradient(self, tensor: torch.Tensor, name: str) -> None:
        record = self.observe(tensor)
        if record is not None:
            record.is_gradient, record.name = True, name

    def mark_optimizer_state(
        self, tensor: torch.Tensor, name: str, placement: Placement = Placement.DEVICE
    ) -> None:
        record = self.observe(tensor)
        if record is not None and record.weight_category is None:
            record.is_optimizer_state, record.name, record.placement = True, name, placement

    def mark_gathered(self, tensor: torch.Tensor) -> None:
        record = self.observe(tensor)
        if record is not None:
            record.is_gathered = True

    def mark_saved(self, tensor: torch.Tensor) -> None:
        record = self.observe(tensor)
        if record is not None:
            record.is_saved = True

    @contextmanager
    def saving_hooks(self) -> Iterator[None]:
        """Mark every tensor autograd saves for backward, recomputed ones included."""

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.mark_saved(tensor)
            return tensor.detach()  # a view: holding the tensor itself would make a cycle

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, _identity),
            _marking_recomputed(self.mark_saved),
        ):
            yield

    # -- results ----------------------------------------------------------------------------

    def trace(
        self,
        source: str,
        *,
        placements: Sequence[Placement] = (Placement.DEVICE,),
        granularity_bytes: int = ALLOCATION_GRANULARITY_BYTES,
    ) -> Trace:
        """The events of storages in ``placements`` as a Trace, sizes rounded to blocks."""
        return Trace(source=source, items=list(self.trace_events(placements, granularity_bytes)))

    def trace_events(
        self, placements: Sequence[Placement], granularity_bytes: int
    ) -> Iterator[Event]:
        for raw, record in self.raw_events(placements):
            delta = rounded_bytes(raw.new_nbytes, granularity_bytes) - rounded_bytes(
                raw.old_nbytes, granularity_bytes
            )
            if delta:
                yield Event(delta, record.category, raw.phase, raw.step, record.label)

    def raw_events(
        self, placements: Sequence[Placement] = ALL_PLACEMENTS
    ) -> Iterator[tuple[RawEvent, StorageRecord]]:
        """Events in order; frees with no allocation between them in allocation order.

        Frees that happen together have no defined order (autocast's cache is a hash map):
        listing them by allocation keeps traces deterministic and changes no total that is
        reached at an allocation, so no peak.
        """
        block: list[RawEvent] = []
        for raw in [*self.events, None]:
            if raw is not None and raw.new_nbytes == 0 and (not block or _together(block[0], raw)):
                block.append(raw)
                continue
            for freed in sorted(block, key=lambda e: e.record):
                yield from self._placed(freed, placements)
            block = [raw] if raw is not None and raw.new_nbytes == 0 else []
            if raw is not None and raw.new_nbytes:
                yield from self._placed(raw, placements)

    def _placed(
        self, raw: RawEvent, placements: Sequence[Placement]
    ) -> Iterator[tuple[RawEvent, StorageRecord]]:
        record = self.records[raw.record]
        if record.placement in placements:
            yield raw, record

    def live_records(self) -> Iterable[StorageRecord]:
        return [record for record, _ in self._live.values()]


def _together(first: RawEvent, other: RawEvent) -> bool:
    return (first.phase, first.step, first.context) == (other.phase, other.step, other.context)


def _identity(tensor: Any) -> Any:
    return tensor


def _allocates(func: Any) -> bool:
    """Whether the op's outputs are new storage, not views or in-place results of inputs.

    An unseen storage returned as an alias existed before tracking began (a tensor made
    outside the tracker). ``lift_fresh`` aliases the tensor ``torch.tensor(data)`` just
    built outside the dispatcher, so its output is new storage.
    """
    if func.overloadpacket.__name__.startswith("lift_fresh"):
        return True
    return not any(ret.alias_info is not None for ret in func._schema.returns)


def _source_record(
    tracker: MemoryTracker, args: tuple[Any, ...], position: int
) -> StorageRecord | None:
    """The input an allocation made outside any module derives from (its label's owner).

    Optimizer and zero-grad ops run outside modules: a ``_foreach_*`` op's i-th output belongs
    to the i-th tensor of its first list argument, other ops to their first tensor input.
    """
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and position < len(first):
        candidates: list[Any] = [first[position]]
    else:
        candidates = list(args)
    for tensor in candidates:
        if isinstance(tensor, torch.Tensor):
            record = tracker.record_of(tensor)
            if record is not None:
                return record
    return None


@contextmanager
def _marking_recomputed(mark: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Also mark tensors that non-reentrant checkpointing saves while recomputing a layer.

    torch.utils.checkpoint stores recomputed saved tensors through its own
    ``_recomputation_hook`` (a saved_tensors_hooks that shadows ours), so wrap its pack hook.
    """
    import torch.utils.checkpoint as checkpoint

    original = getattr(checkpoint, "_recomputation_hook", None)
    if original is None:  # pragma: no cover - torch without non-reentrant checkpointing
        yield
        return

    class _MarkingRecomputationHook(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            inner: Callable[[torch.Tensor], Any] = self.pack_hook  # type: ignore[has-type]

            def marking_pack(tensor: torch.Tensor) -> Any:
                mark(tensor)
                return inner(tensor)

            self.pack_hook = marking_pack

    checkpoint._recomputation_hook = _MarkingRecomputationHook  # type: ignore[misc]
    try:
        yield
    finally:
        checkpoint._recomputation_hook = original  # type: ignore[misc]

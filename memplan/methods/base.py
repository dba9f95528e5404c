"""What a fine-tuning method is: one class that knows what trains and what it adds.

A method module (``memplan/methods/<name>.py``) defines a subclass of :class:`TuningMethod`
and binds an instance to ``METHOD``. The instance knows:

- its typical setup (``defaults``, applied to fields the caller leaves out and reported as
  assumptions) and which setups it refuses (``check_setup``) or models it cannot run on
  (``unsupported``);
- which of the base model's tensors train (``trains``) and which tensors it adds
  (``added_params``);
- what it does to the step: to a linear layer's forward (``linear``), to the output of an
  attention or MLP branch (``branch_output``), to the keys and values (``attention_kv``), and
  what it runs outside the layers (``outside_forward``, ``outside_backward``, ``tail_grads``);
- how it is applied to a torch model (``apply``, through peft where peft has it);
- the lines it adds to a plan's assumptions (``assumptions``).

Quantization of the frozen weights is not a method: it is ``TrainingSetup.quant``, applied to
any method that leaves the linear weights frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memplan.dtypes import DType

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.architecture import Architecture, ParamKind
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


Step = tuple[int, str]
"""Bytes allocated (positive) or freed (negative) outside the layers, and a label."""


@dataclass(frozen=True, slots=True)
class AddedParam:
    """``count`` identical tensors a method adds to the model (trainable unless it says so)."""

    label: str
    numel: int  # elements of one tensor on this rank (after tensor parallelism)
    count: int
    full_numel: int  # elements of one whole tensor (for the trainable-parameter count)
    dtype: DType
    shape: tuple[int, ...] = ()
    # False: added to a module no op of the step runs (a vision tower under text-only inputs):
    # it trains, but gets no .grad and so no optimizer state.
    in_step: bool = True
    trainable: bool = True  # False: a frozen buffer (VeRA's shared projections)


class TuningMethod:
    """A fine-tuning method; the base class trains nothing and adds nothing."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line for ``--help`` and tables."""
    rank: ClassVar[int] = 100
    """Position in lists of methods (lower first)."""
    defaults: ClassVar[Mapping[str, Any]] = {"precision": "bf16", "optimizer": "adamw"}
    """Typical setup of the method, for fields the caller leaves out."""
    trains_weights: ClassVar[bool] = True
    """False for forward-only runs (no backward, no optimizer)."""
    uses_lora: ClassVar[bool] = False
    peft: ClassVar[bool] = False
    """Applied through peft: a PeftModel whose adapters can be disabled (trl's DPO reference)."""
    """Adds LoRA adapters to linear layers (the LoRA settings apply)."""
    adds_matmul_params: ClassVar[bool] = False
    """Its trainable tensors sit in every token's matmul path (adapters: they cost forward
    and weight-gradient FLOPs; memplan.throughput)."""
    allows_quantized_base: ClassVar[bool] = True
    """The frozen linear weights may be quantized (False when the method trains them)."""
    needs_transformers: ClassVar[bool] = False
    """The tracer applies it through peft on a transformers model only (not on the plain-torch
    reference decoder)."""
    setting_fields: ClassVar[tuple[str, ...]] = ()
    """TrainingSetup fields that configure this method (others' settings are refused)."""

    # -- setup ---------------------------------------------------------------------------------
    def check_setup(self, setup: TrainingSetup) -> None:
        """Raise ValueError (one line, naming the field) for a setup this method refuses."""
        from memplan.dtypes import Quantization

        if setup.quant is not Quantization.NONE and not self.allows_quantized_base:
            raise ValueError(
                f"quant={setup.quant.value} freezes the linear weights: method={self.name} "
                "cannot train them (use a method that keeps them frozen: lora, qlora, ...)"
            )

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        """Why this method cannot run ``setup`` on ``spec`` (None: it can)."""
        return None

    # -- parameters -------------------------------------------------------------------------------
    def trains(self, kind: ParamKind, *, bias: bool) -> bool:
        """Whether a base-model tensor of ``kind`` trains (``bias``: it is a bias term)."""
        return False

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """Tensors the method adds to the model (this rank's tensor-parallel share)."""
        return []

    def norm_targets(self, spec: ModelSpec) -> tuple[str, ...]:
        """Norm modules (names or dotted suffixes) whose forward runs a trainable copy."""
        return ()

    # -- the step -------------------------------------------------------------------------------
    def linear_input(
        self, seg: Segment, ctx: StepContext, x: Tensor, spec: LinearSpec, *, quantized: bool
    ) -> Tensor:
        """The input the base layer of a linear receives, given the layer's input ``x``."""
        return x

    def linear(
        self,
        seg: Segment,
        ctx: StepContext,
        x: Tensor,
        out: Tensor,
        spec: LinearSpec,
        *,
        quantized: bool,
    ) -> Tensor:
        """The output of a linear layer of input ``x`` whose base output is ``out``."""
        return out

    def branch_output(self, seg: Segment, ctx: StepContext, x: Tensor, label: str) -> Tensor:
        """The output of an attention or MLP branch before the residual addition."""
        return x

    def attention_kv(
        self, seg: Segment, ctx: StepContext, k: Tensor, v: Tensor, kv_width: int
    ) -> tuple[Tensor, Tensor]:
        """Keys and values as attention reads them."""
        return k, v

    def virtual_tokens(self, setup: TrainingSetup) -> int:
        """Positions the method prepends to every sequence the model runs (prompt tuning)."""
        return 0

    def inputs_embeds(self, seg: Segment, ctx: StepContext, x: Tensor) -> Tensor:
        """The model's ``inputs_embeds`` given the word embeddings ``x`` of the batch's tokens
        (the last of ``seg.model_locals``)."""
        return x

    def kv_prefix_len(self, setup: TrainingSetup) -> int:
        """Key/value positions added in front of the sequence in every attention layer."""
        return 0

    def outside_forward(self, spec: ModelSpec, ctx: StepContext) -> list[Step]:
        """Temporaries the method allocates (+bytes) and frees (-bytes) before the layers run,
        in order; what stays allocated is the layers' input (``attention_kv``), freed there."""
        return []

    def forward_end(self, spec: ModelSpec, ctx: StepContext) -> list[Step]:
        """Temporaries of ``outside_forward`` released when the method's forward returns,
        after the model's loss."""
        return []

    def outside_backward(
        self, spec: ModelSpec, ctx: StepContext, held: Sequence[Sequence[int]]
    ) -> tuple[list[Step], list[Step]]:
        """Temporaries of the method's backward once the layers' is done: the steps before its
        ``tail_grads`` are written and those after. ``held``: bytes of the gradients each layer
        left for the method's inputs, per layer in backward order; these steps release them."""
        return [(-nbytes, "grad") for layer in held for nbytes in layer], []

    def tail_grads(self, spec: ModelSpec, ctx: StepContext) -> list[ParamGrad]:
        """Gradients the method's own tensors outside the layers get when backward ends."""
        return []

    # -- torch ------------------------------------------------------------------------------------
    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        """``built.model`` (a torch model on the meta device) prepared for this method."""
        model = built.model
        model.requires_grad_(False)
        return model

    # -- words ------------------------------------------------------------------------------------
    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        """Lines this method adds to a plan's assumptions."""
        return []

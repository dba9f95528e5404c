"""What a model family is: one class that knows its config, parameters and step graph.

A family module (``memplan/families/<name>.py``) defines a subclass of :class:`ModelFamily` and
binds an instance to ``FAMILY``. The instance knows, for its Hugging Face ``model_type``\\ s:

- how to read a ``config.json`` into :class:`memplan.specs.ModelSpec` fields, with the defaults
  of the transformers configuration class (``read_config``) and its typed layout details
  (``layout_type``);
- every parameter tensor the transformers implementation registers (``blocks``);
- the ops of its embedding, its layers, its final norm and its head, as the analytical model
  replays them (``embedding``, ``layer``, ``final_norm``, ``head``), built from the shared op
  builders of :mod:`memplan.analytic.blocks` and :mod:`memplan.analytic.layers`;
- peft's default LoRA targets (``lora_roles``) and the transformers class a tracer builds
  (``hf_class``);
- a tiny catalog model the oracle grid traces (``tiny_model``).

Nothing here imports torch: the tracer asks for class *names* and imports them itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.analytic.layers import LayerGraph
    from memplan.analytic.model_graph import StackBuilder, Stacks
    from memplan.architecture import Block
    from memplan.dtypes import DType
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import Attention, LinearRole, TrainingSetup

Config = Mapping[str, Any]
"""A parsed ``config.json``."""


class Layout(BaseModel):
    """Family-specific details of a model, read from its config.json (none by default).

    A family with details of its own subclasses this with typed, documented fields;
    ``ModelSpec.layout`` holds an instance of its family's class.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelFamily:
    """One model family; subclasses override what differs from a Llama-style causal LM."""

    name: ClassVar[str]
    """``ModelSpec.family``; by convention the transformers ``model_type``."""
    model_types: ClassVar[tuple[str, ...]]
    """config.json ``model_type`` values this family reads (mT5 is read by T5)."""
    tiny_model: ClassVar[str]
    """Catalog name of a tiny model of this family (traced on CPU by the oracle grid)."""
    layout_type: ClassVar[type[Layout]] = Layout
    lora_roles: ClassVar[tuple[LinearRole, ...]] = ("q", "v")
    """peft's default LoRA targets as roles (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)."""
    lora_expert_roles: ClassVar[tuple[LinearRole, ...]] = ()
    """Roles whose peft target name its transformers-v5 MoE conversion turns into a parameter
    target (``target_parameters``, lora.ParamWrapper): LoRA there is not modeled."""
    causal: ClassVar[bool] = True
    """A decoder whose eager attention reads an additive causal mask (create_causal_mask)."""
    num_eager_masks: ClassVar[int] = 1
    """Additive (batch, 1, seq, seq) masks a causal model's forward builds for eager attention."""
    adapter_hooks: ClassVar[tuple[str, str] | None] = None
    """Modules of a layer (dotted paths from it, negative indices count from the end) whose
    outputs get the attention and the MLP bottleneck adapter, in every layer stack; None: the
    layer's attention and MLP blocks, found by their usual names."""
    cached_weight_casts: ClassVar[bool] = True
    """torch.autocast caches the 16-bit cast of a linear's fp32 weight (F.linear reads the
    parameter itself); False where the model multiplies by a view (``weight.T``), which
    autocast never caches (aten/src/ATen/autocast_mode.cpp: ``!arg.is_view()``)."""
    own_loss: ClassVar[str] = ""
    """What the family's head computes instead of a causal LM's head and shifted cross-entropy
    (a masked-LM head, logit soft-capping): the losses of ``TrainingSetup.loss`` other than
    ``full`` are modelled for a plain causal LM head only."""
    traced_only: ClassVar[bool] = False
    """No analytical model: the tracer runs it, ``plan`` refuses it (unregistered families)."""

    # -- config.json -------------------------------------------------------------------------
    def read_config(self, config: Config) -> dict[str, Any]:
        """``ModelSpec`` fields from ``config`` (raises ValueError with a short message)."""
        raise NotImplementedError

    def layout(self, spec: ModelSpec) -> Any:
        """``spec.layout``, typed as this family's layout class."""
        return spec.layout

    # -- parameters ---------------------------------------------------------------------------
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        """Every parameter tensor, grouped into (repeated) blocks."""
        raise NotImplementedError

    def rotary_dim(self, spec: ModelSpec) -> int:
        """Dimensions per head with rotary embeddings (0: no rotary; sizes inv_freq buffers)."""
        return spec.head_dim if spec.position_embedding == "rope" else 0

    def buffers(self, spec: ModelSpec) -> tuple[tuple[str, int, DType], ...]:
        """Buffers the model registers besides the rotary tables: (name, elements, dtype)."""
        return ()

    def layer_period(self, spec: ModelSpec) -> int:
        """Layers after which the layers' kinds repeat (1: every layer alike); a traced model's
        layers are folded in groups of this many."""
        return 1

    def rotary_tables(self, spec: ModelSpec) -> int:
        """inv_freq / original_inv_freq buffer pairs of the rotary embedding (Gemma3: one pair
        per layer type)."""
        return 1

    def sliding_window(self, spec: ModelSpec) -> int | None:
        """Span of sliding-window attention in tokens (None: every layer attends to all)."""
        window = getattr(spec.layout, "sliding_window", None)
        return window if isinstance(window, int) else None

    def sdpa_window(self, spec: ModelSpec) -> int | None:
        """The sliding window every layer's SDPA mask applies (None: a plain causal mask,
        which SDPA replaces by ``is_causal=True`` when it can)."""
        return None

    # -- transformers ------------------------------------------------------------------------
    hf_model_class: ClassVar[str]
    """The transformers class of a training run (decoders: their *ForCausalLM class)."""

    def hf_class(self, config: Config) -> str:
        """The transformers class a config is built as: what memplan lays out, what the catalog
        counts and what the tracer runs."""
        return self.hf_model_class

    def attention(self, requested: Attention) -> Attention:
        """The attention implementation transformers runs when ``requested`` is asked for."""
        return requested

    # -- the step's graph ----------------------------------------------------------------------
    def stacks(self, spec: ModelSpec, ctx: StepContext, build: StackBuilder) -> Stacks:
        """The layer stacks of one forward: one decoder stack for decoder-only models."""
        return build.single(spec, ctx, self.layer, spec.num_layers)

    def embedding(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        seg: Segment,
        *,
        output_requires_grad: bool,
        stack: str = "model",
    ) -> Tensor:
        """The embedding ops of the model's forward (of ``stack``: encoder-decoder models have
        two); returns the first layer's input."""
        from memplan.analytic.head import token_embedding

        x = token_embedding(spec, ctx, seg, output_requires_grad=output_requires_grad)
        return ctx.method.inputs_embeds(seg, ctx, x)

    def layer(self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
        raise NotImplementedError

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        """The norm after the last layer of ``stack`` (``x`` itself when there is none)."""
        from memplan.analytic.blocks import rms_norm

        return rms_norm(seg, ctx, x, "norm", spec.hidden_size)

    def head(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment
    ) -> tuple[Tensor, Tensor]:
        """Output head and loss: (loss, logits)."""
        from memplan.analytic.head import causal_lm_loss

        return causal_lm_loss(spec, ctx, x, seg)

    def tail_grads(self, spec: ModelSpec, ctx: StepContext) -> list[ParamGrad]:
        """Gradients of parameters used outside the layer graphs, written as backward ends."""
        return []

    def loss_refusal(self, spec: ModelSpec) -> str:
        """What ``spec``'s head computes instead of a plain causal LM head ('' when plain)."""
        return self.own_loss

    # -- methods ---------------------------------------------------------------------------------
    def unsupported(self, spec: ModelSpec, method: str) -> str | None:
        """Why ``method`` cannot run on ``spec`` (None: it can)."""
        return None

    # -- words -----------------------------------------------------------------------------------
    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        """Lines this family adds to a plan's assumptions."""
        return []

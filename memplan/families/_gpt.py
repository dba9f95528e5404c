"""What the GPT-style families share: pre-LayerNorm blocks with a plain MLP, a final ``ln_f``.

GPT-2, GPT-NeoX, Falcon, BLOOM and OPT subclass :class:`PreLnFamily` and name their modules
(``style``; Falcon builds its own layer); each says whether its embedding applies dropout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from memplan.families.base import ModelFamily

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.analytic.layers import LayerGraph, PreLnStyle
    from memplan.specs.model import ModelSpec


class PreLnFamily(ModelFamily):
    """A decoder of pre-LayerNorm blocks (attention and MLP, sequential or parallel)."""

    embedding_dropout: ClassVar[bool] = False
    """The model's forward applies hidden dropout to the embeddings (GPT-2 ``drop``)."""

    def style(self, spec: ModelSpec) -> PreLnStyle:
        raise NotImplementedError

    def embedding(
        self,
        spec: ModelSpec,
        ctx: StepContext,
        seg: Segment,
        *,
        output_requires_grad: bool,
        stack: str = "model",
    ) -> Tensor:
        x = self.embeddings(spec, ctx, seg, output_requires_grad=output_requires_grad)
        if not self.embedding_dropout:
            return x
        from memplan.analytic.blocks import dropout

        return dropout(seg, ctx, x, spec.hidden_dropout, "embed_dropout")

    def embeddings(
        self, spec: ModelSpec, ctx: StepContext, seg: Segment, *, output_requires_grad: bool
    ) -> Tensor:
        """The lookups before dropout (token embeddings; positions where the family has them)."""
        return super().embedding(spec, ctx, seg, output_requires_grad=output_requires_grad)

    def layer(self, spec: ModelSpec, ctx: StepContext, *, input_requires_grad: bool) -> LayerGraph:
        from memplan.analytic.layers import pre_ln_layer

        return pre_ln_layer(
            spec, ctx, input_requires_grad=input_requires_grad, style=self.style(spec)
        )

    def final_norm(
        self, spec: ModelSpec, ctx: StepContext, x: Tensor, seg: Segment, *, stack: str = "model"
    ) -> Tensor:
        from memplan.analytic.blocks import layer_norm

        return layer_norm(seg, ctx, x, "ln_f", spec.hidden_size)

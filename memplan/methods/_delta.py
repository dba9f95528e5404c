"""What LoHa and LoKr share: a full-size delta weight rebuilt in every forward.

peft's LyCORIS layers (``peft/tuners/lycoris_utils.py``, ``LycorisLayer``) build the adapter's
whole ``out x in`` weight from small factors (``get_delta_weight``) each time the layer runs,
cast the input to that weight's dtype (fp32: peft autocasts adapters) and add
``F.linear(x, delta_weight)`` to the frozen layer's output, cast back to the input's dtype
(``LoHaLayer.forward``, ``LoKrLayer.forward``). The matmul keeps the cast input and the delta
weight for backward: one ``out x in`` fp32 tensor per targeted layer and micro-batch.

peft replaces ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` only (``layers_mapping``): not
transformers' ``Conv1D`` (GPT-2), nor bitsandbytes' layers, whose packed 4-bit weight has no
``out x in`` shape to rebuild.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

from memplan.methods.base import AddedParam, TuningMethod
from memplan.methods.lora import lora_roles, targeted_linears

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


# Families whose projections are transformers' Conv1D (modeling_gpt2), no nn.Linear.
CONV1D_FAMILIES: Final = frozenset({"gpt2"})


class DeltaWeightMethod(TuningMethod):
    """A LyCORIS-style method: adapters on the targeted linears, rebuilt into a full weight."""

    adds_matmul_params = True
    rank = 12
    peft_name: ClassVar[str]
    """The method's name in peft's error messages and our assumptions (LoHa, LoKr)."""

    # -- what subclasses say ------------------------------------------------------------------
    def rank_alpha(self, setup: TrainingSetup) -> tuple[int, float]:
        raise NotImplementedError

    def factors(self, out_features: int, in_features: int, r: int) -> list[tuple[str, int, int]]:
        """The trainable tensors of one adapted linear: (name, rows, columns)."""
        raise NotImplementedError

    def delta_weight(
        self,
        seg: Segment,
        ctx: StepContext,
        spec: LinearSpec,
        grads: list[ParamGrad],
    ) -> Tensor:
        """The ops of ``get_delta_weight``: the fp32 ``out x in`` delta weight; ``grads``
        are the factors' gradients, in the order of :meth:`factors`."""
        raise NotImplementedError

    def peft_config(self, setup: TrainingSetup, targets: list[str]) -> Any:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        from memplan.architecture import ParamKind, architecture
        from memplan.families import family

        fam = family(spec.family)
        if spec.family in CONV1D_FAMILIES:
            return (
                f"peft {self.peft_name} adapts nn.Linear/nn.Conv1d/nn.Conv2d only "
                f"(layers_mapping): {spec.name}'s projections are transformers Conv1D"
            )
        experts = sorted(lora_roles(spec, setup) & set(fam.lora_expert_roles))
        if experts and spec.is_moe:
            return (
                f"lora_targets {','.join(experts)} on {spec.name}: the MoE experts are 3-D "
                f"parameters, no nn.Linear that peft {self.peft_name} could adapt; target the "
                "attention projections (q,k,v,o)"
            )
        if targeted_linears(spec, setup):
            return None
        have = sorted(
            {
                str(t.role)
                for _, t in architecture(spec).tensors()
                if t.kind is ParamKind.LINEAR and t.role and t.copies == 1
            }
        )
        wanted = ",".join(sorted(lora_roles(spec, setup)))
        return (
            f"lora_targets {wanted} select no linear layer of {spec.name} "
            f"(its linear layers: {', '.join(have)})"
        )

    def check_setup(self, setup: TrainingSetup) -> None:
        from memplan.dtypes import Quantization

        if setup.quant is not Quantization.NONE:
            # peft dispatches LyCORIS layers by type (layers_mapping) with no bitsandbytes
            # variant; the packed 4-bit weight has no out x in shape to rebuild.
            raise ValueError(
                f"method={self.name} cannot adapt quantized linears (quant="
                f"{setup.quant.value}): peft {self.peft_name} has no bitsandbytes layer"
            )
        super().check_setup(setup)

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """The factors of each targeted linear. Under tensor parallelism each rank adapts its
        shard of the linear (column-parallel: out / tp rows; row-parallel: in / tp columns)
        and rebuilds that shard's delta weight (the shapes ``linear`` sees)."""
        from memplan.architecture import ROW_PARALLEL_ROLES, ParamKind

        r, _ = self.rank_alpha(setup)
        tp = ctx.tensor_parallel_degree
        out: list[AddedParam] = []
        for block, t in arch.tensors():
            if t.kind is not ParamKind.LINEAR or t.copies != 1 or not ctx.has_lora(t.role):
                continue
            row_parallel = t.role in ROW_PARALLEL_ROLES
            in_share = -(-t.in_features // tp) if row_parallel else t.in_features
            out_share = t.out_features if row_parallel else -(-t.out_features // tp)
            full = self.factors(t.out_features, t.in_features, r)
            shard = self.factors(out_share, in_share, r)
            name = t.name.removesuffix(".weight")
            for (part, rows, cols), (_, full_rows, full_cols) in zip(shard, full, strict=False):
                out.append(
                    AddedParam(
                        f"{block.name}.{name}.{part}",
                        rows * cols,
                        block.repeat,
                        full_rows * full_cols,
                        ctx.adapter_dtype,
                        (rows, cols),
                        in_step=t.in_step,  # on a module the step never runs: no .grad
                    )
                )
        return out

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
        """``result + F.linear(x.to(delta.dtype), delta)``, then ``.to(x.dtype)``."""
        from memplan.analytic.blocks import cast, promote

        if not ctx.has_lora(spec.role) or spec.copies != 1:
            return out
        assert ctx.setup is not None
        r, _ = self.rank_alpha(ctx.setup)
        label = spec.label
        a_dtype = ctx.adapter_dtype
        grads = [
            ctx.param_grad(f"{label}.{part}", rows * cols, trainable=True, dtype=a_dtype)
            for part, rows, cols in self.factors(spec.out_features, spec.in_features, r)
        ]
        delta = self.delta_weight(seg, ctx, spec, grads)
        rows = x.numel // spec.in_features
        numel_w = spec.in_features * spec.out_features
        # _cast_input_dtype: the input in the delta weight's dtype.
        xc = cast(seg, x, delta.dtype, f"{label}.delta_input_cast")
        if ctx.amp:  # autocast casts both operands; a non-leaf weight's cast is not cached
            xm = cast(seg, xc, ctx.compute_dtype, f"{label}.delta_linear.input_cast")
            wm = cast(seg, delta, ctx.compute_dtype, f"{label}.delta_linear.weight_cast")
            lin_dtype = ctx.compute_dtype
        else:
            xm, wm, lin_dtype = xc, delta, delta.dtype
        # mm saves the input for the weight's gradient, the weight for the input's.
        h = seg.op(
            f"{label}.delta_linear",
            [xm, wm],
            rows * spec.out_features,
            lin_dtype,
            saves=[xm, wm if xm.requires_grad else None],
        )
        # The delta weight and the cast input are locals of _get_delta_activations.
        seg.hold(xc, delta, label=f"{label}.delta_locals")
        # result + delta activations promotes; .to(previous_dtype) casts back.
        summed = seg.op(
            f"{label}.delta_add",
            [out, h],
            out.numel,
            promote(out.dtype, h.dtype),
            passthrough_grad=True,
        )
        result = cast(seg, summed, x.dtype, f"{label}.delta_output_cast")
        seg.hold(x, label=f"{label}.input")
        del numel_w
        return result

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        """peft ``get_peft_model`` with the method's config on the roles' modules."""
        from peft import get_peft_model

        from memplan.architecture import lora_module_names

        built.model.requires_grad_(False)
        names = lora_module_names(spec)
        targets = sorted({names[r] for r in lora_roles(spec, setup) if r in names})
        return get_peft_model(built.model, self.peft_config(setup, targets))

    def target_modules(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        from memplan.architecture import ParamKind, architecture, lora_module_names

        roles = lora_roles(spec, setup)
        targeted = {
            t.role
            for _, t in architecture(spec).tensors()
            if t.kind is ParamKind.LINEAR and t.role in roles and t.copies == 1
        }
        names = lora_module_names(spec)
        return sorted(names[r] for r in targeted if r is not None)

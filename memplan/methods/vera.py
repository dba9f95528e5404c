"""VeRA (Kopiczko et al. 2024) as peft's ``VeraConfig`` applies it.

One pair of frozen random projections is shared by every adapted layer: ``vera_A``
(r x largest in_features) and ``vera_B`` (largest out_features x r), registered once
(``VeraModel._init_vera_A_vera_B``, a ``BufferDict`` each layer refers to), fp32 as
``_kaiming_init`` makes them. Each targeted linear trains two
vectors only, ``vera_lambda_b`` (out) and ``vera_lambda_d`` (r), fp32 (peft autocasts
adapters). Its forward (``peft/tuners/vera/layer.py``, ``Linear.forward``) slices the
projections to its shape and adds
``lambda_b * F.linear(lambda_d * F.linear(x, A[:, :in]), B[:out, :])``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from memplan.dtypes import DType, dtype_bytes
from memplan.methods.base import AddedParam, TuningMethod
from memplan.methods.lora import lora_roles, targeted_linears

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


def _targeted(arch: Architecture, ctx: StepContext) -> list[tuple[Any, Any]]:
    from memplan.architecture import ParamKind

    return [
        (block, t)
        for block, t in arch.tensors()
        if t.kind is ParamKind.LINEAR and t.copies == 1 and ctx.has_lora(t.role)
    ]


def _module_names(spec: ModelSpec, setup: TrainingSetup) -> set[str]:
    from memplan.architecture import ParamKind, architecture, lora_module_names

    roles = lora_roles(spec, setup)
    names = lora_module_names(spec)
    return {
        names[t.role]
        for _, t in architecture(spec).tensors()
        if t.kind is ParamKind.LINEAR and t.role in roles and t.copies == 1 and t.role in names
    }


class VeRA(TuningMethod):
    name = "vera"
    summary = "shared frozen random projections, trainable scaling vectors (peft VeRA)"
    rank = 14
    adds_matmul_params = True
    setting_fields: ClassVar[tuple[str, ...]] = ("vera_r", "lora_targets", "adapter_dtype")

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        from memplan.families import family

        experts = sorted(lora_roles(spec, setup) & set(family(spec.family).lora_expert_roles))
        if experts and spec.is_moe:
            return (
                f"lora_targets {','.join(experts)} on {spec.name}: the MoE experts are 3-D "
                "parameters, no linear layer peft VeRA could adapt; target the attention "
                "projections (q,k,v,o)"
            )
        if not targeted_linears(spec, setup):
            wanted = ",".join(sorted(lora_roles(spec, setup)))
            return f"lora_targets {wanted} select no linear layer of {spec.name}"
        return None

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """lambda_b (out) and lambda_d (r) per adapted linear; vera_A and vera_B once.

        Under tensor parallelism a column-parallel linear's lambda_b is split with its
        output rows; lambda_d and the shared projections are replicated."""
        from memplan.architecture import ROW_PARALLEL_ROLES

        r, tp = setup.vera_r, ctx.tensor_parallel_degree
        targeted = _targeted(arch, ctx)
        out: list[AddedParam] = []
        for block, t in targeted:
            name = f"{block.name}.{t.name.removesuffix('.weight')}"
            rows = t.out_features if t.role in ROW_PARALLEL_ROLES else -(-t.out_features // tp)
            for part, share, numel in (
                ("vera_lambda_b", rows, t.out_features),
                ("vera_lambda_d", r, r),
            ):
                out.append(
                    AddedParam(
                        f"{name}.{part}",
                        share,
                        block.repeat,
                        numel,
                        ctx.adapter_dtype,
                        in_step=t.in_step,  # on a module the step never runs: no .grad
                    )
                )
        # The shared projections (VeraModel._init_vera_A_vera_B), fp32 buffers made once.
        max_in = max((t.in_features for _, t in targeted), default=0)
        max_out = max((t.out_features for _, t in targeted), default=0)
        for part, numel in (("vera_A", r * max_in), ("vera_B", max_out * r)):
            out.append(AddedParam(part, numel, 1, numel, DType.FP32, trainable=False))
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
        """``result + lambda_b * F.linear(lambda_d * F.linear(x, A), B)``, cast back.

        The input is cast to the vectors' dtype (``_cast_input_dtype``). The projections
        are frozen: each matmul keeps only its weight (a slice of a buffer) for the input's
        gradient; each ``lambda *`` product keeps the matmul's output for the vector's
        gradient, which its backward computes as a full-size product before reducing it to
        the vector. Under autocast the matmuls cast their operands (the projections every
        time: buffers are not cached) and the products promote back to fp32.
        """
        from memplan.analytic.blocks import cast, promote

        if not ctx.has_lora(spec.role) or spec.copies != 1:
            return out
        assert ctx.setup is not None
        label, r = spec.label, ctx.setup.vera_r
        rows = x.numel // spec.in_features
        a_dtype = ctx.adapter_dtype
        lambda_d = ctx.param_grad(f"{label}.vera_lambda_d", r, trainable=True, dtype=a_dtype)
        lambda_b = ctx.param_grad(
            f"{label}.vera_lambda_b", spec.out_features, trainable=True, dtype=a_dtype
        )
        base = out
        if quantized:  # Bnb4bitBackend.maybe_clone_base_result: "defensively clone"
            base = seg.op(f"{label}.clone", [out], out.numel, out.dtype, passthrough_grad=True)
        xc = cast(seg, x, a_dtype, f"{label}.vera_input_cast")

        def project(h: Tensor, out_features: int, in_features: int, name: str) -> Tensor:
            """F.linear(h, sliced projection): a frozen fp32 buffer slice."""
            if not ctx.amp:
                return seg.op(f"{label}.{name}", [h], rows * out_features, h.dtype)
            hm = cast(seg, h, ctx.compute_dtype, f"{label}.{name}.input_cast")
            w = seg.op(
                f"{label}.{name}.weight_cast",
                [],
                out_features * in_features,
                ctx.compute_dtype,
                requires_grad=False,
            )
            return seg.op(
                f"{label}.{name}",
                [hm, w],
                rows * out_features,
                ctx.compute_dtype,
                saves=[w if hm.requires_grad else None],
            )

        h1 = project(xc, r, spec.in_features, "vera_A")
        d_dtype = promote(a_dtype, h1.dtype)
        h2 = seg.op(
            f"{label}.vera_lambda_d",
            [h1],
            rows * r,
            d_dtype,
            saves=[h1],
            param_grads=[lambda_d],
            bwd_workspace_bytes=h1.numel * dtype_bytes(d_dtype),
        )
        h3 = project(h2, spec.out_features, r, "vera_B")
        b_dtype = promote(a_dtype, h3.dtype)
        h4 = seg.op(
            f"{label}.vera_lambda_b",
            [h3],
            h3.numel,
            b_dtype,
            saves=[h3],
            param_grads=[lambda_b],
            bwd_workspace_bytes=h3.numel * dtype_bytes(b_dtype),
        )
        summed = seg.op(
            f"{label}.vera_add",
            [base, h4],
            base.numel,
            promote(base.dtype, h4.dtype),
            passthrough_grad=True,
        )
        # result.to(orig_dtype) (the base output's), then .to(previous_dtype) (the input's).
        result = cast(seg, summed, out.dtype, f"{label}.vera_output_cast")
        result = cast(seg, result, x.dtype, f"{label}.vera_input_dtype_cast")
        # forward's x, rebound to the cast input, lives until it returns.
        seg.hold(x, xc, label=f"{label}.input")
        return result

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        """peft ``get_peft_model`` with ``VeraConfig`` on the roles' modules."""
        from peft import VeraConfig, get_peft_model

        from memplan.architecture import lora_module_names

        built.model.requires_grad_(False)
        names = lora_module_names(spec)
        targets = sorted({names[r] for r in lora_roles(spec, setup) if r in names})
        conv1d = any(type(m).__name__ == "Conv1D" for m in built.model.modules())
        config = VeraConfig(r=setup.vera_r, target_modules=targets, fan_in_fan_out=conv1d)
        model = get_peft_model(built.model, config)
        from peft.utils.quantization_utils import Bnb4bitBackend

        from memplan.torchsim.quant import Linear4bit

        # peft resolves bitsandbytes' Linear4bit to its 4-bit backend (resolve_quantization_
        # backend), whose forward clones the base output; memplan's emulated 4-bit layer gets
        # the same backend.
        for module in model.modules():
            if isinstance(getattr(module, "base_layer", None), Linear4bit):
                setattr(module, "quantization_backend", Bnb4bitBackend())  # noqa: B010
        return model

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        modules = sorted(_module_names(spec, setup))
        return [
            f"VeRA r={setup.vera_r} on {', '.join(modules)} (peft VeraConfig: "
            "vera_dropout 0, d_initial 0.1); trainable lambda_b (out) and lambda_d (r) "
            f"vectors in {setup.adapter_dtype.value} per layer; the frozen random projections "
            "vera_A (r x largest in) and vera_B (largest out x r) stored once, in fp32, and "
            "sliced to each layer's shape"
        ]


METHOD = VeRA()

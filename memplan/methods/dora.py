"""DoRA (Liu et al. 2024, arXiv:2402.09353) as peft runs it: LoRA with ``use_dora=True``.

Each targeted linear gets LoRA's ``lora_A`` and ``lora_B`` and a trainable magnitude vector
(one value per output feature, ``lora_magnitude_vector``). Every forward recomputes the norm
of ``W + scaling * B @ A`` per output row (peft ``DoraLinearLayer.forward``): the adapter's
product is built from an identity matrix (``lora_B(lora_A(eye(in)))``), the base weight is cast
to the input's dtype (dequantized first when it is 4-bit), and these out x in tensors live until
the layer's forward returns; the norm itself is detached. The output adds
``(m / norm - 1) * base + m / norm * lora * scaling`` to the base output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.methods.base import AddedParam
from memplan.methods.lora import LoRA, _adapter_grad, _wider
from memplan.trace import Category

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class DoRA(LoRA):
    name = "dora"
    summary = "weight-decomposed LoRA: adapters plus a magnitude per output (peft use_dora)"
    rank = 15

    def peft_options(self, setup: TrainingSetup) -> dict[str, Any]:
        return {"use_dora": True}

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """LoRA's matrices and the magnitude vector (out_features) of each targeted linear.

        Under tensor parallelism the magnitude splits with the output rows of a
        column-parallel linear and is replicated for a row-parallel one.
        """
        from memplan.architecture import ROW_PARALLEL_ROLES, ParamKind

        out = super().added_params(arch, setup, ctx)
        tp = ctx.tensor_parallel_degree
        for block, t in arch.tensors():
            if t.kind is not ParamKind.LINEAR or t.copies != 1 or not ctx.has_lora(t.role):
                continue
            share = t.out_features if t.role in ROW_PARALLEL_ROLES else -(-t.out_features // tp)
            label = f"{block.name}.{t.name}.lora_magnitude_vector"
            out.append(
                AddedParam(label, share, block.repeat, t.out_features, ctx.adapter_dtype, (share,))
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
        """peft ``lora.Linear.forward`` (or ``lora.bnb.Linear4bit.forward``) with the DoRA
        variant (``DoraLinearVariant.forward`` -> ``DoraLinearLayer.forward``)."""
        from memplan.analytic.blocks import cast, dropout

        if not ctx.has_lora(spec.role) or spec.copies != 1:
            return out
        label = spec.label
        base = out
        if quantized:  # lora.bnb.Linear4bit "defensively" clones the 4-bit output
            base = seg.op(f"{label}.clone", [base], base.numel, base.dtype, passthrough_grad=True)
        # The 4-bit layer casts the input to the adapter dtype only without autocast.
        convert = not (quantized and ctx.amp)
        xa = cast(seg, x, ctx.adapter_dtype, f"{label}.lora_input_cast") if convert else x
        # DoraLinearVariant.forward: with dropout the base output is recomputed from the
        # dropped input (base_result=None), else the layer's output is reused.
        dropped = dropout(seg, ctx, xa, ctx.lora_dropout, f"{label}.lora_dropout")
        lora_weight, saved = _lora_weight(seg, ctx, spec, dropped.dtype)
        weight = _base_weight(seg, ctx, spec, dropped.dtype, quantized=quantized)
        norm = _weight_norm(seg, ctx, spec, weight, lora_weight)
        magnitude = _adapter_grad(ctx, f"{label}.lora_magnitude_vector", spec.out_features)
        # mag_norm_scale = magnitude / weight_norm (the norm is detached: only it is saved).
        scale = seg.op(
            f"{label}.dora_scale",
            [norm],
            spec.out_features,
            _wider(ctx.adapter_dtype, norm.dtype),
            saves=[norm],
            param_grads=[magnitude],
        )
        lora_out = self._lora_product(seg, ctx, dropped, spec)
        if ctx.lora_dropout > 0:
            base_result = _dropped_base(seg, ctx, dropped, weight, spec)
        elif spec.bias:  # base_result - bias
            base_result = seg.op(f"{label}.dora_unbias", [base], base.numel, base.dtype)
        else:
            base_result = base
        dora = _dora_output(seg, scale, base_result, lora_out, label)
        # The locals of DoraLinearLayer.forward die when it returns: the identity and the
        # adapter product (kept by the detached product's graph) and the cast weight.
        seg.hold(*saved, label=f"{label}.dora_graph", autograd_only=True)
        seg.hold(
            lora_weight, *([weight] if weight is not None else []), label=f"{label}.dora_locals"
        )
        result = seg.op(
            f"{label}.lora_add",
            [base, dora],
            base.numel,
            _wider(base.dtype, dora.dtype),
            passthrough_grad=True,
        )
        if convert:  # result.to(torch_result_dtype) / result.to(expected_dtype)
            result = cast(seg, result, base.dtype, f"{label}.lora_output_cast")
        seg.hold(x, xa, label=f"{label}.input")
        return result

    def _lora_product(self, seg: Segment, ctx: StepContext, x: Tensor, spec: LinearSpec) -> Tensor:
        """lora_B(lora_A(x)) (the adapter weights' autocast copies are cached by then)."""
        label, r = spec.label, ctx.lora_r
        rows = x.numel // spec.in_features
        if ctx.amp:
            from memplan.analytic.blocks import cast

            xc = cast(seg, x, ctx.compute_dtype, f"{label}.lora_A.input_cast")
            wa, wb = _weight_casts(seg, ctx, spec)
            h = seg.op(
                f"{label}.lora_A",
                [xc, wa],
                rows * r,
                ctx.compute_dtype,
                saves=[xc, wa if xc.requires_grad else None],
            )
            return seg.op(
                f"{label}.lora_B",
                [h, wb],
                rows * spec.out_features,
                ctx.compute_dtype,
                saves=[h, wb],
            )
        a_grad = _adapter_grad(ctx, f"{label}.lora_A", r * spec.in_features)
        b_grad = _adapter_grad(ctx, f"{label}.lora_B", r * spec.out_features)
        h = seg.op(f"{label}.lora_A", [x], rows * r, x.dtype, saves=[x], param_grads=[a_grad])
        return seg.op(
            f"{label}.lora_B",
            [h],
            rows * spec.out_features,
            x.dtype,
            saves=[h],
            param_grads=[b_grad],
        )

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        lines = super().assumptions(spec, setup)
        lines[0] = "DoRA: " + lines[0] + "; a magnitude vector per targeted output"
        lines.append(
            "DoRA recomputes the weight norm of W + scaling * B @ A in every forward (peft "
            "DoraLinearLayer): an in x in identity, the adapter product and the base weight in "
            "the adapter dtype (dequantized first when 4-bit) live while each layer runs"
            + (
                "; with dropout the base output is recomputed from the cast weight, which "
                "backward keeps"
                if setup.lora_dropout
                else ""
            )
        )
        return lines


def _weight_casts(seg: Segment, ctx: StepContext, spec: LinearSpec) -> tuple[Tensor, Tensor]:
    """Autocast's compute-dtype copies of lora_A and lora_B (cached from their first use, in
    the adapter product, until autocast exits); their gradients reach the adapters' .grad."""
    found = [t for t in seg.autocast_cached if t.label.startswith(f"{seg.label}.{spec.label}.")]
    if len(found) == 2:
        return found[0], found[1]
    r = ctx.lora_r
    casts = []
    for part, numel in (("lora_A", r * spec.in_features), ("lora_B", r * spec.out_features)):
        grad = _adapter_grad(ctx, f"{spec.label}.{part}", numel)
        casts.append(
            seg.op(
                f"{spec.label}.{part}.weight_cast",
                [],
                numel,
                ctx.compute_dtype,
                param_grads=[grad],
            )
        )
    seg.autocast_cached.extend(casts)
    return casts[0], casts[1]


def _lora_weight(
    seg: Segment, ctx: StepContext, spec: LinearSpec, x_dtype: Any
) -> tuple[Tensor, list[Tensor]]:
    """DoraLinearLayer.get_lora_weight: ``lora_B(lora_A(eye(in))).T``, cast to the input's
    dtype; and what its (detached, never back-propagated) graph saves while the product lives,
    when autograd records: the identity (saved by lora_A's matmul) or its autocast copy, and
    lora_A's output."""
    from memplan.analytic.blocks import cast

    label, r = spec.label, ctx.lora_r
    in_f, out_f = spec.in_features, spec.out_features
    # torch.eye in lora_A's dtype
    # Only the detached product is read: no gradient reaches this graph, but its nodes keep
    # what they saved (the identity or its autocast copy, lora_A's output) while it lives.
    dead: dict[str, Any] = {"requires_grad": False}
    kept: dict[str, Any] = {**dead, "category": Category.ACTIVATIONS}
    eye_kept: dict[str, Any] = {} if ctx.amp else {"category": Category.ACTIVATIONS}
    eye = seg.op(
        f"{label}.dora_eye", [], in_f * in_f, ctx.adapter_dtype, requires_grad=False, **eye_kept
    )
    if ctx.amp:
        eye_c = seg.op(f"{label}.dora_eye_cast", [eye], eye.numel, ctx.compute_dtype, **kept)
        wa, wb = _weight_casts(seg, ctx, spec)
        h = seg.op(f"{label}.dora_lora_A", [eye_c, wa], in_f * r, ctx.compute_dtype, **kept)
        product = seg.op(f"{label}.dora_lora_B", [h, wb], in_f * out_f, ctx.compute_dtype, **dead)
        saved = [eye_c, h]
    else:
        h = seg.op(f"{label}.dora_lora_A", [eye], in_f * r, ctx.adapter_dtype, **kept)
        product = seg.op(f"{label}.dora_lora_B", [h], in_f * out_f, ctx.adapter_dtype, **dead)
        saved = [eye, h]
    seg.hold(eye, label=f"{label}.dora_eye_local")  # get_lora_weight's local
    # lora_weight.to(x.dtype) rebinds the local: a 16-bit product dies once cast.
    lora_weight = cast(seg, product, x_dtype, f"{label}.dora_lora_weight_cast")
    return lora_weight, saved


def _base_weight(
    seg: Segment, ctx: StepContext, spec: LinearSpec, x_dtype: Any, *, quantized: bool
) -> Tensor | None:
    """``dequantize_module_weight(base_layer).to(x.dtype)``: the 4-bit weight dequantized
    (QuantState.dtype) and cast; a 16/32-bit weight cast (None: the parameter itself)."""
    from memplan.analytic.blocks import cast

    numel = spec.in_features * spec.out_features
    if quantized:
        deq = seg.op(
            f"{spec.label}.dora_dequantize", [], numel, ctx.quant_state_dtype, requires_grad=False
        )
        return cast(seg, deq, x_dtype, f"{spec.label}.dora_weight_cast")
    if ctx.weight_dtype is x_dtype:
        return None
    return seg.op(f"{spec.label}.dora_weight_cast", [], numel, x_dtype, requires_grad=False)


def _weight_norm(
    seg: Segment, ctx: StepContext, spec: LinearSpec, weight: Tensor | None, lora_weight: Tensor
) -> Tensor:
    """DoraLinearLayer.get_weight_norm: ``linalg.norm(weight + scaling * lora_weight, dim=1)``
    (the sum and the scaled product are its temporaries)."""
    numel = spec.in_features * spec.out_features
    label = spec.label
    scaled = seg.op(f"{label}.dora_scaled", [lora_weight], numel, lora_weight.dtype)
    w_dtype = weight.dtype if weight is not None else ctx.weight_dtype
    inputs = [scaled] + ([weight] if weight is not None else [])
    total = seg.op(f"{label}.dora_sum", inputs, numel, _wider(w_dtype, scaled.dtype))
    return seg.op(f"{label}.dora_norm", [total], spec.out_features, total.dtype)


def _dropped_base(
    seg: Segment, ctx: StepContext, x: Tensor, weight: Tensor | None, spec: LinearSpec
) -> Tensor:
    """``F.linear(x, weight)`` on the dropped input (DoraLinearLayer.forward without
    base_result): mm keeps the cast weight for the input's gradient."""
    from memplan.analytic.blocks import cast

    rows = x.numel // spec.in_features
    numel = spec.in_features * spec.out_features
    label = f"{spec.label}.dora_base"
    if ctx.amp:  # autocast casts both operands (a non-leaf weight is not cached)
        xc = cast(seg, x, ctx.compute_dtype, f"{label}.input_cast")
        wc = seg.op(f"{label}.weight_cast", [], numel, ctx.compute_dtype, requires_grad=False)
        return seg.op(
            label,
            [xc, wc],
            rows * spec.out_features,
            ctx.compute_dtype,
            saves=[wc if xc.requires_grad else None],
        )
    keep = [weight] if weight is not None else []
    return seg.op(
        label,
        [x, *keep],
        rows * spec.out_features,
        x.dtype,
        saves=keep if x.requires_grad else [],
        saves_params=weight is None and x.requires_grad,
    )


def _dora_output(seg: Segment, scale: Tensor, base: Tensor, lora_out: Tensor, label: str) -> Tensor:
    """``(mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling``.

    Each product with the (1, out) scale saves the other operand for the scale's gradient,
    whose backward materializes grad * operand before summing over the rows.
    """
    minus_one = seg.op(f"{label}.dora_scale_m1", [scale], scale.numel, scale.dtype)
    first = seg.op(
        f"{label}.dora_base_mul",
        [minus_one, base],
        base.numel,
        _wider(scale.dtype, base.dtype),
        saves=[base, minus_one if base.requires_grad else None],
        bwd_workspace_bytes=base.numel * 4,
    )
    second = seg.op(
        f"{label}.dora_lora_mul",
        [scale, lora_out],
        lora_out.numel,
        _wider(scale.dtype, lora_out.dtype),
        saves=[lora_out, scale],
        bwd_workspace_bytes=lora_out.numel * 4,
    )
    second = seg.op(f"{label}.dora_scaling", [second], second.numel, second.dtype)
    return seg.op(
        f"{label}.dora_out", [first, second], base.numel, first.dtype, passthrough_grad=True
    )


METHOD = DoRA()

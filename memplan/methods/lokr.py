"""LoKr (Yeh et al. 2023, LyCORIS) as peft's ``LoKrConfig`` applies it.

A targeted ``nn.Linear`` of ``out = a * b`` and ``in = c * d`` (each side factored into the two
divisors nearest its square root, peft ``factorization``) gets ``lokr_w1`` (a x c) and either
``lokr_w2`` (b x d) or, when ``r < max(b, d) / 2``, ``lokr_w2_a`` (b x r) and ``lokr_w2_b``
(r x d), fp32 (``LoKrLayer.update_layer``; ``decompose_both`` off keeps ``lokr_w1`` whole).
Every forward rebuilds the ``out x in`` delta weight as ``torch.kron(w1, w2) * scale``
(``peft/tuners/lokr/layer.py``, ``make_kron``): the Kronecker product, a broadcast ``mul`` of
views of ``w1`` and ``w2`` that keeps both for backward, and its scaled copy, both of full size;
the result is kept by the matmul that applies it (:mod:`memplan.methods._delta`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from memplan.dtypes import dtype_bytes
from memplan.methods._delta import DeltaWeightMethod

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


def factorization(dimension: int) -> tuple[int, int]:
    """The divisor pair ``(m, n)``, ``m <= n``, ``m * n = dimension``, with ``m`` the largest
    divisor not above the square root: what peft's LoKr ``factorization(dimension, -1)``
    arrives at by walking the divisors up while their sum ``m + n`` does not grow.

    >>> factorization(3072), factorization(1024), factorization(127)
    ((48, 64), (32, 32), (1, 127))
    """
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def lokr_factors(out_features: int, in_features: int, r: int) -> list[tuple[str, int, int]]:
    """The trainable tensors of one adapted linear: (name, rows, columns)."""
    a, b = factorization(out_features)
    c, d = factorization(in_features)
    factors = [("lokr_w1", a, c)]
    if r < max(b, d) / 2:  # use_w2 = not (r < max(shape[0][1], shape[1][1]) / 2)
        factors += [("lokr_w2_a", b, r), ("lokr_w2_b", r, d)]
    else:
        factors.append(("lokr_w2", b, d))
    return factors


class LoKr(DeltaWeightMethod):
    name = "lokr"
    summary = "low-rank Kronecker-product adapters, rebuilt into a full delta weight (peft LoKr)"
    rank = 13
    peft_name = "LoKr"
    setting_fields: ClassVar[tuple[str, ...]] = (
        "lokr_r",
        "lokr_alpha",
        "lora_targets",
        "adapter_dtype",
    )

    def rank_alpha(self, setup: TrainingSetup) -> tuple[int, float]:
        return setup.lokr_r, setup.lokr_alpha

    def factors(self, out_features: int, in_features: int, r: int) -> list[tuple[str, int, int]]:
        return lokr_factors(out_features, in_features, r)

    def delta_weight(
        self, seg: Segment, ctx: StepContext, spec: LinearSpec, grads: list[ParamGrad]
    ) -> Tensor:
        """``w2 = w2_a @ w2_b`` (when decomposed), ``torch.kron(w1, w2)``, ``* scale``.

        kron is a broadcast ``mul`` of a (a, 1, c, 1) view of w1 and a (1, b, 1, d) view of
        w2 (ATen ``kron``), which autograd keeps (w2, when it is a product, stays allocated);
        its backward multiplies the full-size gradient by each view and reduces it to the
        view's shape. Multiplying by the Python float ``scale`` keeps nothing; its backward
        makes a scaled copy of the incoming gradient.
        """
        from memplan.analytic.blocks import promote

        assert ctx.setup is not None
        label = spec.label
        numel = spec.out_features * spec.in_features
        a_dtype = ctx.adapter_dtype
        factors = self.factors(spec.out_features, spec.in_features, ctx.setup.lokr_r)
        named = {part: grad for (part, _, _), grad in zip(factors, grads, strict=True)}
        inputs: list[Tensor] = []
        kron_grads = [named["lokr_w1"]]
        if "lokr_w2" in named:
            kron_grads.append(named["lokr_w2"])
            w2_dtype = a_dtype
        else:
            # w2_a @ w2_b: under autocast a compute-dtype matmul of the factors' cached casts.
            (_, b, _), (_, _, d) = factors[1], factors[2]
            w2_dtype = ctx.compute_dtype if ctx.amp else a_dtype
            if w2_dtype is not a_dtype:
                for part, rows, cols in factors[1:]:
                    cast = seg.op(
                        f"{label}.{part}.cast", [], rows * cols, w2_dtype, requires_grad=False
                    )
                    seg.autocast_cached.append(cast)
            w2 = seg.op(
                f"{label}.lokr_w2_product",
                [],
                b * d,
                w2_dtype,
                param_grads=[named["lokr_w2_a"], named["lokr_w2_b"]],
            )
            inputs.append(w2)
        # kron's mul promotes (an fp32 w1 and a compute-dtype product: fp32).
        dtype = promote(a_dtype, w2_dtype)
        # MulBackward0 multiplies the full-size gradient by each view (both products exist
        # at once) before the engine reduces them to the factors' shapes.
        kron = seg.op(
            f"{label}.kron",
            inputs,
            numel,
            dtype,
            saves=inputs,
            param_grads=kron_grads,
            bwd_pre_workspace_bytes=2 * numel * dtype_bytes(dtype),
        )
        return seg.op(f"{label}.kron_scale", [kron], numel, dtype)

    def peft_config(self, setup: TrainingSetup, targets: list[str]) -> Any:
        from peft import LoKrConfig

        return LoKrConfig(
            r=setup.lokr_r,
            alpha=setup.lokr_alpha,  # type: ignore[arg-type]  # peft annotates int
            target_modules=targets,
        )

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return [
            f"LoKr r={setup.lokr_r} alpha={setup.lokr_alpha:g} on "
            f"{', '.join(self.target_modules(spec, setup))} (peft LoKrConfig: decompose_both "
            "off, decompose_factor -1, rank_dropout and module_dropout 0); factors in "
            f"{setup.adapter_dtype.value}; each forward rebuilds the out x in delta weight "
            "(torch.kron(w1, w2) and its scaled copy) and keeps it for backward"
        ]


METHOD = LoKr()

"""LoHa (Hyeon-Woo et al. 2022, FedPara) as peft's ``LoHaConfig`` applies it.

Each targeted ``nn.Linear`` gets ``hada_w1_a``, ``hada_w2_a`` (out x r) and ``hada_w1_b``,
``hada_w2_b`` (r x in), fp32 (peft autocasts adapters). Every forward rebuilds the whole
``out x in`` delta weight as a Hadamard product of two low-rank products
(``peft/tuners/loha/layer.py``, ``HadaWeight.forward``:
``((w1a @ w1b) * (w2a @ w2b)) * scale``): three ``out x in`` temporaries while it runs, the
result kept by the matmul that applies it (:mod:`memplan.methods._delta`). ``HadaWeight``
saves only the factors (parameters) and the 0-d ``scale`` tensor; its backward rebuilds both
products (``HadaWeight.backward``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from memplan.dtypes import DType, dtype_bytes
from memplan.methods._delta import DeltaWeightMethod

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class LoHa(DeltaWeightMethod):
    name = "loha"
    summary = "low-rank Hadamard-product adapters, rebuilt into a full delta weight (peft LoHa)"
    rank = 12
    peft_name = "LoHa"
    setting_fields: ClassVar[tuple[str, ...]] = (
        "loha_r",
        "loha_alpha",
        "lora_targets",
        "adapter_dtype",
    )

    def rank_alpha(self, setup: TrainingSetup) -> tuple[int, float]:
        return setup.loha_r, setup.loha_alpha

    def factors(self, out_features: int, in_features: int, r: int) -> list[tuple[str, int, int]]:
        # LoHaLayer.create_adapter_parameters (Linear): w1_a, w2_a (out, r); w1_b, w2_b (r, in).
        return [
            ("hada_w1_a", out_features, r),
            ("hada_w1_b", r, in_features),
            ("hada_w2_a", out_features, r),
            ("hada_w2_b", r, in_features),
        ]

    def delta_weight(
        self, seg: Segment, ctx: StepContext, spec: LinearSpec, grads: list[ParamGrad]
    ) -> Tensor:
        """HadaWeight.apply(w1a, w1b, w2a, w2b, scale=torch.tensor(scaling)).

        Forward (no graph inside the Function): w1a @ w1b and w2a @ w2b, their product, then
        the product times scale. Backward, while the incoming gradient is still held:
        ``grad_out * scale``, ``w2a @ w2b`` and ``temp = grad * (w2a @ w2b)`` (three ``out x
        in`` tensors, the product freed after), the w1 factors' gradients from ``temp``; then
        ``w1a @ w1b`` and a second ``temp`` before the first is released (four ``out x in``
        tensors at once), and the w2 factors' gradients. Recorded as two ops, so that each
        pair of gradients appears at its moment.
        """
        from memplan.analytic.blocks import promote

        label = spec.label
        numel = spec.out_features * spec.in_features
        a_dtype = ctx.adapter_dtype
        # Under autocast the Function's forward runs autocast: the matmuls cast the factors to
        # the compute dtype (cached, they are leaves that require grad), and the weight comes
        # out in it. Its backward runs outside autocast: the products are in the factors'
        # dtype, and grad * product promotes.
        dtype = ctx.compute_dtype if ctx.amp else a_dtype
        grad_bytes = numel * dtype_bytes(dtype)
        product_bytes = numel * dtype_bytes(a_dtype)
        temp_bytes = numel * dtype_bytes(promote(dtype, a_dtype))
        if dtype is not a_dtype:
            assert ctx.setup is not None
            r = ctx.setup.loha_r
            for part, rows, cols in self.factors(spec.out_features, spec.in_features, r):
                cast = seg.op(f"{label}.{part}.cast", [], rows * cols, dtype, requires_grad=False)
                seg.autocast_cached.append(cast)
        w1_grads, w2_grads = grads[:2], grads[2:]
        # torch.tensor(self.scaling[...]) is made on the host: memory of the step's device
        # only when the step runs on the CPU. HadaWeight saves it for backward.
        saves = []
        if ctx.device == "cpu":
            saves.append(seg.op(f"{label}.hada_scale", [], 1, DType.FP32, requires_grad=False))
        p1 = seg.op(f"{label}.hada_w1", [], numel, dtype, requires_grad=False)
        p2 = seg.op(f"{label}.hada_w2", [], numel, dtype, requires_grad=False)
        prod = seg.op(f"{label}.hada_product", [p1, p2], numel, dtype, requires_grad=False)
        weight = seg.op(
            f"{label}.hada_weight", [prod, *saves], numel, dtype, saves=saves, param_grads=w2_grads
        )
        # The same tensor; its backward (run first) makes the w1 gradients.
        return seg.op(
            f"{label}.hada_weight.w1",
            [weight],
            numel,
            dtype,
            view_of=weight,
            passthrough_grad=True,
            param_grads=w1_grads,
            # grad * scale, w2a @ w2b and the first temp; then the second product and temp.
            bwd_pre_workspace_bytes=grad_bytes + product_bytes + temp_bytes,
            bwd_workspace_bytes=grad_bytes + 2 * temp_bytes + product_bytes,
        )

    def peft_config(self, setup: TrainingSetup, targets: list[str]) -> Any:
        from peft import LoHaConfig

        return LoHaConfig(
            r=setup.loha_r,
            alpha=setup.loha_alpha,  # type: ignore[arg-type]  # peft annotates int
            target_modules=targets,
        )

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return [
            f"LoHa r={setup.loha_r} alpha={setup.loha_alpha:g} on "
            f"{', '.join(self.target_modules(spec, setup))} (peft LoHaConfig; rank_dropout and "
            f"module_dropout 0); factors in {setup.adapter_dtype.value}; each forward rebuilds "
            "the out x in delta weight (Hadamard product of two rank-r products, three "
            "temporaries of that size) and keeps it for backward"
        ]


METHOD = LoHa()

"""Bottleneck adapters (Houlsby et al. 2019) after every attention and MLP branch.

``h <- h + up(relu(down(h)))`` with down: hidden -> adapter_size and up: adapter_size -> hidden,
in the adapter dtype (the input cast to it and the output cast back), as
:mod:`memplan.torchsim.adapters` attaches them to a torch model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.methods.base import AddedParam, TuningMethod

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class Adapter(TuningMethod):
    name = "adapter"
    summary = "bottleneck adapters after attention and MLP (Houlsby et al. 2019)"
    rank = 30
    adds_matmul_params = True
    setting_fields = ("adapter_size", "adapter_dtype")

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        # Two adapters per layer: down (h x m + m), up (m x h + h).
        h, m = arch.spec.hidden_size, setup.adapter_size
        count = 2 * arch.spec.num_layers
        return [
            AddedParam(f"adapter.{name}", numel, count, numel, ctx.adapter_dtype)
            for name, numel in (
                ("down.weight", h * m),
                ("down.bias", m),
                ("up.weight", m * h),
                ("up.bias", h),
            )
        ]

    def branch_output(self, seg: Segment, ctx: StepContext, x: Tensor, label: str) -> Tensor:
        """x + up(relu(down(x))), trainable, in the adapter dtype."""
        from memplan.analytic.blocks import activation, cast, residual_add

        size = ctx.adapter_size
        rows = ctx.num_tokens
        h = x.numel // rows
        xa = cast(seg, x, ctx.adapter_dtype, f"{label}.input_cast")
        down_grad = ctx.param_grad(
            f"{label}.down", h * size + size, trainable=True, dtype=ctx.adapter_dtype
        )
        d = seg.op(
            f"{label}.down",
            [xa],
            rows * size,
            ctx.adapter_dtype,
            saves=[xa],
            param_grads=[down_grad],
        )
        # torch.relu saves its output, not its input (memplan.torchsim.adapters).
        a = activation(seg, d, "relu", f"{label}.act")
        up_grad = ctx.param_grad(
            f"{label}.up", size * h + h, trainable=True, dtype=ctx.adapter_dtype
        )
        u = seg.op(f"{label}.up", [a], x.numel, ctx.adapter_dtype, saves=[a], param_grads=[up_grad])
        out = cast(seg, u, x.dtype, f"{label}.output_cast")
        y = residual_add(seg, x, out, f"{label}.residual")
        # The cast input and the up projection's output are locals of the adapter's forward.
        seg.hold(xa, u, label=f"{label}.locals")
        return y

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        from memplan.families import family
        from memplan.torchsim.adapters import add_bottleneck_adapters

        built.model.requires_grad_(False)
        hooks = family(spec.family).adapter_hooks
        add_bottleneck_adapters(built.model, spec.hidden_size, setup, built.notes, hooks)
        return built.model

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return [
            f"adapters: Houlsby bottleneck {setup.adapter_size} after attention and MLP, in "
            f"{setup.adapter_dtype.value}"
        ]


METHOD = Adapter()

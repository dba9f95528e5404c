"""P-tuning (Liu et al. 2021, arXiv:2103.10385) as peft's ``PromptEncoderConfig`` runs it.

Prompt tuning whose virtual token embeddings come out of a trainable encoder: peft's
``PromptEncoder`` (``encoder_reparameterization_type="MLP"``, its default) looks up
``prompt_len`` rows of an fp32 ``nn.Embedding`` and runs them through ``mlp_head``: Linear(d, h),
ReLU, Linear(h, h), ReLU, Linear(h, d), with ``h = encoder_hidden_size`` (None: the model's
hidden size, peft ``_prepare_prompt_learning_config``). It runs once per forward on one
sequence's tokens (``prompt_tokens[:1]``) and the result is repeated over the batch
(``PeftModel.get_prompt``); the rest is prompt tuning's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.dtypes import DType
from memplan.methods.base import AddedParam
from memplan.methods.prompt_tuning import PromptTuning

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import ParamGrad, Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup

_MLP = ("mlp_head.0", "mlp_head.2", "mlp_head.4")  # the Sequential's three nn.Linear


class PTuning(PromptTuning):
    name = "p-tuning"
    summary = "virtual tokens made by a trainable MLP prompt encoder (Liu et al. 2021, peft)"
    rank = 46
    peft_type = "P_TUNING"

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """The embedding (prompt_len x d) and mlp_head's weights and biases, all fp32."""
        d = arch.spec.hidden_size
        out = [
            AddedParam(
                "prompt_encoder.embedding.weight",
                setup.prompt_len * d,
                1,
                setup.prompt_len * d,
                ctx.adapter_dtype,
            )
        ]
        for name, (n_in, n_out) in zip(_MLP, _widths(d), strict=True):
            out.append(
                AddedParam(
                    f"prompt_encoder.{name}.weight",
                    n_in * n_out,
                    1,
                    n_in * n_out,
                    ctx.adapter_dtype,
                )
            )
            out.append(
                AddedParam(f"prompt_encoder.{name}.bias", n_out, 1, n_out, ctx.adapter_dtype)
            )
        return out

    def prompt(self, seg: Segment, ctx: StepContext, hidden: int) -> Tensor:
        """PromptEncoder.forward on ``prompt_tokens[:1]``, then ``repeat(batch, 1, 1)``."""
        nvt = ctx.virtual_tokens
        dtype = ctx.adapter_dtype
        grad = ctx.param_grad(
            "prompt_encoder.embedding.weight", nvt * hidden, trainable=True, dtype=dtype
        )
        if ctx.device == "cuda":  # prompt_tokens (expanded to the batch) copied to the device
            ids = seg.op("prompt_tokens", [], ctx.batch * nvt, DType.INT64, requires_grad=False)
            seg.model_locals.append(ids)
        x = seg.op("prompt_encoder.embedding", [], nvt * hidden, dtype, param_grads=[grad])
        for i, (name, (n_in, n_out)) in enumerate(zip(_MLP, _widths(hidden), strict=True)):
            x = _encoder_linear(seg, ctx, x, n_in, n_out, f"prompt_encoder.{name}")
            if i < len(_MLP) - 1:  # nn.ReLU: threshold_backward reads its output
                x = seg.op(f"prompt_encoder.relu{i}", [x], x.numel, x.dtype, saves_output=True)
        return seg.op("prompt_repeat", [x], ctx.batch * x.numel, x.dtype)

    def peft_config(self, setup: TrainingSetup, task_type: str) -> Any:
        from peft import PromptEncoderConfig

        # encoder_reparameterization_type="MLP", encoder_hidden_size=None (the token dim).
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=setup.prompt_len)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        d = spec.hidden_size
        return [
            f"P-tuning: {setup.prompt_len} virtual tokens prepended to every sequence (peft "
            f"num_virtual_tokens): the model runs {setup.seq_len + setup.prompt_len} positions; "
            f"fp32 prompt encoder (peft PromptEncoder, MLP of width {d}: 3 linears, 2 ReLUs) run "
            "once per step on one sequence's virtual tokens"
        ]


def _widths(d: int) -> tuple[tuple[int, int], ...]:
    """(in, out) of mlp_head's linears; the encoder's hidden size defaults to the model's."""
    return ((d, d), (d, d), (d, d))


def _encoder_linear(
    seg: Segment, ctx: StepContext, x: Tensor, n_in: int, n_out: int, label: str
) -> Tensor:
    """An fp32 nn.Linear of the encoder: addmm keeps its input for the weight's gradient and
    its weight for the input's; under autocast both operands are cast (the trainable weight
    and bias once, cached), and the product is in the compute dtype."""
    from memplan.analytic.blocks import cast

    rows = x.numel // n_in
    grads = _grads(ctx, label, n_in * n_out, n_out)
    if not ctx.amp:
        return seg.op(
            label,
            [x],
            rows * n_out,
            x.dtype,
            saves=[x],
            param_grads=grads,
            saves_params=x.requires_grad,
        )
    bc = seg.op(f"{label}.bias_cast", [], n_out, ctx.compute_dtype, param_grads=grads[1:])
    wc = seg.op(f"{label}.weight_cast", [], n_in * n_out, ctx.compute_dtype, param_grads=grads[:1])
    seg.autocast_cached.extend([bc, wc])
    xc = cast(seg, x, ctx.compute_dtype, f"{label}.input_cast")
    return seg.op(label, [xc, wc, bc], rows * n_out, ctx.compute_dtype, saves=[xc, wc])


def _grads(ctx: StepContext, label: str, weight_numel: int, bias_numel: int) -> list[ParamGrad]:
    dtype = ctx.adapter_dtype
    return [
        ctx.param_grad(f"{label}.weight", weight_numel, trainable=True, dtype=dtype),
        ctx.param_grad(f"{label}.bias", bias_numel, trainable=True, dtype=dtype),
    ]


METHOD = PTuning()

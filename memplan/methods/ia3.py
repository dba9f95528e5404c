"""(IA)^3 (Liu et al. 2022, arXiv:2205.05638) as peft's ``IA3Config`` runs it.

Each targeted linear gets one trainable fp32 vector ``ia3_l`` (peft autocasts adapters to
fp32). An attention target scales its output per output feature; a feedforward target (the
MLP's down projection) scales its input per input feature, before the base layer runs
(peft ``ia3.Linear.forward``). The targets and the feedforward modules are peft's defaults for
the model type (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING); a type without defaults is refused as
peft refuses it. Nothing of the base model trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from memplan.dtypes import Quantization
from memplan.methods.base import AddedParam, TuningMethod
from memplan.methods.ln_tuning import matches, model_type

if TYPE_CHECKING:
    from memplan.analytic.blocks import LinearSpec
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup

# peft utils/constants.py (peft 0.21), for the model types memplan's families read:
# (target_modules, feedforward_modules).
PEFT_TARGETS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    # "w2" names Mixtral's v4 expert linears; v5's fused 3-D experts are no nn.Linear.
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}


def _feedforward(module: str, feedforward: tuple[str, ...]) -> bool:
    """peft IA3Model._check_target_module_feedforward: ``key.endswith(target)``."""
    return any(module.endswith(t) for t in feedforward)


class IA3(TuningMethod):
    name = "ia3"
    needs_transformers = True
    summary = "a trainable scale per feature of a few linears (Liu et al. 2022, peft IA3Config)"
    rank = 40
    adds_matmul_params = False

    def targets(self, spec: ModelSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return PEFT_TARGETS.get(model_type(spec), ((), ()))

    def check_setup(self, setup: TrainingSetup) -> None:
        super().check_setup(setup)
        if setup.quant is not Quantization.NONE:
            # peft's ia3.bnb.Linear4bit runs an fp32 copy of the input without autocast, and
            # returns fp32 outputs into a 16-bit model; memplan models the plain layers only.
            raise ValueError(
                f"quant={setup.quant.value}: method=ia3 on quantized weights (peft "
                "ia3.bnb.Linear4bit) is not modelled; use quant none"
            )

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        if model_type(spec) not in PEFT_TARGETS:
            return (
                f"method={self.name}: peft has no default target modules for model type "
                f"{model_type(spec)} (IA3Config: 'Please specify `target_modules`')"
            )
        return None

    def _targeted(self, spec: ModelSpec, module: str, copies: int) -> tuple[bool, bool]:
        """(module gets a vector, it scales the input); fused expert tensors never do."""
        targets, feedforward = self.targets(spec)
        hit = copies == 1 and matches(module, targets)
        return hit, hit and _feedforward(module, feedforward)

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        """One fp32 vector per targeted linear: (1, in) scaling the input of a feedforward
        module, (out, 1) scaling the output of the others (replicated under tensor
        parallelism, like the norms)."""
        from memplan.architecture import ParamKind

        out: list[AddedParam] = []
        for block, t in arch.tensors():
            module = t.name.removesuffix(".weight")
            if t.kind is not ParamKind.LINEAR:
                continue
            hit, feedforward = self._targeted(arch.spec, module, t.copies)
            if not hit:
                continue
            size = t.in_features if feedforward else t.out_features
            shape = (1, size) if feedforward else (size, 1)
            label = f"{block.name}.{module}.ia3_l"
            out.append(AddedParam(label, size, block.repeat, size, ctx.adapter_dtype, shape))
        return out

    def linear_input(
        self, seg: Segment, ctx: StepContext, x: Tensor, spec: LinearSpec, *, quantized: bool
    ) -> Tensor:
        """``ia3_scaling = 1 * ia3_l.flatten()`` (a new vector, before the base layer runs);
        for a feedforward module ``(x.to(fp32) * ia3_scaling).to(x.dtype)`` is what the base
        layer reads (mul keeps the fp32 input for the vector's gradient, whose backward
        materializes grad * input before summing over the rows)."""
        from memplan.analytic.blocks import cast, promote

        hit, feedforward = self._targeted_spec(seg, ctx, spec)
        if not hit:
            return x
        size = spec.in_features if feedforward else spec.out_features
        grad = ctx.param_grad(f"{spec.label}.ia3_l", size, trainable=True, dtype=ctx.adapter_dtype)
        scaling = seg.op(
            f"{spec.label}.ia3_scaling", [], size, ctx.adapter_dtype, param_grads=[grad]
        )
        if not feedforward:
            return x
        xf = cast(seg, x, ctx.adapter_dtype, f"{spec.label}.ia3_input_cast")
        scaled = seg.op(
            f"{spec.label}.ia3_scale",
            [xf, scaling],
            xf.numel,
            promote(xf.dtype, scaling.dtype),
            saves=[xf, scaling if xf.requires_grad else None],
            bwd_workspace_bytes=xf.numel * 4,
        )
        return cast(seg, scaled, x.dtype, f"{spec.label}.ia3_output_cast")

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
        """``(result * ia3_scaling).to(result.dtype)`` for an attention module; the locals of
        peft's forward (the vector, a feedforward module's fp32 and scaled inputs) live until
        it returns."""
        from memplan.analytic.blocks import cast, promote

        hit, feedforward = self._targeted_spec(seg, ctx, spec)
        if not hit:
            return out
        scaling = _last(seg, f"{spec.label}.ia3_scaling")
        assert scaling is not None  # made by linear_input
        if feedforward:
            locals_ = [
                t
                for t in (
                    _last(seg, f"{spec.label}.ia3_input_cast"),
                    _last(seg, f"{spec.label}.ia3_output_cast")
                    or _last(seg, f"{spec.label}.ia3_scale"),
                )
                if t is not None
            ]
            seg.hold(x, *locals_, scaling, label=f"{spec.label}.ia3_locals")
            return out
        scaled = seg.op(
            f"{spec.label}.ia3_scale",
            [out, scaling],
            out.numel,
            promote(out.dtype, scaling.dtype),
            saves=[out, scaling if out.requires_grad else None],
            bwd_workspace_bytes=out.numel * 4,
        )
        result = cast(seg, scaled, out.dtype, f"{spec.label}.ia3_output_cast")
        seg.hold(x, scaling, label=f"{spec.label}.ia3_locals")
        return result

    def _targeted_spec(self, seg: Segment, ctx: StepContext, spec: LinearSpec) -> tuple[bool, bool]:
        """(the linear gets a vector, it scales the input), by its module path."""
        targets, feedforward = PEFT_TARGETS.get(ctx.model_type, ((), ()))
        hit = spec.copies == 1 and matches(spec.label, targets)
        return hit, hit and _feedforward(spec.label, feedforward)

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        from peft import IA3Config, get_peft_model

        from memplan.errors import MemplanError
        from memplan.torchsim.models import peft_task_type

        reason = self.unsupported(spec, setup)
        if reason or not built.is_hf:
            raise MemplanError(reason or f"method={self.name} needs a transformers model")
        built.model.requires_grad_(False)
        # The type's default target and feedforward modules; GPT-2's Conv1D stores (in, out).
        conv1d = any(type(m).__name__ == "Conv1D" for m in built.model.modules())
        config = IA3Config(task_type=peft_task_type(built), fan_in_fan_out=conv1d)
        return get_peft_model(built.model, config)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        targets, feedforward = self.targets(spec)
        return [
            f"IA3: a trainable fp32 vector on {', '.join(targets)} (peft defaults); it scales "
            f"the output, and the input of {', '.join(feedforward) or 'none'} (feedforward), "
            "through an fp32 product"
        ]


def _last(seg: Segment, name: str) -> Tensor | None:
    """The output of the latest op called ``name`` in ``seg`` (None: there is none)."""
    for op in reversed(seg.ops):
        if op.name == name:
            return op.output
    return None


METHOD = IA3()

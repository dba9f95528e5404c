"""Prompt tuning (Lester et al. 2021) as peft's ``PromptTuningConfig`` runs it.

A trainable table of ``prompt_len`` virtual token embeddings (``PromptEmbedding``, fp32) is
prepended to every sequence's input embeddings (``PeftModelForCausalLM.forward``): the model
runs ``seq_len + prompt_len`` positions in every layer, the logits and the loss, and the labels
are extended with ``prompt_len`` ignored positions. Nothing of the base model trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.dtypes import DType
from memplan.methods.base import AddedParam, Step, TuningMethod

if TYPE_CHECKING:
    from memplan.analytic.context import StepContext
    from memplan.analytic.graph import Segment, Tensor
    from memplan.architecture import Architecture
    from memplan.specs.model import ModelSpec
    from memplan.specs.training import TrainingSetup


class PromptTuning(TuningMethod):
    name = "prompt-tuning"
    needs_transformers = True
    peft = True
    summary = "trainable virtual tokens before every sequence (Lester et al. 2021, peft)"
    rank = 45
    setting_fields = ("prompt_len",)
    peft_type = "PROMPT_TUNING"

    def unsupported(self, spec: ModelSpec, setup: TrainingSetup) -> str | None:
        from memplan.families import family

        if spec.is_encoder_decoder or not family(spec.family).causal:
            # peft's encoder-decoder and feature-extraction forwards extend the inputs but
            # not in a way memplan models (the labels of a masked LM are left unextended).
            return (
                f"method={self.name} is modelled for decoder-only causal LMs "
                f"(peft PeftModelForCausalLM); {spec.name} is not one"
            )
        return None

    def virtual_tokens(self, setup: TrainingSetup) -> int:
        return setup.prompt_len

    def added_params(
        self, arch: Architecture, setup: TrainingSetup, ctx: StepContext
    ) -> list[AddedParam]:
        # PromptEmbedding: nn.Embedding(num_virtual_tokens, token_dim), created in fp32.
        numel = setup.prompt_len * arch.spec.hidden_size
        label = "prompt_encoder.embedding.weight"
        return [AddedParam(label, numel, 1, numel, ctx.adapter_dtype)]

    def outside_forward(self, spec: ModelSpec, ctx: StepContext) -> list[Step]:
        """``torch.cat((prefix_labels, labels), dim=1)``: -100 for every virtual token, then
        the batch's labels; the extended labels live until the forward returns."""
        prefix = ctx.batch * ctx.virtual_tokens * 8
        return [
            (prefix, "prompt labels (-100)"),
            (ctx.num_tokens * 8, "labels with prompt"),
            (-prefix, "prompt labels (-100)"),
        ]

    def forward_end(self, spec: ModelSpec, ctx: StepContext) -> list[Step]:
        return [(-(ctx.num_tokens * 8), "labels with prompt")]

    def prompt(self, seg: Segment, ctx: StepContext, hidden: int) -> Tensor:
        """peft ``get_prompt``: the table's rows for one sequence (``prompt_tokens[:1]``), then
        ``repeat(batch, 1, 1)``."""
        nvt = ctx.virtual_tokens
        grad = ctx.param_grad(
            "prompt_encoder.embedding.weight", nvt * hidden, trainable=True, dtype=ctx.adapter_dtype
        )
        if ctx.device == "cuda":  # prompt_tokens (expanded to the batch) copied to the device
            ids = seg.op("prompt_tokens", [], ctx.batch * nvt, DType.INT64, requires_grad=False)
            seg.model_locals.append(ids)
        rows = seg.op("prompt_encoder", [], nvt * hidden, ctx.adapter_dtype, param_grads=[grad])
        # repeat's backward sums the batch's gradients back into one sequence's.
        return seg.op("prompt_repeat", [rows], ctx.batch * nvt * hidden, ctx.adapter_dtype)

    def inputs_embeds(self, seg: Segment, ctx: StepContext, x: Tensor) -> Tensor:
        """``torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)``; the cast
        prompts stay a local of peft's forward."""
        from memplan.analytic.blocks import cast, promote

        hidden = x.numel // ctx.input_tokens
        prompts = cast(seg, self.prompt(seg, ctx, hidden), x.dtype, "prompt_cast")
        joined = seg.op(
            "prompt_cat",
            [prompts, x],
            ctx.num_tokens * hidden,
            promote(prompts.dtype, x.dtype),
            passthrough_grad=True,
        )
        seg.model_locals[-1] = joined
        seg.model_locals.append(prompts)
        # Both are locals of PeftModelForCausalLM.forward, alive until the loss is computed.
        seg.outer_locals += [joined, prompts]
        return joined

    def apply(self, built: Any, spec: ModelSpec, setup: TrainingSetup) -> Any:
        from peft import get_peft_model

        from memplan.errors import MemplanError
        from memplan.torchsim.models import peft_task_type

        reason = self.unsupported(spec, setup)
        task_type = peft_task_type(built)
        if reason or task_type != "CAUSAL_LM" or not built.is_hf:
            raise MemplanError(reason or f"method={self.name} needs a transformers causal LM")
        built.model.requires_grad_(False)
        return get_peft_model(built.model, self.peft_config(setup, task_type))

    def peft_config(self, setup: TrainingSetup, task_type: str) -> Any:
        from peft import PromptTuningConfig

        # prompt_tuning_init="RANDOM" (peft's default): no tokenizer is read.
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=setup.prompt_len)

    def assumptions(self, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
        return [
            f"prompt tuning: {setup.prompt_len} virtual tokens prepended to every sequence "
            f"(peft num_virtual_tokens): the model runs {setup.seq_len + setup.prompt_len} "
            "positions; fp32 prompt table"
        ]


METHOD = PromptTuning()

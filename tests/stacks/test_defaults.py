"""Each stack's defaults resolve to the settings its project's source gives a run.

The values below were read from each project's source (the file named on each row); a change
to a stack module that contradicts them fails here.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.dtypes import DType
from memplan.specs import ALL_LINEAR, Optimizer, OptimizerImpl, Precision, TrainingSetup
from memplan.specs.training import LossKind

# (stack, method, field, value the run gets, where the project sets it)
DOCUMENTED: list[tuple[str, str, str, Any, str]] = [
    ("hf-trainer", "lora", "optimizer_impl", OptimizerImpl.FUSED, "training_args.py optim"),
    ("hf-trainer", "lora", "logits_fp32", True, "loss_utils.py ForCausalLMLoss"),
    ("trl-sft", "lora", "precision", Precision.BF16_AMP, "utils.py create_model_from_path"),
    ("trl-sft", "lora", "grad_ckpt", True, "base_config.py gradient_checkpointing"),
    ("trl-sft", "qlora", "adapter_dtype", DType.BF16, "sft_trainer.py casts trainables"),
    ("trl-sft", "qlora", "double_quant", False, "utils.py use_bnb_nested_quant"),
    ("axolotl", "lora", "precision", Precision.BF16, "schemas/config.py bf16 auto"),
    ("axolotl", "qlora", "double_quant", True, "loaders/model.py double quant"),
    ("llama-factory", "lora", "grad_ckpt", True, "model_args.py"),
    ("llama-factory", "lora", "lora_targets", ALL_LINEAR, "finetuning_args.py lora_target"),
    ("llama-factory", "lora", "adapter_dtype", DType.FP32, "adapter.py cast to fp32"),
    ("torchtune", "lora", "precision", Precision.BF16, "configs dtype: bf16"),
    ("torchtune", "qlora", "adapter_dtype", DType.BF16, "validate_expected_param_dtype"),
    ("torchtune", "lora", "grad_ckpt", True, "8B_lora_single_device.yaml"),
    ("torchtune", "lora", "lora_targets", ("q", "v", "o", "gate", "up", "down"), "8B_lora"),
    ("torchtune", "qlora", "lora_targets", ("q", "k", "v", "o", "gate", "up", "down"), "qlora"),
    ("torchtune", "qlora", "lora_r", 8, "8B_qlora_single_device.yaml lora_rank"),
    ("torchtune", "lora", "loss", LossKind.CHUNKED, "configs LinearCrossEntropyLoss"),
    ("torchtune", "full", "optimizer_in_backward", True, "8B_full_single_device.yaml"),
    ("torchtune", "full", "optimizer", Optimizer.PAGED_ADAMW_8BIT, "PagedAdamW8bit"),
    ("unsloth", "qlora", "loss", LossKind.FUSED_LINEAR, "unsloth_fused_ce_loss"),
    ("litgpt", "lora", "precision", Precision.BF16_AMP, "utils.py bf16-mixed"),
    ("litgpt", "qlora", "precision", Precision.BF16, "finetune/lora.py bf16-true"),
    ("litgpt", "qlora", "optimizer", Optimizer.PAGED_ADAMW, "finetune/lora.py PagedAdamW"),
    ("litgpt", "qlora", "double_quant", False, "BitsandbytesPrecision('nf4')"),
    ("litgpt", "lora", "optimizer_impl", OptimizerImpl.FOREACH, "AdamW without fused="),
    ("unsloth", "qlora", "optimizer", Optimizer.ADAMW_8BIT, "rl.py UnslothSFTConfig optim"),
    ("unsloth", "qlora", "lora_r", 16, "llama.py get_peft_model r=16"),
    ("unsloth", "qlora", "lora_targets", ALL_LINEAR, "llama.py get_peft_model targets"),
    ("unsloth", "qlora", "lora_dropout", 0.0, "llama.py get_peft_model dropout"),
    ("accelerate", "lora", "precision", Precision.BF16, "mixed_precision='no'"),
    ("fsdp-qlora", "qlora", "lora_r", 64, "train.py lora_rank"),
    ("fsdp-qlora", "qlora", "lora_dropout", 0.1, "train.py lora_dropout"),
    ("fsdp-qlora", "qlora", "optimizer_impl", OptimizerImpl.FOREACH, "AdamW(fused=False)"),
]


@pytest.mark.parametrize(("stack", "method", "field", "value", "source"), DOCUMENTED)
def test_stack_default_matches_its_source(
    stack: str, method: str, field: str, value: Any, source: str
) -> None:
    setup = TrainingSetup(stack=stack, method=method)
    assert getattr(setup, field) == value, source
    assert field in setup.defaults_from_stack


def test_every_stack_is_documented_here() -> None:
    from memplan.stacks import stacks

    assert {row[0] for row in DOCUMENTED} == set(stacks())


def test_method_defaults_fill_what_the_stack_leaves() -> None:
    # hf-trainer sets no LoRA rank: the qlora preset's r=64 (the QLoRA paper's recipe) applies.
    setup = TrainingSetup(stack="hf-trainer", method="qlora")
    assert setup.lora_r == 64
    assert "lora_r" in setup.defaults_from_method
    # unsloth's r=16 wins over the preset's.
    unsloth = TrainingSetup(stack="unsloth", method="qlora")
    assert unsloth.lora_r == 16
    assert "lora_r" not in unsloth.defaults_from_method


def test_stacks_change_the_answer_by_their_mechanisms() -> None:
    """The same QLoRA adapters under two stacks: torchtune's bf16 adapters hold half the
    Hugging Face fp32 ones; unsloth's r=16 on every linear layer trains more than peft's
    q/v default would, but its 8-bit AdamW keeps 2 bytes of state per trainable parameter."""
    from memplan.analytic.predict import predict
    from memplan.catalog import load_model
    from memplan.trace import Category

    spec = load_model("llama-3.1-8b")
    same_adapters = {"lora_r": 64, "lora_targets": ALL_LINEAR}
    states = {
        name: predict(
            spec, TrainingSetup(stack=name, method="qlora", **same_adapters)
        ).state.bytes_by_category()
        for name in ("hf-trainer", "torchtune")
    }
    hf = states["hf-trainer"][Category.TRAINABLE_WEIGHTS]
    tune = states["torchtune"][Category.TRAINABLE_WEIGHTS]
    assert tune == pytest.approx(hf / 2, rel=0.01)  # same adapters (r=64, all linear), bf16
    unsloth = predict(spec, TrainingSetup(stack="unsloth", method="qlora"))
    assert unsloth.optimizer.state_bytes < 3 * unsloth.state.num_trainable_params


def test_torchtune_full_steps_in_backward_only_without_accumulation() -> None:
    # 8B_full_single_device.yaml pairs optimizer_in_bwd with gradient_accumulation_steps 1
    assert TrainingSetup(stack="torchtune", method="full").optimizer_in_backward is True
    accumulating = TrainingSetup(stack="torchtune", method="full", grad_accum_steps=4)
    assert accumulating.optimizer_in_backward is False
    assert accumulating.optimizer is Optimizer.ADAMW

"""What Mixtral's sparse MoE block and Gemma2's soft-capped attention hold, analytically."""

from __future__ import annotations

from memplan.analytic.context import StepContext
from memplan.analytic.predict import predict
from memplan.analytic.weights import model_state
from memplan.architecture import architecture
from memplan.catalog import load_model
from memplan.dtypes import DType
from memplan.plan import plan
from memplan.specs import ParallelSetup, TrainingSetup
from memplan.specs.training import Attention
from memplan.trace import Category


def test_qlora_quantizes_mixtral_attention_and_keeps_the_experts_in_bf16() -> None:
    spec = load_model("mixtral-8x7b")
    setup = TrainingSetup(method="qlora")
    state = model_state(architecture(spec), setup, StepContext.build(spec, setup))
    experts = [g for g in state.groups if ".experts." in g.label]
    assert {(g.dtype, g.category) for g in experts} == {(DType.BF16, Category.FROZEN_WEIGHTS)}
    # one 3-D tensor per layer and projection, every expert's matrix in it
    assert sum(g.numel * g.count for g in experts) == 32 * 8 * 3 * 14336 * 4096
    packed = [g for g in state.groups if g.category is Category.FROZEN_WEIGHTS]
    quantized = {g.label.split(".")[-2] for g in packed if g.dtype is DType.UINT8}
    assert quantized == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_mixtral_qlora_plan_says_the_experts_stay_16_bit() -> None:
    result = plan(load_model("mixtral-8x7b"), TrainingSetup(method="qlora"), ParallelSetup())
    assert any("replace_with_bnb_linear" in line for line in result.assumptions)
    assert result.breakdown_bytes["frozen_weights"] > 2 * 45 * 10**9  # 45.1e9 bf16 expert params


def test_gemma2_trains_eager_attention_when_sdpa_is_asked_for() -> None:
    spec = load_model("tiny-gemma2")
    sdpa = TrainingSetup(method="lora", attention="sdpa", seq_len=64)
    assert StepContext.build(spec, sdpa).attention is Attention.EAGER
    eager = sdpa.model_copy(update={"attention": Attention.EAGER})
    assert predict(spec, sdpa).trace.peak() == predict(spec, eager).trace.peak()

"""Which parameters each method trains, and the notes the tracer attaches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.catalog import load_model  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.specs import TrainingSetup  # noqa: E402
from memplan.torchsim import TraceResult, trace_step  # noqa: E402
from memplan.trace import Phase  # noqa: E402

pytestmark = pytest.mark.torch


def _run(model: str, method: str, **fields: object) -> TraceResult:
    setup = TrainingSetup(method=method, seq_len=32, **fields)  # type: ignore[arg-type]
    return trace_step(load_model(model), setup, mode="fake", steps=1)


def test_lora_targets_come_from_roles() -> None:
    def targets(model: str, **fields: object) -> set[str]:
        from memplan.torchsim.runner import RunRequest, prepare_model

        setup = TrainingSetup(method="lora", **fields)  # type: ignore[arg-type]
        built, _ = prepare_model(RunRequest(load_model(model), setup))
        return {
            n.removesuffix(".lora_A").split(".layers.")[-1].split(".h.")[-1].split(".", 1)[-1]
            for n, _ in built.named_modules()
            if n.endswith(".lora_A")
        }

    assert targets("tiny-llama") == {"self_attn.q_proj", "self_attn.v_proj"}  # peft's default
    assert targets("tiny-llama", lora_targets=("o", "down")) == {
        "self_attn.o_proj",
        "mlp.down_proj",
    }
    assert targets("tiny-gpt2", lora_targets=("qkv", "o")) == {"attn.c_attn", "attn.c_proj"}
    # peft has no default for Phi-3: memplan passes the fused qkv_proj.
    assert targets("tiny-phi3") == {"self_attn.qkv_proj"}


def test_bitfit_without_biases_is_refused_by_the_tracer_too() -> None:
    with pytest.raises(MemplanError, match="has none"):
        _run("tiny-llama", "bitfit")


def test_bitfit_trains_every_bias() -> None:
    # GPT-2 per layer: Conv1D biases c_attn 3h, attn.c_proj h, c_fc 4h, mlp.c_proj h, and the
    # biases of ln_1 and ln_2 (h each); then ln_f's bias (h = 128).
    assert _run("tiny-gpt2", "bitfit").num_trainable_params == 2 * 11 * 128 + 128


def test_frozen_runs_forward_and_loss_only() -> None:
    result = _run("tiny-llama", "frozen")
    assert result.num_trainable_params == 0
    assert {e.phase for e in result.trace.events()} == {Phase.LOAD, Phase.FORWARD, Phase.LOSS}


def test_adapters_add_two_bottlenecks_per_layer() -> None:
    result = _run("tiny-llama", "adapter", adapter_size=64)
    per_adapter = (128 * 64 + 64) + (64 * 128 + 128)  # down and up with biases
    assert result.num_trainable_params == 2 * 2 * per_adapter


def test_prefix_tuning_trains_key_value_prefixes() -> None:
    result = _run("tiny-llama", "prefix", prefix_len=30)
    # peft PrefixTuning: prefix_len x layers x (key, value) x kv_heads * head_dim (GQA 2 x 32)
    assert result.num_trainable_params == 30 * 2 * 2 * 64


def test_flash_attention_is_traced_as_sdpa_and_noted() -> None:
    result = _run("tiny-llama", "lora", attention="flash")
    assert any("flash" in note for note in result.notes)


def test_families_without_sdpa_fall_back_to_eager() -> None:
    assert any("eager" in note for note in _run("tiny-gemma2", "lora").notes)


def test_qlora_leaves_the_experts_3d_parameters_and_the_router_in_16_bit() -> None:
    from memplan.torchsim.quant import Linear4bit
    from memplan.torchsim.runner import RunRequest, prepare_model

    setup = TrainingSetup(method="qlora")
    model, _ = prepare_model(RunRequest(load_model("tiny-mixtral"), setup))
    moe = next(m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock")
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, Linear4bit) for m in moe.modules())
    names = [n for n, _ in model.named_parameters() if ".lora_A" in n]
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}  # no adapter on the experts


def test_kbit_prep_quantizes_from_bf16_and_upcasts_every_other_parameter() -> None:
    from memplan.torchsim.quant import Linear4bit
    from memplan.torchsim.runner import RunRequest, prepare_model

    setup = TrainingSetup(method="qlora", kbit_prep=True)
    model, _ = prepare_model(RunRequest(load_model("tiny-llama"), setup))
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantized
    assert {m.weight_dtype for m in quantized} == {torch.bfloat16}  # QuantState.dtype
    packed = {id(m.weight) for m in quantized}
    others = {p.dtype for p in model.parameters() if id(p) not in packed}
    assert others == {torch.float32}  # embeddings, norms, LM head and adapters


# Trainable parameters of Llama-3.2-3B (28 layers, hidden 3072, 8 key/value heads of 128) under
# peft's defaults, as peft's get_nb_trainable_parameters counts them on the meta-device model.
LLAMA_3B_TRAINABLE = {
    # r=8 on q_proj (3072 -> 3072) and v_proj (3072 -> 1024): 8 * (6144 + 4096) per layer
    "lora": 28 * 8 * (3072 + 3072 + 3072 + 1024),
    # LoRA plus a magnitude per output of q_proj and v_proj
    "dora": 28 * (8 * (3072 + 3072 + 3072 + 1024) + 3072 + 1024),
    # 20 virtual tokens x hidden 3072
    "prompt-tuning": 20 * 3072,
    # IA3: the outputs of k_proj and v_proj (1024 each), the input of down_proj (8192)
    "ia3": 28 * (1024 + 1024 + 8192),
    # copies of input_layernorm and post_attention_layernorm per layer, and the final norm
    "ln-tuning": (2 * 28 + 1) * 3072,
    # the prompt embedding and the encoder's three 3072 x 3072 linears with their biases
    "p-tuning": 20 * 3072 + 3 * (3072 * 3072 + 3072),
}


@pytest.mark.parametrize("method", sorted(LLAMA_3B_TRAINABLE))
def test_trainable_count_matches_peft_on_llama_3b(method: str) -> None:
    from memplan.analytic.context import StepContext
    from memplan.analytic.weights import model_state
    from memplan.architecture import architecture
    from memplan.torchsim.runner import RunRequest, prepare_model

    spec = load_model("llama-3.2-3b")
    setup = TrainingSetup(method=method)
    state = model_state(architecture(spec), setup, StepContext.build(spec, setup))
    model, _ = prepare_model(RunRequest(spec, setup))
    trainable, _ = model.get_nb_trainable_parameters()
    assert state.num_trainable_params == trainable == LLAMA_3B_TRAINABLE[method]


def test_prompt_tuning_lengthens_every_sequence() -> None:
    from memplan.analytic.context import StepContext

    setup = TrainingSetup(method="prompt-tuning", seq_len=100, prompt_len=12)
    ctx = StepContext.build(load_model("tiny-llama"), setup)
    assert (ctx.seq_len, ctx.input_tokens) == (112, 100)


def test_prompt_tuning_is_refused_where_peft_extends_no_labels() -> None:
    with pytest.raises(MemplanError, match="decoder-only causal LMs"):
        _run("tiny-bert", "prompt-tuning")


def test_dora_on_4bit_weights_matches_the_traced_step() -> None:
    from memplan.analytic.predict import predict

    spec = load_model("tiny-llama")
    setup = TrainingSetup(method="dora", quant="nf4", micro_batch_size=2, seq_len=64, device="cpu")  # type: ignore[arg-type]
    measured = trace_step(spec, setup, mode="cpu").trace.peak().peak_bytes
    predicted = predict(spec, setup).trace.peak().peak_bytes
    assert predicted == pytest.approx(measured, rel=0.01)

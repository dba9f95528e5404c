"""Gemma 3 with vision (Gemma3ForConditionalGeneration) fine-tuned on text alone.

The vision tower and projector are held as weights and never run; what trains there gets no
gradient. Exact counts against transformers are in tests/catalog; steps against real CPU runs
in the oracle (tiny-gemma3_mm).
"""

from __future__ import annotations

import pytest

from memplan.analytic.predict import predict
from memplan.architecture import architecture, lora_target_names
from memplan.catalog import catalog_record, load_model, spec_from_hf_config
from memplan.errors import MemplanError
from memplan.specs import TrainingSetup
from memplan.specs.parallel import ParallelSetup

SIZES = ("4b", "12b", "27b")


@pytest.mark.parametrize("size", SIZES)
def test_hub_ids_of_pretrained_and_instruction_tuned_resolve_offline(size: str) -> None:
    for variant in ("pt", "it"):
        assert load_model(f"google/gemma-3-{size}-{variant}").name == f"gemma-3-{size}"
        assert load_model(f"Google/Gemma-3-{size.upper()}-{variant.upper()}").name == (
            f"gemma-3-{size}"
        )


def _vision_params(name: str) -> int:
    return sum(b.numel for b in architecture(load_model(name)).blocks if not b.params[0].in_step)


def test_vision_tower_and_projector_sizes() -> None:
    # SigLIP So400m/14 at 896 px (27 layers, width 1152, MLP 4304, 4096 patches, no head)
    # and a 1152 x text-width projector with its RMSNorm.
    d, i, layers, patches = 1152, 4304, 27, (896 // 14) ** 2
    layer = 2 * 2 * d + 4 * (d * d + d) + (i * d + i) + (d * i + d)
    tower = (d * 3 * 14 * 14 + d) + patches * d + layers * layer + 2 * d
    for name, text_width in (("gemma-3-4b", 2560), ("gemma-3-12b", 3840), ("gemma-3-27b", 5376)):
        assert _vision_params(name) == tower + d * text_width + d


def test_full_fine_tuning_trains_the_tower_but_gives_it_no_gradient() -> None:
    spec = load_model("gemma-3-4b")
    setup = TrainingSetup(
        method="full", micro_batch_size=1, seq_len=64, optimizer="adamw", precision="bf16"
    )
    prediction = predict(spec, setup)
    assert spec.num_params is not None
    # Every parameter requires grad (Full.apply: requires_grad_(True)) ...
    assert prediction.state.num_trainable_params == spec.num_params
    # ... but torch's AdamW keeps exp_avg and exp_avg_sq (bf16) for the text model alone.
    text = spec.num_params - _vision_params("gemma-3-4b")
    assert 2 * 2 * text <= prediction.optimizer.state_bytes < 2 * 2 * text * 1.001


def test_deepspeed_gives_every_trainable_parameter_optimizer_state() -> None:
    spec = load_model("tiny-gemma3_mm")
    setup = TrainingSetup(method="full", micro_batch_size=1, seq_len=32, optimizer="adamw")
    state = {
        sharding: predict(spec, setup, ParallelSetup(num_gpus=2, zero_stage=2, sharding=sharding))
        for sharding in ("deepspeed", "fsdp")
    }
    idle = sum(g.count for g in state["fsdp"].state.trainable if not g.gets_grad)
    assert idle > 0
    # exp_avg and exp_avg_sq: DeepSpeed's flat partitions hold them for the tower too.
    extra = (
        state["deepspeed"].optimizer.num_state_tensors - state["fsdp"].optimizer.num_state_tensors
    )
    assert extra == 2 * idle


def test_lora_targets_reach_the_vision_tower_as_peft_matches_them() -> None:
    spec = load_model("tiny-gemma3_mm")
    names = lora_target_names(spec)
    assert names["q"] == ("q_proj",)
    assert names["v"] == ("v_proj",)
    assert names["o"] == ("o_proj", "out_proj")  # the text model's, the tower's
    assert names["up"] == ("up_proj", "fc1")
    assert names["down"] == ("down_proj", "fc2")
    setup = TrainingSetup(method="lora", micro_batch_size=1, seq_len=32)
    state = predict(spec, setup).state
    idle = [g.label for g in state.trainable if not g.gets_grad]
    assert idle
    assert all(g.startswith("vision_tower.encoder_layer.self_attn.") for g in idle)


def test_assumptions_say_text_only() -> None:
    from memplan.families import family

    spec = load_model("gemma-3-4b")
    lines = family(spec.family).assumptions(spec, TrainingSetup(method="lora"))
    assert any("text-only inputs (no pixel_values, no image tokens)" in line for line in lines)
    assert any("peft has no default LoRA targets for model_type gemma3" in line for line in lines)


def test_vision_head_is_refused_in_one_line() -> None:
    config = dict(catalog_record("tiny-gemma3_mm")["config"])
    config["vision_config"] = {**config["vision_config"], "vision_use_head": True}
    with pytest.raises(MemplanError, match="vision_use_head") as caught:
        spec_from_hf_config(config, name="head")
    assert "\n" not in str(caught.value)


def test_bitfit_is_refused_where_only_the_tower_has_biases() -> None:
    with pytest.raises(MemplanError, match="never runs"):
        predict(load_model("tiny-gemma3_mm"), TrainingSetup(method="bitfit"))


@pytest.mark.torch
def test_tracer_shortens_the_text_model_and_leaves_the_tower_out_of_the_layer_stacks() -> None:
    pytest.importorskip("transformers")
    from memplan.torchsim.models import build_meta_model, decoder_layer_stacks
    from memplan.torchsim.runner import _layer_prefix

    built = build_meta_model(load_model("gemma-3-27b"), TrainingSetup(method="lora"), num_layers=7)
    text = built.model.config.get_text_config()
    assert (text.num_hidden_layers, len(text.layer_types)) == (7, 7)
    assert built.model.config.vision_config.num_hidden_layers == 27  # the tower is whole
    assert [len(stack) for stack in decoder_layer_stacks(built.model)] == [7]
    assert _layer_prefix(built.model) == "model.language_model.layers"

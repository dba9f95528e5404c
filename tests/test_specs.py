"""Specs validate at the boundary: one message naming the field, frozen models, method defaults."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from memplan.dtypes import Quantization
from memplan.methods import method_names, methods
from memplan.specs import (
    ALL_LINEAR,
    FSDPStrategy,
    ModelSpec,
    Offload,
    Optimizer,
    ParallelSetup,
    Precision,
    Sharding,
    TrainingSetup,
)


def _only_error(exc: pytest.ExceptionInfo[ValidationError]) -> tuple[tuple[Any, ...], str]:
    """(location, message) of the single error a bad input must produce."""
    errors = exc.value.errors()
    assert len(errors) == 1, errors
    return tuple(errors[0]["loc"]), str(errors[0]["msg"])


# -- TrainingSetup: field constraints ------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("micro_batch_size", 0),
        ("micro_batch_size", -2),
        ("seq_len", 0),
        ("seq_len", -512),
        ("grad_accum_steps", 0),
        ("lora_r", 0),
    ],
)
def test_non_positive_sizes_are_rejected_naming_the_field(field: str, value: int) -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(**{field: value})
    loc, msg = _only_error(exc)
    assert loc == (field,)
    assert "greater than 0" in msg


def test_lora_targets_must_be_roles_and_the_error_points_at_the_bad_entry() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(method="lora", lora_targets=("q", "q_proj"))
    loc, msg = _only_error(exc)
    assert loc == ("lora_targets", 1)  # the second entry, module names are not roles
    assert "'q'" in msg
    assert "'down'" in msg


def test_lora_targets_accept_every_linear_role() -> None:
    setup = TrainingSetup(method="lora", lora_targets=ALL_LINEAR)
    assert setup.lora_targets == ALL_LINEAR


# -- TrainingSetup: cross-field checks -----------------------------------------------------


def test_qlora_with_fp32_is_rejected_naming_method_and_precision() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(method="qlora", precision="fp32")
    loc, msg = _only_error(exc)
    assert loc == ()  # a cross-field check: the message names the fields itself
    assert "method=qlora" in msg
    assert "precision" in msg
    assert "fp32" in msg


@pytest.mark.parametrize("method", ["full", "bitfit"])
@pytest.mark.parametrize("quant", ["int8", "nf4", "fp4"])
def test_quantized_weights_cannot_be_trained(method: str, quant: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(method=method, quant=quant)
    _, msg = _only_error(exc)
    assert f"quant={quant}" in msg
    assert f"method={method}" in msg


def test_qlora_needs_a_4bit_quantization() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(method="qlora", quant="int8")
    _, msg = _only_error(exc)
    assert "quant=int8" in msg
    assert "nf4" in msg


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_frozen_quantized_base_is_fine_for_peft_methods(method: str) -> None:
    assert TrainingSetup(method=method, quant="int8").quant is Quantization.INT8


def test_checkpointing_every_k_needs_checkpointing() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(grad_ckpt_every=2)
    _, msg = _only_error(exc)
    assert "grad_ckpt_every" in msg
    assert "grad_ckpt=True" in msg
    assert TrainingSetup(grad_ckpt=True, grad_ckpt_every=2).grad_ckpt_every == 2


# -- ParallelSetup -------------------------------------------------------------------------


def test_fsdp_has_no_zero_stage_1() -> None:
    with pytest.raises(ValidationError) as exc:
        ParallelSetup(num_gpus=2, sharding="fsdp", zero_stage=1)
    _, msg = _only_error(exc)
    assert "FSDP" in msg
    assert "zero_stage=2" in msg
    for stage in (0, 2, 3):
        assert ParallelSetup(num_gpus=2, sharding="fsdp", zero_stage=stage).zero_stage == stage


def test_optimizer_offload_needs_a_zero_stage() -> None:
    with pytest.raises(ValidationError) as exc:
        ParallelSetup(num_gpus=2, offload="optimizer")
    _, msg = _only_error(exc)
    assert "offload=optimizer" in msg
    assert "ZeRO stage" in msg
    assert ParallelSetup(num_gpus=2, zero_stage=1, offload="optimizer").offload is Offload.OPTIMIZER


def test_parameter_offload_needs_stage_3() -> None:
    with pytest.raises(ValidationError) as exc:
        ParallelSetup(num_gpus=2, zero_stage=2, offload="optimizer+params")
    _, msg = _only_error(exc)
    assert "offload=optimizer+params" in msg
    assert "zero_stage=2" in msg


def test_tensor_parallel_degree_must_divide_the_gpus() -> None:
    with pytest.raises(ValidationError) as exc:
        ParallelSetup(num_gpus=4, tensor_parallel_degree=3)
    _, msg = _only_error(exc)
    assert "tensor_parallel_degree=3" in msg
    assert "num_gpus=4" in msg


@pytest.mark.parametrize(
    ("field", "value"), [("num_gpus", 0), ("zero_stage", 4), ("zero_stage", -1)]
)
def test_parallel_field_bounds(field: str, value: int) -> None:
    with pytest.raises(ValidationError) as exc:
        ParallelSetup(**{field: value})
    loc, _ = _only_error(exc)
    assert loc == (field,)


def test_data_parallel_degree_is_gpus_over_tensor_parallel_degree() -> None:
    parallel = ParallelSetup(num_gpus=16, tensor_parallel_degree=4, zero_stage=3)
    assert parallel.data_parallel_degree == 4
    assert parallel.uses_deepspeed
    assert not ParallelSetup(num_gpus=16, zero_stage=0).uses_deepspeed
    assert not ParallelSetup(num_gpus=2, zero_stage=2, sharding=Sharding.FSDP).uses_deepspeed


# -- ModelSpec -----------------------------------------------------------------------------


def _spec(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": "m",
        "family": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "num_decoder_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "gated_mlp": True,
        "norm_type": "rmsnorm",
    }
    fields.update(overrides)
    return fields


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"num_decoder_layers": 0}, "num_encoder_layers + num_decoder_layers"),
        ({"layout": {"bogus": 1}}, "'bogus'"),
        ({"num_experts": 8, "num_experts_per_token": 9}, "num_experts_per_token=9"),
    ],
)
def test_model_spec_shape_checks_name_the_field(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ModelSpec(**_spec(**overrides))
    _, msg = _only_error(exc)
    assert needle in msg


def test_model_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        ModelSpec(**_spec(hidden_sise=64))
    loc, _ = _only_error(exc)
    assert loc == ("hidden_sise",)


def test_specs_are_frozen(tiny_llama: ModelSpec) -> None:
    with pytest.raises(ValidationError):
        tiny_llama.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        TrainingSetup().seq_len = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ParallelSetup().num_gpus = 8  # type: ignore[misc]
    with pytest.raises(ValidationError):
        TrainingSetup(sequence_length=1024)  # type: ignore[call-arg]  # extra="forbid"


# -- method defaults -----------------------------------------------------------------------


def test_qlora_defaults_follow_the_qlora_recipe_and_are_recorded() -> None:
    setup = TrainingSetup(method="qlora")
    # arXiv:2305.14314 / qlora.py: NF4 + double quant, bf16 compute, paged AdamW 32-bit,
    # r=64 alpha=16 dropout 0.05 on all linear layers, gradient checkpointing.
    assert setup.quant is Quantization.NF4
    assert setup.double_quant is True
    assert setup.precision is Precision.BF16
    assert setup.optimizer is Optimizer.PAGED_ADAMW
    assert setup.grad_ckpt is True
    assert (setup.lora_r, setup.lora_alpha, setup.lora_dropout) == (64, 16.0, 0.05)
    assert setup.lora_targets == ALL_LINEAR
    assert setup.defaults_from_method == tuple(sorted(methods()["qlora"].defaults))


@pytest.mark.parametrize("method", method_names())
def test_every_method_records_exactly_the_defaults_it_filled(method: str) -> None:
    setup = TrainingSetup(method=method)
    defaults = methods()[method].defaults
    assert setup.defaults_from_method == tuple(sorted(defaults))
    for field, value in defaults.items():
        assert getattr(setup, field) == value


def test_explicit_values_override_method_defaults_and_are_not_reported() -> None:
    setup = TrainingSetup(
        method="qlora", lora_r=16, grad_ckpt=False, optimizer="adamw", precision="fp16"
    )
    assert setup.lora_r == 16
    assert setup.grad_ckpt is False  # an explicit False is a value, not "unset"
    assert setup.optimizer is Optimizer.ADAMW
    assert setup.precision is Precision.FP16
    assert not {"lora_r", "grad_ckpt", "optimizer", "precision"} & set(setup.defaults_from_method)
    assert setup.quant is Quantization.NF4  # the fields left out still get the recipe
    assert "quant" in setup.defaults_from_method


def test_full_fine_tuning_default_is_bf16_autocast_with_adamw() -> None:
    setup = TrainingSetup()
    assert setup.method == "full"
    assert setup.precision is Precision.BF16_AMP
    assert setup.optimizer is Optimizer.ADAMW
    assert setup.precision.weight_dtype.value == "fp32"  # AMP keeps fp32 weights
    assert setup.precision.compute_dtype.value == "bf16"


def test_a_setting_of_another_method_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(method="full", lora_r=16)
    assert "lora_r configures method lora/dora/qlora; method=full does not use it" in str(exc.value)
    assert TrainingSetup(method="full", lora_r=8).lora_r == 8  # the default changes nothing


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_setup_round_trips_through_json_without_refilling_defaults(method: str) -> None:
    lora = {"lora_r": 32} if method != "full" else {}
    setup = TrainingSetup(method=method, micro_batch_size=4, **lora)
    again = TrainingSetup.model_validate(setup.model_dump(mode="json"))
    assert again == setup
    assert again.defaults_from_method == setup.defaults_from_method


def test_fsdp_alone_means_full_shard() -> None:
    assert ParallelSetup(num_gpus=2, sharding="fsdp").zero_stage == 3
    assert ParallelSetup(num_gpus=2, sharding="fsdp").fsdp_strategy is FSDPStrategy.FULL_SHARD
    assert ParallelSetup(num_gpus=2, sharding="fsdp", zero_stage=2).zero_stage == 2


@pytest.mark.parametrize(
    ("fields", "strategy"),
    [
        ({"zero_stage": 3}, FSDPStrategy.FULL_SHARD),
        ({"zero_stage": 2}, FSDPStrategy.SHARD_GRAD_OP),
        ({"zero_stage": 0}, FSDPStrategy.NO_SHARD),
        ({"zero_stage": 3, "shard_group_size": 8}, FSDPStrategy.HYBRID_SHARD),
        ({"zero_stage": 3, "shard_group_size": 16}, FSDPStrategy.FULL_SHARD),  # one group
    ],
)
def test_fsdp_strategy_of_a_layout(fields: dict[str, int], strategy: FSDPStrategy) -> None:
    parallel = ParallelSetup(num_gpus=16, sharding="fsdp", **fields)
    assert parallel.fsdp_strategy is strategy
    assert strategy.zero_stage == parallel.zero_stage
    assert ParallelSetup(num_gpus=16).fsdp_strategy is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"sharding": "fsdp", "offload": "optimizer"}, "FSDP cannot offload the optimizer"),
        ({"sharding": "fsdp", "shard_group_size": 3}, "does not divide"),
        ({"sharding": "fsdp", "zero_stage": 0, "shard_group_size": 8}, "that shards"),
        ({"zero_stage": 3, "shard_group_size": 8}, "DeepSpeed ZeRO shards across every"),
    ],
)
def test_sharding_layouts_refused_in_one_line(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ParallelSetup(num_gpus=16, **fields)
    _, msg = _only_error(exc)
    assert words in msg


# -- kbit_prep: the Hugging Face QLoRA recipe ----------------------------------------------


def test_kbit_prep_reads_the_16_bit_load_dtype_as_its_amp_regime() -> None:
    # The qlora preset's precision (bf16) names torch_dtype; the preparation upcasts to fp32.
    assert TrainingSetup(method="qlora", kbit_prep=True).precision is Precision.BF16_AMP
    setup = TrainingSetup(method="qlora", precision="fp16", kbit_prep=True)
    assert setup.precision is Precision.FP16_AMP
    assert TrainingSetup(method="qlora").precision is Precision.BF16  # the preset unchanged


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"method": "lora"}, "set quant nf4, fp4 or int8"),
        ({"method": "lora", "quant": "nf4", "precision": "fp32"}, "not fp32"),
    ],
)
def test_kbit_prep_is_refused_in_one_line_where_it_means_nothing(
    fields: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(**fields, kbit_prep=True)
    _, msg = _only_error(exc)
    assert words in msg
    assert "\n" not in msg

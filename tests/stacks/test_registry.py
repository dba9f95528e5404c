"""The stack registry, and how a stack's defaults combine with the method's and the user's."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from memplan.methods import method
from memplan.specs import TrainingSetup
from memplan.stacks import DEFAULT_STACK, Request, stack, stacks


def test_the_default_stack_is_registered() -> None:
    assert DEFAULT_STACK in stacks()
    assert TrainingSetup().stack == DEFAULT_STACK


@pytest.mark.parametrize("name", list(stacks()))
def test_every_stack_names_a_source_for_each_default(name: str) -> None:
    entry = stack(name)
    assert entry.name == name
    assert entry.summary
    for run in ("full", "lora", "qlora"):
        request = Request(method(run), quantized=run == "qlora")
        for field, default in entry.defaults(request).items():
            assert field in TrainingSetup.model_fields, field
            assert default.source.strip(), (name, field)
    for field, default in entry.parallel_defaults().items():
        assert default.source.strip(), (name, field)


@pytest.mark.parametrize("name", list(stacks()))
@pytest.mark.parametrize("run", ["full", "lora", "qlora"])
def test_stack_defaults_fill_only_fields_left_out(name: str, run: str) -> None:
    setup = TrainingSetup(stack=name, method=run)
    given = stack(name).defaults(Request(method(run), quantized=run == "qlora"))
    assert set(setup.defaults_from_stack) == set(given)
    for field in setup.defaults_from_stack:
        assert getattr(setup, field) == given[field].value, field
    # an explicit value always wins and is not reported as the stack's
    explicit = TrainingSetup(stack=name, method=run, grad_ckpt=False)
    assert explicit.grad_ckpt is False
    assert "grad_ckpt" not in explicit.defaults_from_stack


def test_a_setup_round_trips_through_json_with_its_stack() -> None:
    setup = TrainingSetup(method="qlora", micro_batch_size=2)
    again = TrainingSetup.model_validate(setup.model_dump(mode="json"))
    assert again == setup
    assert again.defaults_from_stack == setup.defaults_from_stack


def test_unknown_stack_is_one_error_naming_the_known_ones() -> None:
    with pytest.raises(ValidationError) as exc:
        TrainingSetup(stack="nemo")
    errors = exc.value.errors()
    assert len(errors) == 1
    assert "unknown stack 'nemo'" in errors[0]["msg"]
    assert DEFAULT_STACK in errors[0]["msg"]

"""Library versions as part of the question: ``--assume bitsandbytes=0.42.0``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from memplan.analytic.predict import predict
from memplan.catalog import load_model
from memplan.specs import TrainingSetup
from memplan.trace import Category
from memplan.versions import fields_for, parse_assume, parse_version


def test_versions_compare_numerically() -> None:
    assert parse_version("0.43.10") > parse_version("0.43.2")
    assert fields_for({"bitsandbytes": "0.43.1"}) == {"quant_matmul_saves_input": True}
    assert fields_for({"bitsandbytes": "0.43.2"}) == {}
    assert fields_for({"bitsandbytes": "0.45"}) == {}


def test_an_old_bitsandbytes_keeps_every_4bit_matmul_input() -> None:
    spec = load_model("tiny-llama")
    fields = {"method": "qlora", "grad_ckpt": False, "micro_batch_size": 2, "seq_len": 64}
    current = predict(spec, TrainingSetup(**fields)).trace.peak()
    old_setup = TrainingSetup(**fields, library_versions={"bitsandbytes": "0.42.0"})
    assert old_setup.quant_matmul_saves_input
    old = predict(spec, old_setup).trace.peak()
    # Per layer, the distinct inputs of 4-bit linears: the attention input (q, k, v share it),
    # the o_proj input, the MLP input (gate and up share it) and down_proj's input, in bf16;
    # those another op saves already (SDPA keeps its output, o_proj's input) add nothing.
    tokens, hidden, ffn = 2 * 64, spec.hidden_size, spec.intermediate_size
    at_most = spec.num_decoder_layers * tokens * (3 * hidden + ffn) * 2
    at_least = spec.num_decoder_layers * tokens * (hidden + ffn) * 2
    added = (
        old.breakdown_bytes[Category.ACTIVATIONS] - current.breakdown_bytes[Category.ACTIVATIONS]
    )
    assert at_least <= added <= at_most


def test_a_field_contradicting_the_versions_is_refused() -> None:
    with pytest.raises(ValidationError, match="contradicts the library versions"):
        TrainingSetup(
            method="qlora",
            quant_matmul_saves_input=False,
            library_versions={"bitsandbytes": "0.41.1"},
        )


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["torch=2.1"], "no mechanism of library 'torch'"),
        (["bitsandbytes"], "expected LIBRARY=VERSION"),
        (["bitsandbytes=zero"], "not of the form 0.42.0"),
    ],
)
def test_bad_assumptions_name_the_problem(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_assume(items)


def test_cli_names_the_versions_in_the_assumptions(run_cli: Any) -> None:
    argv = ["plan", "llama-2-7b", "--method", "qlora", "--json"]
    current = run_cli(*argv).json()
    old = run_cli(*argv, "--assume", "bitsandbytes=0.42.0").json()
    assert old["peak_bytes"] > current["peak_bytes"]
    assert old["setup"]["library_versions"] == {"bitsandbytes": "0.42.0"}
    assert any(a.startswith("bitsandbytes 0.42.0 assumed: MatMul4Bit") for a in old["assumptions"])
    bad = run_cli(*argv, "--assume", "torch=2.1")
    assert bad.code == 2
    assert bad.err.count("\n") == 1

"""The web API's answers are the CLI's: the same JSON for the same question, the same one-line
message for the same bad input, tied to the field that caused it. No web framework needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.web.inputs import MAX_BODY_BYTES
from memplan.web.jobs import SWEEP_PLAN_CALLS, Kind, answer

QLORA_65B = {"model": "llama-65b", "setup": {"method": "qlora"}, "gpu": "rtx-a6000"}
ARGV_65B = ["llama-65b", "--method", "qlora", "--gpu", "rtx-a6000"]


def ask(kind: Kind, body: dict[str, Any] | bytes, time_limit_s: float = 600.0) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return answer(kind, data, time_limit_s=time_limit_s)


def cli_error(run_cli: Any, *argv: str) -> str:
    run = run_cli(*argv)
    assert run.code == 2
    assert run.out == ""
    return str(run.err.strip().removeprefix("memplan: error: "))


def test_plan_answers_what_plan_json_prints(run_cli: Any) -> None:
    status, payload = ask("plan", QLORA_65B)
    assert status == 200
    assert payload == run_cli("plan", *ARGV_65B, "--json").json()
    assert payload["verdict"] == "borderline"


def test_a_plan_that_does_not_fit_carries_the_cli_fixes(run_cli: Any) -> None:
    body = {"model": "llama-2-7b", "setup": {"method": "full"}, "gpu": "rtx-4090"}
    status, payload = ask("plan", body)
    assert status == 200
    expected = run_cli("plan", "llama-2-7b", "--gpu", "rtx-4090", "--json").json()
    assert payload == expected
    assert payload["verdict"] == "does not fit"
    assert payload["fixes"]
    assert all(fix["fits"] for fix in payload["fixes"])


def test_fit_and_recommend_answer_what_their_json_prints(run_cli: Any) -> None:
    argv = ["tiny-llama", "--method", "lora", "--seq", "256"]
    body = {"model": "tiny-llama", "setup": {"method": "lora", "seq_len": 256}, "gpu": "1GiB"}
    status, payload = ask("fit", {**body, "table": True})
    assert status == 200
    assert payload == run_cli("fit", *argv, "--gpu", "1GiB", "--table", "--json").json()
    status, payload = ask("recommend", {**body, "gpu": "rtx-4090", "tokens": "50M"})
    assert status == 200
    cli = run_cli("recommend", *argv, "--gpu", "rtx-4090", "--tokens", "50M", "--json").json()
    assert payload == cli


def test_the_layout_and_an_uploaded_config_are_read_as_the_cli_reads_them(
    run_cli: Any, tmp_path: Path
) -> None:
    from memplan.catalog import catalog_record

    config = catalog_record("llama-2-7b")["config"]
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(config))
    body = {
        "config": {"name": "my-model.json", "text": path.read_text()},
        "setup": {"method": "lora", "micro_batch_size": 2},
        "parallel": {"num_gpus": 4, "zero_stage": 3, "sharding": "fsdp"},
        "gpu": "24GiB",
    }
    status, payload = ask("plan", body)
    assert status == 200
    argv = [str(path), "--method", "lora", "--batch", "2", "--gpus", "4", "--fsdp"]
    assert payload == run_cli("plan", *argv, "--gpu", "24GiB", "--json").json()


@pytest.mark.parametrize(
    ("body", "argv", "field"),
    [
        (
            {**QLORA_65B, "setup": {"method": "qlora", "micro_batch_size": 0}},
            [*ARGV_65B, "--batch", "0"],
            "setup.micro_batch_size",
        ),
        ({**QLORA_65B, "model": "llama-65x"}, ["plan", "llama-65x"], "model"),
        ({**QLORA_65B, "gpu": "rtx-9999"}, [*ARGV_65B[:3], "--gpu", "rtx-9999"], "gpu"),
        (
            {**QLORA_65B, "parallel": {"num_gpus": 0}},
            [*ARGV_65B, "--gpus", "0"],
            "parallel.num_gpus",
        ),
        (
            {**QLORA_65B, "setup": {"method": "lora", "lora_targets": "nonesuch"}},
            ["llama-65b", "--method", "lora", "--lora-targets", "nonesuch"],
            "setup.lora_targets",
        ),
    ],
)
def test_a_bad_field_gets_the_cli_message_and_its_name(
    body: dict[str, Any], argv: list[str], field: str, run_cli: Any
) -> None:
    status, payload = ask("plan", body)
    argv = argv if argv[0] == "plan" else ["plan", *argv]
    assert (status, payload) == (400, {"error": cli_error(run_cli, *argv), "field": field})


def test_a_malformed_config_gets_the_cli_message(run_cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",\n "hidden_size": }')
    body = {"config": {"name": str(path), "text": path.read_text()}}
    status, payload = ask("plan", body)
    assert status == 400
    assert payload == {"error": cli_error(run_cli, "plan", str(path)), "field": "config"}
    assert "malformed JSON" in payload["error"]


def test_a_config_of_an_unknown_model_type_names_the_file() -> None:
    body = {"config": {"name": "config.json", "text": '{"model_type": "nonesuch"}'}}
    status, payload = ask("plan", body)
    assert status == 400
    assert payload["field"] == "config"
    assert payload["error"].startswith("config.json: unsupported model_type 'nonesuch'")


@pytest.mark.parametrize(
    ("data", "message", "field"),
    [
        (b"[1, 2]", "expected a JSON object, got list", None),
        (b"{", "request body: malformed JSON", None),
        (b'{"model": "llama-65b", "batch": 4}', "unknown field 'batch'", "batch"),
        (b'{"model": "../../etc/passwd.json"}', "unknown model '../../etc/passwd.json'", "model"),
        (b'{"model": "llama-65b", "setup": [1]}', "setup: expected a JSON object", "setup"),
        (b'{"model": "llama-65b", "safety": 2}', "invalid --safety", "safety"),
        (b'{"model": "llama-65b", "tokens": "lots"}', "cannot read token count", "tokens"),
        (b'{"model": "llama-65b", "rank": "speed"}', "invalid --rank", "rank"),
        (b'{"model": "' + b"x" * 300 + b'"}', "is not a catalog name", "model"),
    ],
)
def test_bad_requests_are_one_line_and_name_their_field(
    data: bytes, message: str, field: str | None
) -> None:
    status, payload = ask("plan", data)
    assert status == 400
    assert message in payload["error"]
    assert "\n" not in payload["error"]
    assert payload["field"] == field


def test_fit_needs_a_gpu() -> None:
    status, payload = ask("fit", {"model": "tiny-llama"})
    assert (status, payload["field"]) == (400, "gpu")


def test_a_body_over_the_bound_is_refused_unread() -> None:
    status, payload = ask("plan", b" " * (MAX_BODY_BYTES + 1))
    assert status == 400
    assert f"at most {MAX_BODY_BYTES:,}" in payload["error"]


@pytest.mark.parametrize("kind", ["fit", "recommend"])
def test_a_sweep_longer_than_the_limit_is_refused_before_it_starts(kind: Kind) -> None:
    # One plan of llama-65b takes a tenth of a second or more: its sweep cannot finish in 1 ms.
    status, payload = ask(kind, QLORA_65B, time_limit_s=0.001)
    assert status == 400
    assert f"{kind} would run about {SWEEP_PLAN_CALLS[kind]} plans" in payload["error"]
    assert f"run `memplan {kind}` in a shell" in payload["error"]

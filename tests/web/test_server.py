"""``memplan serve`` over HTTP: the page and its assets, every endpoint, the bounds, the command."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from memplan.web.inputs import MAX_BODY_BYTES
from tests.web.conftest import Server, free_port, running_server

QLORA_65B = {"model": "llama-65b", "setup": {"method": "qlora"}, "gpu": "rtx-a6000"}


def test_the_page_and_its_assets_come_from_this_server_only(server: Server) -> None:
    status, page, headers = server.get("/")
    assert status == 200
    assert "default-src 'self'" in headers["content-security-policy"]
    sources = re.findall(rb'(?:src|href)="([^"]+)"', page)
    assert sources
    for source in sources:
        if source.startswith(b"data:"):
            continue
        assert source.startswith(b"/static/"), source
        found, body, _ = server.get(source.decode())
        assert found == 200
        # The only URL in the script is the SVG namespace, an identifier never fetched.
        urls = set(re.findall(rb"https?://[^\s\"'`]+", body))
        assert urls <= {b"http://www.w3.org/2000/svg"}, urls


def test_choices_list_the_catalog_and_the_profiles(server: Server) -> None:
    from memplan.catalog import catalog_names
    from memplan.hardware import list_profiles

    status, body, _ = server.get("/api/choices")
    assert status == 200
    import json

    choices = json.loads(body)
    assert [m["name"] for m in choices["models"]] == list(catalog_names())
    assert [g["name"] for g in choices["gpus"]] == [p.name for p in list_profiles()]


def test_every_endpoint_answers_its_json(server: Server, run_cli: Any) -> None:
    status, plan = server.post("/api/plan", QLORA_65B)
    assert status == 200
    argv = ["llama-65b", "--method", "qlora", "--gpu", "rtx-a6000", "--json"]
    assert plan == run_cli("plan", *argv).json()
    body = {"model": "tiny-llama", "setup": {"method": "lora"}, "gpu": "1GiB"}
    status, fit = server.post("/api/fit", body)
    assert status == 200
    assert fit == run_cli("fit", "tiny-llama", "--method", "lora", "--gpu", "1GiB", "--json").json()
    status, found = server.post("/api/recommend", body)
    assert status == 200
    cli = run_cli("recommend", "tiny-llama", "--method", "lora", "--gpu", "1GiB", "--json")
    assert found == cli.json()


def test_a_bad_input_is_a_400_with_the_message_and_the_field(server: Server) -> None:
    status, payload = server.post("/api/plan", {**QLORA_65B, "setup": {"micro_batch_size": -1}})
    assert status == 400
    assert payload == {
        "error": "invalid --batch: Input should be greater than 0 (got -1)",
        "field": "setup.micro_batch_size",
    }


def test_limits_of_the_http_layer(server: Server) -> None:
    # A body declared over the limit is refused before it is read (the refusal may arrive
    # while a client is still sending, so this one waits for it before sending anything).
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.putrequest("POST", "/api/plan")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert "request body over" in json.loads(response.read())["error"]
    connection.close()
    status, payload = server.post("/api/nonesuch", QLORA_65B)
    assert status == 404
    assert "no API 'nonesuch'" in payload["error"]
    # Served on 127.0.0.1: a page that reached it under another name is refused.
    status, _, _ = server.get("/", Host="attacker.example")
    assert status == 400


def test_an_answer_past_the_time_limit_is_stopped() -> None:
    with running_server("--time-limit", "0.02") as short:
        status, payload = short.post("/api/plan", QLORA_65B)
        assert status == 503
        assert payload["error"].startswith("plan took longer than this server's limit of 0.02 s")
        # The server is still there for the next question.
        status, _, _ = short.get("/api/choices")
        assert status == 200


def _serve(*argv: str, block: str = "") -> subprocess.CompletedProcess[str]:
    """``memplan serve`` in a fresh interpreter, with the named modules unimportable."""
    code = f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {block.split(",") if block else []!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        from memplan.cli import main
        sys.exit(main({["serve", *argv]!r}))
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_serve_without_the_web_extra_is_one_line_and_exit_2(missing: str) -> None:
    proc = _serve(block=missing)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"memplan: error: memplan serve needs the web extra ({missing} is missing): "
        "pip install 'memplan[web]'"
    ]


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    pytest.importorskip("starlette")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--port", str(port))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


@pytest.mark.parametrize(("flag", "value"), [("--port", "70000"), ("--time-limit", "0")])
def test_bad_serve_flags_are_one_line_and_exit_2(flag: str, value: str, run_cli: Any) -> None:
    run = run_cli("serve", flag, value)
    assert run.code == 2
    assert len(run.err.splitlines()) == 1
    assert flag in run.err

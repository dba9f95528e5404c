"""The planning core is torch-free: importing it and running a plan loads no heavy library.

Each check runs in a fresh interpreter, so modules other tests imported do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "transformers", "matplotlib")
PLAN_ARGV = ["plan", "llama-65b", "--method", "qlora", "--gpu", "rtx-a6000", "--json"]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_importing_the_api_loads_no_heavy_library() -> None:
    proc = _python(
        f"""
        import sys
        import memplan, memplan.plan, memplan.cli
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(",".join(heavy))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_a_json_plan_loads_no_heavy_library() -> None:
    proc = _python(
        f"""
        import contextlib, io, json, sys
        from memplan.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main({PLAN_ARGV!r})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        fits = json.loads(out.getvalue())["fits"]
        print(json.dumps({{"code": code, "heavy": heavy, "fits": fits}}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"code": 0, "heavy": [], "fits": True}


def test_the_command_works_where_the_heavy_libraries_cannot_be_imported() -> None:
    # A meta-path hook makes `import torch` (and the others) fail, as on a machine without
    # them; the plan and its table must not notice.
    proc = _python(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError(f"{{name}} is blocked")
                return None
        sys.meta_path.insert(0, Block())
        from memplan.cli import main
        assert main({PLAN_ARGV[:-1]!r}) == 0
        assert main({PLAN_ARGV!r}) == 0
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(("FITS on rtx-a6000", "BORDERLINE on rtx-a6000"))


def test_the_cli_process_imports_no_heavy_library() -> None:
    # -X importtime lists every module the process imports, on stderr.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "memplan.cli", *PLAN_ARGV],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["fits"] is True
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "memplan.plan" in imported  # the listing is what we think it is
    assert sorted(m for m in imported if m.split(".")[0] in HEAVY) == []

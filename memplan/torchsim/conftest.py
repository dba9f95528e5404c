"""Doctest collection of torchsim needs torch (and peft for the QLoRA layer): skip without."""

from __future__ import annotations

import importlib.util

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("torch") is None:
    collect_ignore_glob.append("*.py")
elif importlib.util.find_spec("peft") is None:
    collect_ignore_glob.append("qlora.py")

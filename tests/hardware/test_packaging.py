"""The wheel ships every memplan package and the top-level hardware_profiles/ folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.hardware import list_profiles

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the check is the same on every version

REPO_ROOT = Path(__file__).resolve().parents[2]


def _setuptools_config() -> dict[str, Any]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        config: dict[str, Any] = tomllib.load(file)["tool"]["setuptools"]
    return config


def test_every_package_under_memplan_is_listed_for_the_wheel() -> None:
    # Any folder holding Python files is a package (regular or namespace) that must ship.
    on_disk = {
        ".".join(module.parent.relative_to(REPO_ROOT).parts)
        for module in (REPO_ROOT / "memplan").rglob("*.py")
        if "__pycache__" not in module.parts
    }
    listed = set(_setuptools_config()["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"memplan.hardware_profiles"}


def test_hardware_profiles_folder_ships_as_package_data() -> None:
    config = _setuptools_config()
    assert config["package-dir"]["memplan.hardware_profiles"] == "hardware_profiles"
    assert config["package-data"]["memplan.hardware_profiles"] == ["*.json"]
    assert (REPO_ROOT / "hardware_profiles" / "__init__.py").is_file()
    shipped = {path.stem for path in (REPO_ROOT / "hardware_profiles").glob("*.json")}
    assert shipped == {profile.name for profile in list_profiles()}

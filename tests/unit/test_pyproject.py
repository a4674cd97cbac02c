"""The build metadata stays in the form setuptools will keep accepting (issue 16):
``project.license`` as a TOML table is deprecated and unsupported after 2027-02-18."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_license_is_an_spdx_string_not_a_table():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    license_ = project["license"]
    assert isinstance(license_, str), f"project.license is a {type(license_).__name__}"
    assert license_ == "Apache-2.0"
    # With an SPDX expression, a "License ::" classifier is an error for setuptools >= 77.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]

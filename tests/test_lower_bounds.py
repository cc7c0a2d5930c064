"""pyproject's lower bounds of the core stack are exactly the versions CI's second venv tests (they cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI runs 3.11

REPO = Path(__file__).resolve().parents[1]
#: The packages whose lowest declared version .ci/run installs and tests.
TESTED_AT_FLOOR = ("torch", "transformers", "peft", "accelerate")


def _declared_floors() -> dict[str, Version]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors: dict[str, Version] = {}
    for line in deps:
        req = Requirement(line)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if req.name in TESTED_AT_FLOOR:
            assert len(lows) == 1, f"pyproject: {line!r} needs exactly one '>=' bound (the tested lowest version)"
            floors[req.name] = lows[0]
    return floors


def _ci_pins() -> dict[str, Version]:
    text = (REPO / ".ci" / "run").read_text()
    match = re.search(r"^LOWEST=\(([^)]*)\)", text, flags=re.MULTILINE)
    assert match, ".ci/run has no LOWEST=(...) line"
    pins = {}
    for item in match.group(1).split():
        name, _, version = item.partition("==")
        assert version, f".ci/run LOWEST: {item!r} is not an exact pin (name==version)"
        pins[name] = Version(version)
    return pins


def test_ci_tests_exactly_the_declared_lower_bounds() -> None:
    floors = _declared_floors()
    assert sorted(floors) == sorted(TESTED_AT_FLOOR), "a core package lost its lower bound in pyproject.toml"
    assert _ci_pins() == floors


def test_the_lowest_venv_runs_the_core_tests() -> None:
    text = (REPO / ".ci" / "run").read_text()
    block = text[text.index("LOWEST=(") :]
    assert ".venv-lowest" in block and '"${LOWEST[@]}"' in block
    for test_file in ("test_processing_processor.py", "test_model.py", "test_training_e2e.py"):
        assert f"tests/core/{test_file}" in block

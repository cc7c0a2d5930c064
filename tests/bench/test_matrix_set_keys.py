"""phi3v-bench matrix from the user's side: a field given twice, or both fixed and swept, is refused in one line."""

from __future__ import annotations

import pytest

from bench.cli import main
from tests.safety_helpers import expect_user_error


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "steps=5", "steps=10"], "--set steps is given twice; give each field once"),
        (["--set", "steps=5", "--set", "steps=5"], "--set steps is given twice"),
        (["--grid", "method=lora,qlora", "--set", "method=full"], "--set method conflicts with the --grid axis method"),
        (["--set", "release=v9", "--release", "v8"], "--set release conflicts with --release"),
    ],
    ids=["twice-in-one-set", "twice-in-two-sets", "set-and-grid", "set-and-release"],
)
def test_a_field_set_two_ways_is_refused(argv, expected, tmp_path, capsys):
    expect_user_error(
        main, ["matrix", "--preset", "quick", "--out", str(tmp_path / "r"), "--dry-run", *argv], expected, tmp_path, capsys
    )

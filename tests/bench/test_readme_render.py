"""README numbers cannot go stale: every numbers block is what ``python -m bench.readme`` renders from its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import readme
from bench.readme import BLOCKS, REPO_ROOT, main, render_blocks, render_readme
from phi3v_core.errors import DataError


def test_the_readme_is_what_the_script_renders() -> None:
    """Fails when a stored result, the planner or the GPU tests changed and ``python -m bench.readme render`` was not run."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = render_blocks(text)
    assert set(blocks) == set(BLOCKS), "every renderer has its block in README.md"
    stale = {name: new for name, (old, new) in blocks.items() if old != new}
    assert not stale, f"stale README blocks {sorted(stale)}: run python -m bench.readme render"


def test_every_measured_block_names_its_source_file_command_commit_date_and_machine() -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for name, (_old, new) in render_blocks(text, only={"cpu-validation", "checkpointing", "optimizer-memory",
                                                        "selfcheck-run", "cpu-bench-table", "supervised-logits"}).items():
        assert "results/" in new and "written by `" in new and " at commit " in new and ", on " in new, name


def _fake_repo(tmp_path: Path, median: float) -> Path:
    record = {"command": "phi3v-plan --validate", "date": "2026-01-02T03:04:05+00:00", "machine": "cpu-X-2t",
              "git_sha": "a" * 40, "git_dirty": False,
              "result": {"rows": [], "median_abs_error_pct": median, "max_abs_error_pct": median, "repeats": 1}}
    path = tmp_path / "results" / "validation" / "plan-validate-cpu-AMD-EPYC-2t-20261201.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return tmp_path


def test_a_changed_result_makes_its_block_stale_and_render_rewrites_only_the_block(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path, 7.5)
    text = "# hand-written\n\n<!-- render:cpu-validation -->\nold numbers\n<!-- /render -->\n\nkept as is\n"
    (old, new), = render_blocks(text, root).values()
    assert old == "old numbers\n" and "Median error 7.5 %" in new and "commit aaaaaaa, 2026-01-02, on cpu-X-2t" in new
    rendered = render_readme(text, root)
    assert rendered.startswith("# hand-written\n\n<!-- render:cpu-validation -->\n") and rendered.endswith(
        "<!-- /render -->\n\nkept as is\n"
    )
    assert render_readme(rendered, root) == rendered  # rendering is a fixed point
    _fake_repo(tmp_path / "other", 9.0)
    (old, new), = render_blocks(rendered, tmp_path / "other").values()
    assert old != new and "Median error 9.0 %" in new


def test_check_exits_1_naming_the_stale_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(readme, "REPO_ROOT", _fake_repo(tmp_path, 7.5))
    monkeypatch.setattr(readme, "render_blocks", lambda text, root=tmp_path, only=None: render_blocks(text, tmp_path))
    path = tmp_path / "README.md"
    path.write_text("<!-- render:cpu-validation -->\nold\n<!-- /render -->\n")
    assert main(["check", "--readme", str(path)]) == 1
    assert "stale block(s) cpu-validation" in capsys.readouterr().err
    monkeypatch.setattr(readme, "render_readme", lambda text, root=tmp_path: render_readme(text, tmp_path))
    assert main(["render", "--readme", str(path)]) == 0
    assert main(["check", "--readme", str(path)]) == 0


def test_an_unknown_block_or_a_missing_result_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="render:nope"):
        render_blocks("<!-- render:nope -->\nx\n<!-- /render -->\n", tmp_path)
    with pytest.raises(DataError, match="cannot read the stored result"):
        render_blocks("<!-- render:cpu-validation -->\nx\n<!-- /render -->\n", tmp_path)


def test_calibration_rows_are_labelled_as_the_planner_names_them() -> None:
    # "A100 x1" read as one GPU; the row is one node of 8 A100s, which phi3v-plan --calibration calls 8xA100-80GB x1.
    block = readme.render_calibration(REPO_ROOT)
    rows = [line for line in block.splitlines() if line.startswith("| 8x")]
    assert rows and rows[0].startswith("| 8xA100-80GB x1 full no FA |")
    assert not any(line.startswith(("| A100 ", "| V100 ")) for line in block.splitlines())
    assert "GPUs per node x GPU, x nodes" in block

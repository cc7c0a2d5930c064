"""``matrix`` and ``run`` take one set of defaults (their results meet in ``compare``); ``--dry-run`` says how long."""

from __future__ import annotations

import json

from bench.cli import build_parser, config_from_args, main
from bench.config import DeviceDescription
from bench.matrix import build_cells

CPU = DeviceDescription()


def test_a_sweep_cell_is_the_run_of_the_same_flags():
    for method in ("lora", "full"):
        run, _ = config_from_args(build_parser().parse_args(["run", "--method", method]), CPU)
        (cell,) = build_cells(grid={"method": [method]}, device=CPU)
        assert cell.to_dict() == run.to_dict()
    assert (cell.precision, cell.global_batch) == ("fp32", 2)  # not the dataclass's bf16 / batch 8


def test_dry_run_prints_the_expected_time(tmp_path, capsys):
    assert main(["matrix", "--grid", "method=lora,full", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "2 cells (dry run; nothing was run); expected time ~" in capsys.readouterr().out
    assert main(["matrix", "--grid", "method=lora,full", "--out", str(tmp_path), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expected_seconds"] > 0

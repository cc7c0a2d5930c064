"""The planner knows packing (#25 §2): padding padded vs packed, when it pays, the command, ``--data``, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from planner.calibration import fit_speed_constants, load_calibration
from planner.estimate import SampleShape
from planner.hardware import gpu_table
from planner.packing import (
    data_packing,
    packed_memory,
    predict_packing,
    row_cost,
    token_sums,
)
from planner.shapes import load_shape
from planner.speed import Rates
from planner.train_setup import TrainSetup
from tests.planner.test_plan_data import _json, _run

FIXTURE = Path(__file__).parent / "data" / "packing-cpu-fixture.json"


def _cost(attn: str, micro_batch: int = 4):
    shape = load_shape("phi-3.5-vision")
    constants, _ = fit_speed_constants(load_calibration(), load_shape("phi-3-vision"))
    gpu = next(g for g in gpu_table() if g.key == "H100-SXM")
    setup = TrainSetup(method="lora", attn=attn, micro_batch=micro_batch)
    mean = SampleShape.from_images(shape, 16, (1008, 1680), text_tokens=66)
    return shape, setup, row_cost(shape, setup, mean, constants.rates(gpu, "bf16"), constants)


def test_padding_fractions_on_a_known_list():
    # micro-batches [5, 9, 3, 4] and [6, 2, 2, 1] (dataset order, no shuffle)
    sums = token_sums([5, 9, 3, 4, 6, 2, 2, 1], 4, "sdpa", shuffles=0)
    # padded: 4 x 9 + 4 x 6 = 60 computed for 32 real; packed (budget = the micro-batch's longest):
    # [9], [5, 4], [3] → 3 rows of 9 = 27; [6], [2, 2, 1] → 2 rows of 6 = 12
    assert (sums.real, sums.padded, sums.packed, sums.packed_rows) == (32, 60, 39, 5)
    prediction = predict_packing(sums, "sdpa", None, None)
    assert prediction.padding_padded == pytest.approx(1 - 32 / 60)
    assert prediction.padding_packed == pytest.approx(1 - 32 / 39)
    assert prediction.rows_per_micro_batch == pytest.approx(2.5)
    flash = token_sums([5, 9, 3, 4, 6, 2, 2, 1], 4, "flash_attention_2", shuffles=0)
    assert flash.packed == 32 and flash.packed_rows == 2  # one flattened row per micro-batch, no padding


def test_packing_pays_when_lengths_vary_not_when_uniform():
    _shape, _setup, cost = _cost("flash_attention_2")
    mixed = predict_packing(token_sums([300, 2400, 500, 800] * 32, 4, "flash_attention_2"), "flash_attention_2", None, cost)
    assert mixed.pays and mixed.speed_up > 1.2 and "packing pays" in mixed.reason
    uniform = predict_packing(token_sums([2400] * 128, 4, "flash_attention_2"), "flash_attention_2", None, cost)
    assert uniform.padding_padded == 0 and not uniform.pays and uniform.speed_up == pytest.approx(1.0)


def test_sdpa_rows_can_make_packing_not_pay():
    """Nearly uniform lengths and a large --pack_tokens: sdpa computes attention over the whole packed row."""
    lengths = [3000, 2900, 2950, 3000] * 16
    _shape, _setup, sdpa = _cost("sdpa")
    packed_sdpa = predict_packing(token_sums(lengths, 4, "sdpa", 12000), "sdpa", 12000, sdpa)
    assert packed_sdpa.padding_packed < packed_sdpa.padding_padded  # less padding ...
    assert packed_sdpa.speed_up < 1 and not packed_sdpa.pays  # ... and still slower: quadratic rows
    assert "attention over the whole row" in packed_sdpa.reason
    _shape, _setup, flash = _cost("flash_attention_2")
    packed_flash = predict_packing(token_sums(lengths, 4, "flash_attention_2"), "flash_attention_2", None, flash)
    assert packed_flash.speed_up > 1  # per-sample attention: the same lengths pay


def test_packed_memory_at_the_default_budget_never_exceeds_padded():
    shape, setup, _cost_ = _cost("sdpa")
    largest = SampleShape.from_images(shape, 16, (1008, 1680), text_tokens=66)
    from planner.estimate import estimate_memory

    padded = estimate_memory(shape, setup, largest).reserved
    assert packed_memory(shape, setup, largest, None, None).reserved <= padded
    wide = packed_memory(shape, setup, largest, 4 * largest.seq_len, None)
    assert any(item.name == "packed attention mask" for item in wide.items)  # one row of 4 samples: its mask


def test_the_command_carries_packing(capsys, monkeypatch, tmp_path):
    mixed = _mixed_folder(tmp_path)
    data = _json(capsys, "--gpu", "H100-SXM", "--data", str(mixed), "--method", "full")
    full = data["methods"][0]
    assert full["packing"] and full["packing"]["pays"] and "--packing" in full["command"]
    assert any(lay["packing"] for lay in full["layouts"]) and any(not lay["packing"] for lay in full["layouts"])
    out = _run(capsys, monkeypatch, "--gpu", "H100-SXM", "--data", str(mixed), "--method", "full")
    assert "--packing: packing pays" in out


def test_data_shows_padding_with_and_without_packing(capsys, monkeypatch, tmp_path):
    mixed = _mixed_folder(tmp_path)
    data = _json(capsys, "--gpu", "H100-SXM", "--data", str(mixed))
    table = data["data"]["packing"]
    row = next(r for r in table["rows"] if r["micro_batch"] == 4)
    assert row["padding_fraction_padded"] > 0.1 and row["padding_fraction_packed"] < row["padding_fraction_padded"]
    assert row["speed_up"] > 1
    out = _run(capsys, monkeypatch, "--gpu", "H100-SXM", "--data", str(mixed))
    assert "Packing your data" in out and "speed-up" in out and "packed ÷ padded" in out


def test_search_packs_varied_lengths_not_uniform_ones(capsys, tmp_path):
    mixed = _json(capsys, "--gpu", "H100-SXM", "--data", str(_mixed_folder(tmp_path)), "--method", "full")
    assert "--packing" in mixed["methods"][0]["command"]
    uniform = _json(capsys, "--gpu", "H100-SXM", "--data", str(_mixed_folder(tmp_path / "u", uniform=True)),
                    "--method", "full")  # fmt: skip
    full = uniform["methods"][0]
    assert full["fits"] and "--packing" not in full["command"]
    assert not any(lay["packing"] for lay in full["layouts"])  # nothing to gain: no packed twin is offered
    assert all(r["padding_fraction_padded"] == 0 for r in uniform["data"]["packing"]["rows"])


def test_sdpa_says_why_packing_does_not_pay(capsys, monkeypatch, tmp_path):
    """V100 (no flash-attention-2): the packed micro-batch 4 loses to the unpadded micro-batch 1."""
    out = _run(capsys, monkeypatch, "--gpu", "V100-32GB", "--data", str(_mixed_folder(tmp_path)), "--method", "lora")
    line = next(line for line in out.splitlines() if "no --packing" in line)
    assert "is slower than this one" in line and "with sdpa a packed row computes attention over the whole row" in line
    assert " img/s) is slower" in line and "samples/s" not in line  # img/s, as every planner sentence leads with


def test_data_packing_without_rates_has_no_speed():
    shape, setup, _ = _cost("sdpa")
    constants, _ = fit_speed_constants(load_calibration(), load_shape("phi-3-vision"))
    table = data_packing([100, 900, 400], shape, setup, SampleShape(500, 0, 0, 0), None, constants)
    assert all(r["speed_up"] is None for r in table["rows"])


def test_validation_reads_the_bench_file(tmp_path):
    from planner.validate import packing_validation

    folder = tmp_path / "results" / "validation"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURE, folder / "packing-cpu-Intel-Xeon-2t-20261207.json")
    # the rates of a 1-thread Xeon as --validate measures them (given: the test imports no torch)
    [line] = packing_validation(folder, Rates(99.4e9, 11.9e9, 26.7e-6, 60e6, "test"))
    measured = json.loads(FIXTURE.read_text())["result"]["speed_up"]
    assert line["measured_speed_up"] == pytest.approx(measured)
    assert line["predicted_speed_up"] > 1 and "error_pct" in line
    assert packing_validation(tmp_path / "nowhere") == []


def _mixed_folder(root: Path, uniform: bool = False) -> Path:
    """Pages, photos and thumbnails, one or two images, short and long answers (a mixed-length folder); ``uniform``:
    the same page and text in every record."""
    import random

    from tests.data_folders import turn, write_folder

    sizes = [(1700, 2200), (1008, 1680), (800, 600), (320, 240), (224, 224)]
    rng = random.Random(0)
    records = []
    for k in range(48):
        names = [f"img{rng.randrange(len(sizes))}.png" for _ in range(2 if k % 5 == 0 else 1)]
        turns = [turn([n], "Question? " * rng.choice([1, 10]), "Answer. " * rng.choice([1, 40])) for n in names]
        if uniform:
            turns = [turn(["img1.png"], "Question?", "Answer.")]
        records.append({"id": str(k), "conversations": turns})
    return write_folder(root / "mixed", {f"img{i}.png": size for i, size in enumerate(sizes)}, records, "mixed_train.jsonl")


def test_the_command_names_a_pack_budget_other_than_the_default(tmp_path):
    from dataclasses import replace

    from planner.recommend import plan
    from planner.render import command
    from planner.request import PlanRequest

    folder = _mixed_folder(tmp_path)
    result = plan(PlanRequest(gpu="H100-SXM", data_dir=str(folder), methods=("full",)))
    full = result.method("full")
    chosen = next(lay for lay in full.layouts if lay.chosen)
    assert chosen.packing and chosen.packing["pack_tokens"] is None
    assert "--packing" in full.command and "--pack_tokens" not in full.command  # the default budget
    chosen.packing = {**chosen.packing, "pack_tokens": 6000}
    assert "--packing --pack_tokens 6000" in command(result.hardware, "jsonl", replace(full), None, str(folder))


def test_validate_prints_predicted_beside_measured():
    from planner.validate import packing_lines

    line = {
        "case": "tiny lora sdpa c4 mb6", "predicted_speed_up": 1.08, "measured_speed_up": 0.95, "error_pct": 13.7,
        "predicted_padding": {"padded": 0.29, "packed": 0.09}, "measured_padding": {"padded": 0.33, "packed": 0.06},
        "file": "results/validation/packing-cpu-x.json",
    }  # fmt: skip
    text = packing_lines([line])[0]
    assert "predicted speed-up 1.08x, measured 0.95x (+14 %)" in text and "measured 33% → 6%" in text
    assert "no results/validation/packing-*.json yet" in packing_lines([])[0]

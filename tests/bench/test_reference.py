"""The seed's published tables stored as data: complete, self-consistent, and loaded with file:line errors."""

from __future__ import annotations

import shutil

import pytest

from bench.reference import load_reference_accuracy, load_reference_speed
from phi3v_core.errors import DataError
from phi3v_core.reference import default_reference_dir, reference_rows


def test_speed_table_matches_the_published_numbers() -> None:
    speed = load_reference_speed()
    assert speed.hardware.value_counts().to_dict() == {"8xA100-80GB": 10, "8xV100-32GB": 5}
    a100 = speed[speed.hardware == "8xA100-80GB"].set_index(["method", "nodes", "flash_attention"])
    assert a100.loc[("full", 1, True)].img_per_s == 8.657
    assert a100.loc[("full", 4, True)].img_per_s == 33.433
    assert a100.loc[("qlora", 1, True)].peak_gpu_mem_gb == 10
    assert (speed.effective_batch == 64).all() and (speed.num_crops == 16).all()
    assert (speed.gpus == speed.nodes * speed.gpus_per_node).all()
    assert speed[speed.method == "frozen_vision"].note.str.startswith("suspect").all()


def test_published_speedups_equal_img_per_s_over_the_1x_row() -> None:
    # Catches a typo in either column: the seed's speed-up is img/s / (full, 1 node, no flash attention).
    speed = load_reference_speed()
    for _, part in speed.groupby("hardware"):
        base = part[(part.method == "full") & (part.nodes == 1) & ~part.flash_attention].img_per_s.item()
        assert [round(v / base, 2) for v in part.img_per_s] == pytest.approx(list(part.speedup))


def test_accuracy_table() -> None:
    acc = load_reference_accuracy()
    assert acc.benchmark.value_counts().to_dict() == {"docvqa": 8, "hateful_memes": 8, "nlvr2": 2}
    docvqa = acc[acc.benchmark == "docvqa"].set_index(["method", "precision"]).value
    assert docvqa[("full", "bf16")] == 83.65 and docvqa[("qlora", "fp16")] == 81.85
    assert acc[acc.benchmark == "nlvr2"].model.unique().tolist() == ["phi-3.5-vision-instruct"]
    assert acc[acc.method == "lora"].lora_rank.notna().all() and acc[acc.method == "full"].lora_rank.isna().all()


def test_provenance_note_exists() -> None:
    text = (default_reference_dir() / "README.md").read_text()
    assert "Provenance" in text and "ba89980" in text


def test_malformed_row_names_file_and_line(tmp_path) -> None:
    shutil.copy(default_reference_dir() / "speed.csv", tmp_path / "speed.csv")
    lines = (tmp_path / "speed.csv").read_text().splitlines()
    lines[3] = lines[3].replace("16.903", "fast")
    (tmp_path / "speed.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"speed\.csv:4: column 'img_per_s' = 'fast' is not a float"):
        load_reference_speed(tmp_path)
    with pytest.raises(DataError, match="reference table not found"):
        load_reference_accuracy(tmp_path)


@pytest.mark.parametrize("table", ["speed", "accuracy"])
def test_one_reader_gives_the_same_rows_from_the_package_and_from_results(table: str) -> None:
    """The packaged copy (the default of every reader) and results/reference/*.csv hold the same typed rows."""
    assert reference_rows(table) == reference_rows(table, default_reference_dir())
    frame = load_reference_speed() if table == "speed" else load_reference_accuracy()
    assert len(frame) == len(reference_rows(table))

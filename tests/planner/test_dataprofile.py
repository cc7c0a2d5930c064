"""phi3v-plan --data: token lengths from a jsonl folder (image headers only), longest-batch memory, misfits."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from phi3v_core.errors import DataError
from planner.cli import main
from planner.dataprofile import profile_data
from planner.recommend import PlanRequest, plan
from planner.shapes import ModelShape, hd_crop_grid, image_token_count
from tests.data_folders import turn, write_folder

PHI35 = ModelShape.preset("phi-3.5-vision")
SIZES = [(1008, 1680), (800, 600), (320, 240), (640, 480)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """10 000 records reusing a handful of small image files, plus one 8-page record that fits nowhere at 16 crops."""
    records = [
        {"id": str(k), "conversations": [turn([f"img{k % len(SIZES)}.png"] * (k % 3 == 0 and 2 or 1),
                                              "What does the page say? " * (1 + k % 7), "Forty-two.")]}
        for k in range(10_000)
    ]  # fmt: skip
    # 8 pages in 8 turns (8 images in one turn would be multi-frame input, which finetune plans at num_crops 4)
    records.append({"id": "long", "conversations": [turn(["img0.png"], "x", "y")] * 8})
    images = {f"img{i}.png": size for i, size in enumerate(SIZES)}
    return write_folder(tmp_path_factory.mktemp("data"), images, records)


def test_lengths_use_the_processors_arithmetic_and_headers_only(data_dir, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    start = time.process_time()
    profile = profile_data(data_dir, PHI35, 16)
    cpu_s = time.process_time() - start
    print(f"profiled 10 001 samples in {cpu_s:.2f} CPU s")
    assert cpu_s <= 10  # CPU seconds: independent of other load on the machine
    assert len(profile.samples) == 10_001 and profile.text_estimated
    rows, cols = hd_crop_grid(1008, 1680, 16)
    page = image_token_count(rows, cols)
    assert profile.stats["max"] == profile.lengths[-1] >= 8 * page
    assert profile.stats["p50"] <= profile.stats["p95"] <= profile.stats["max"]
    assert profile.stats["mean"] == pytest.approx(sum(profile.lengths) / len(profile.lengths), abs=0.1)
    first = profile.samples[0].sample_shape(PHI35, 16)  # two 1008x1680 pages + text
    assert first.image_tokens == 2 * page and first.vision_crops == 2 * (rows * cols + 1)


def test_plan_uses_the_longest_for_memory_and_lists_misfits(data_dir):
    result = plan(PlanRequest(gpu="T4", methods=("lora", "qlora"), data_dir=str(data_dir), num_crops=16))
    assert result.request.dataset_size == 10_001
    assert result.data["seq_len"]["max"] > 8 * 2000
    misfit = result.data["does_not_fit"]
    long = next(s for s in misfit["samples"] if s["sample"].endswith(":10001"))
    assert long["fits_at_num_crops"] is None or long["fits_at_num_crops"] < 16
    assert all(s["fits_at_num_crops"] is None or s["fits_at_num_crops"] < 16 for s in misfit["samples"])
    mean_only = plan(PlanRequest(gpu="T4", methods=("lora",), seq_len=round(result.data["seq_len"]["mean"])))
    assert result.method("lora").speed.samples_per_s == pytest.approx(
        mean_only.method("lora").speed.samples_per_s, rel=0.25
    )


def test_cli_json_and_bad_folder(data_dir, capsys, tmp_path):
    assert main(["--gpu", "A100-80GB", "--data", str(data_dir), "--method", "lora", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["data"]["samples"] == 10_001
    # num_crops: the rule's choice on these images (tests/planner/test_plan_data.py checks the rule)
    assert data["data"]["num_crops"] == data["data"]["num_crops_table"]["recommended"]
    with pytest.raises(DataError, match="not a folder"):
        profile_data(tmp_path / "missing", PHI35, 16)
    (tmp_path / "x_train.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(DataError, match=r"x_train.jsonl:1: 'id' must be a non-empty string"):
        profile_data(tmp_path, PHI35, 16)

"""phi3v_core.constants, recipe.json, phi3v_core.io and the one-error-class rule for image sizes."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from phi3v_core import constants
from phi3v_core.constants import (
    ATTN_NAMES,
    CROP_SIZE,
    PRECISION_NAMES,
    ZERO_BUCKET_ELEMENTS,
    hd_crop_grid,
    hd_padded_height_width,
    image_token_count,
    image_token_count_for_size,
    load_recipe,
    padded_image_token_count,
    zero2_buffer_bytes,
)
from phi3v_core.errors import ConfigError, DataError, ImageSizeError
from phi3v_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- names --------------------------------------------------------------------------------------------------------
def test_names_are_the_ones_the_code_implements() -> None:
    from phi3v_core.methods import METHOD_NAMES, METHODS
    from phi3v_core.training.config import DTYPES

    assert tuple(METHODS) == METHOD_NAMES
    # the recipe's four come first, in its order; later entries are ours (not in the recipe)
    assert METHOD_NAMES[:4] == ("full", "frozen_vision", "lora", "qlora")
    assert all(METHODS[m].recipe_name for m in METHOD_NAMES[:4])
    assert tuple(DTYPES) == PRECISION_NAMES
    assert ATTN_NAMES == ("eager", "sdpa", "flash_attention_2")


def test_consumers_read_the_names_from_constants() -> None:
    """The workload (bench's config is one), the finetune CLI and the model presets hold no copies of the name lists
    (methods: the registry's)."""
    from phi3v_core import workload
    from phi3v_core.cli import finetune as finetune_cli
    from phi3v_core.config import MODEL_PRESETS
    from phi3v_core.methods import METHOD_NAMES

    assert workload.METHOD_NAMES is METHOD_NAMES
    assert workload.ATTN_NAMES is ATTN_NAMES
    assert workload.PRECISION_NAMES is PRECISION_NAMES
    assert workload.MAX_NUM_CROPS == constants.MAX_NUM_CROPS
    assert tuple(MODEL_PRESETS) == constants.MODEL_PRESET_NAMES
    assert finetune_cli.METHOD_NAMES is METHOD_NAMES and finetune_cli.ATTN_NAMES is ATTN_NAMES
    assert finetune_cli.PRECISION_NAMES is PRECISION_NAMES
    assert finetune_cli.MODEL_PRESET_NAMES is constants.MODEL_PRESET_NAMES


# -- image geometry -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "num_crops", "padded", "tokens"),
    [
        ((1024, 768, 16), 16, (1008, 1344), 1921),  # hand-derived worked examples
        ((768, 1024, 16), 16, (1344, 1008), 1933),
        ((2000, 500, 16), 16, (672, 2688), 2485),
        ((320, 240, 4), 4, (672, 672), 2 * 2 * 144 + 2 * 12 + 157),
    ],
)
def test_hd_rule_and_token_count(size: tuple[int, int, int], num_crops: int, padded: tuple[int, int], tokens: int) -> None:
    width, height, _ = size
    assert hd_padded_height_width(width, height, num_crops) == padded
    rows, cols = hd_crop_grid(width, height, num_crops)
    assert (rows * CROP_SIZE, cols * CROP_SIZE) == padded
    assert image_token_count_for_size(width, height, num_crops) == padded_image_token_count(*padded) == tokens
    assert image_token_count(rows, cols) == 144 * rows * cols + 12 * rows + 157


def test_token_count_follows_tokens_per_crop() -> None:
    # A 4-token crop (2×2 merged grid) has 2 separators per row and a 2×3 global image: 4rc + 2r + 1 + 6.
    assert image_token_count(2, 3, tokens_per_crop=4) == 4 * 6 + 2 * 2 + 1 + 6


def test_a_bad_image_size_raises_one_class_everywhere() -> None:
    """Processor, data layer, planner and model all raise ImageSizeError (a DataError and a ValueError)."""
    from phi3v_core.data import hd_padded_height_width
    from phi3v_core.model import crop_grid_of
    from phi3v_core.processing import Phi3VImageProcessor
    from planner.shapes import hd_crop_grid as planner_grid

    calls = [
        lambda: Phi3VImageProcessor(num_crops=4).num_image_tokens(0, 100),
        lambda: hd_padded_height_width(100, 0, 16),
        lambda: planner_grid(-1, 5, 4),
        lambda: crop_grid_of([(300, 336)]),
        lambda: crop_grid_of(torch.tensor([[336, 0]])),
    ]
    for call in calls:
        with pytest.raises(ImageSizeError) as info:
            call()
        assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="num_crops must be >= 1"):
        hd_padded_height_width(100, 100, 0)


def test_zero2_buffer_rule() -> None:
    from phi3v_core.training import TrainConfig
    from phi3v_core.training import zero2_buffer_bytes as run_buffer_bytes

    assert zero2_buffer_bytes(5e8, 5e8) == 9e9  # the recipe's buckets: ~9 GB (HF DeepSpeed guide)
    assert zero2_buffer_bytes(ZERO_BUCKET_ELEMENTS, ZERO_BUCKET_ELEMENTS, overlap_comm=False) == 2e8
    assert run_buffer_bytes(TrainConfig()) == int(zero2_buffer_bytes(ZERO_BUCKET_ELEMENTS, ZERO_BUCKET_ELEMENTS))


# -- recipe.json --------------------------------------------------------------------------------------------------
def test_finetune_presets_and_defaults_come_from_recipe_json() -> None:
    from phi3v_core.cli.finetune import RECIPE_DEFAULTS, RECIPE_PRESETS

    recipe = load_recipe()
    assert RECIPE_PRESETS is recipe.presets and RECIPE_DEFAULTS is recipe.recipe_defaults
    assert len(RECIPE_PRESETS) == 10 and all(name == f"{p.task}-{p.method}" for name, p in RECIPE_PRESETS.items())


def test_bench_profiles_come_from_recipe_json() -> None:
    from bench.config import SEQ_PROFILES

    profiles = load_recipe().profiles
    assert SEQ_PROFILES is profiles
    # The DocVQA profile reproduces the published mean of 2443.23 tokens per sample.
    docvqa = profiles["docvqa"]
    assert docvqa.image_tokens() + docvqa.text_tokens == 2443


def test_planner_tasks_come_from_recipe_json() -> None:
    """The planner merges the recipe's facts with its own training-set sizes; planner/data holds no copies."""
    from planner.recommend import task_profiles

    recipe = load_recipe()
    profiles = task_profiles()
    assert {k: v for k, v in profiles["common"].items() if k != "source"} == recipe.training_arguments
    assert set(profiles["tasks"]) == set(recipe.profiles)
    memes_lora = profiles["tasks"]["hateful_memes"]["methods"]["lora"]
    assert (memes_lora["lora_rank"], memes_lora["lora_alpha"]) == (128, 256)  # r128/α256 (ratio 2)
    assert "not published" in profiles["tasks"]["ucf101"]["methods"]["full"]["source"]
    planner_file = json.loads((REPO_ROOT / "planner" / "data" / "recipes.json").read_text())
    assert set(planner_file) == {"_about", "datasets"}


def _typed(value: str) -> Any:
    """How recipe.json stores a CSV cell: empty → null, true/false → bool, numbers → int/float."""
    if value == "":
        return None
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@pytest.mark.parametrize(("field", "name"), [("reference_speed", "speed.csv"), ("reference_accuracy", "accuracy.csv")])
def test_recipe_reference_rows_equal_results_reference(field: str, name: str) -> None:
    with (REPO_ROOT / "results" / "reference" / name).open(newline="", encoding="utf-8") as handle:
        rows = [{key: _typed(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    assert list(getattr(load_recipe(), field)) == rows


# -- atomic writes ------------------------------------------------------------------------------------------------
def test_atomic_writes_replace_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1.5, "b": [1, "é"]})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1.5, "b": [1, "é"]}
    assert target.read_text(encoding="utf-8").endswith("\n")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_json_is_strict_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(target, {"loss": float("nan")})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_removes_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.txt"

    def broken_replace(src: str, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("cc", "native"), [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True),
                                            ((8, 6), True), ((8, 9), True), ((9, 0), True)])
def test_bf16_and_flash_attention_start_at_ampere(cc, native) -> None:
    # V100 (7.0) and T4 (7.5) lack bf16 tensor cores and FlashAttention-2; A100 (8.0), A10/RTX 30 (8.6), L4 (8.9) and
    # H100 (9.0) have both (NVIDIA datasheets; the flash-attn README).
    from phi3v_core.constants import supports_bf16, supports_flash_attention

    assert supports_bf16(cc) is native
    assert supports_flash_attention(cc) is native

"""The data tables are consistent with themselves, with the spec and with the other packages' copies."""

from __future__ import annotations

import pytest

from phi3v_core.errors import ConfigError
from phi3v_core.reference import default_reference_dir, reference_rows
from planner.calibration import load_calibration, reference_anchor_rows
from planner.hardware import architecture_of, azure_skus, find_gpu, gpu_table
from planner.recommend import task_profiles


def test_gpu_table_is_self_consistent():
    keys = [g.key for g in gpu_table()]
    assert len(keys) == len(set(keys))
    for gpu in gpu_table():
        assert architecture_of(*gpu.compute_capability) == gpu.architecture, gpu.key
        assert gpu.bf16_native == (gpu.compute_capability >= (8, 0)), gpu.key
        assert gpu.flash_attention_2 == (gpu.compute_capability >= (8, 0)), gpu.key
        assert (gpu.tflops_bf16 is not None) == gpu.bf16_native, gpu.key
        assert gpu.memory_gib > 0 and gpu.bandwidth_gbs > 0 and gpu.tflops_fp16 > 0, gpu.key
        assert gpu.source, gpu.key


def test_required_gpus_are_tabulated():
    for name in (
        "V100-16GB",
        "V100-32GB",
        "T4",
        "RTX8000",
        "A10",
        "A100-40GB",
        "A100-80GB",
        "L4",
        "L40S",
        "H100-SXM",
        "H100-PCIe",
        "H100-NVL",
        "H200",
        "B200",
    ):
        assert find_gpu(name).key == name


def test_dense_peaks_not_sparse():
    # NVIDIA datasheets, dense figures (the datasheets' 1979 / 242 / 733 are sparsity numbers)
    assert find_gpu("H100-80GB").tflops_bf16 == 989
    assert find_gpu("L4").tflops_bf16 == 121 and find_gpu("L4").bandwidth_gbs == 300
    assert find_gpu("L40S").tflops_bf16 == 362
    assert find_gpu("A100-80GB").tflops_bf16 == 312


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("a100-80gb", "A100-80GB"),
        ("H100 80GB", "H100-SXM"),
        ("h100-sxm", "H100-SXM"),  # a bare "h100" fits three cards: ambiguous (test_gpu_names.py)
        ("A10G", "A10"),
        ("rtx 8000", "RTX8000"),
    ],
)
def test_gpu_aliases(name, key):
    assert find_gpu(name).key == key


def test_ambiguous_and_unknown_gpu_names():
    with pytest.raises(ConfigError, match="ambiguous.*A100-40GB.*A100-80GB"):
        find_gpu("A100")
    with pytest.raises(ConfigError, match="unknown GPU"):
        find_gpu("GTX 480")


def test_azure_skus_reference_tabulated_gpus():
    families = {s.family for s in azure_skus()}
    assert families == {"NDv2", "ND A100 v4", "NDm A100 v4", "ND H100 v5", "ND H200 v5"}
    for sku in azure_skus():
        gpu = find_gpu(sku.gpu)
        assert gpu.memory_gib == sku.gpu_memory_gib, sku.family
        assert sku.gpus_per_vm == 8
    assert next(s for s in azure_skus() if s.family == "NDv2").inter_node_gbs == 12.5
    assert next(s for s in azure_skus() if s.family == "ND A100 v4").inter_node_gbs == 200


def test_task_profiles_equal_the_bench_profiles():
    from bench.config import SEQ_PROFILES

    tasks = task_profiles()["tasks"]
    assert set(tasks) == set(SEQ_PROFILES)
    for name, profile in SEQ_PROFILES.items():
        task = tasks[name]
        assert (
            task["images_per_sample"],
            task["image_width"],
            task["image_height"],
            task["text_tokens"],
            task["num_crops"],
        ) == (
            profile.images_per_sample,
            profile.image_width,
            profile.image_height,
            profile.text_tokens,
            profile.recommended_num_crops,
        )


def test_hyperparameters_equal_the_finetune_presets():
    from phi3v_core.cli.finetune import RECIPE_PRESETS

    tasks = task_profiles()["tasks"]
    for preset in RECIPE_PRESETS.values():
        ours = tasks[preset.task]["methods"][preset.method]
        assert ours["learning_rate"] == preset.values["learning_rate"], preset
        assert ours["epochs"] == preset.values["num_train_epochs"], preset
        if "lora_rank" in preset.values:
            assert ours["lora_rank"] == preset.values["lora_rank"]
            assert ours["lora_alpha"] / ours["lora_rank"] == preset.values["lora_alpha_ratio"]


def test_the_calibration_reads_the_one_reader_of_the_published_tables():
    """Packaged rows by default, a folder's speed.csv with --reference: the same rows either way."""
    calibration = load_calibration()
    assert "recipe.json" in calibration.rows_source and len(calibration.rows) == 15
    assert calibration.rows == reference_anchor_rows()
    if (default_reference_dir() / "speed.csv").is_file():
        assert load_calibration(default_reference_dir()).rows == calibration.rows
    assert [row.img_per_s for row in calibration.rows] == [r["img_per_s"] for r in reference_rows("speed")]

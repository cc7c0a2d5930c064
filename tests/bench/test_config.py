"""BenchConfig: defaults, identity/cell ids, all-at-once validation, typed CLI values, profiles."""

from __future__ import annotations

import pytest

from bench.config import SEQ_PROFILES, BenchConfig, parse_field_value
from phi3v_core.constants import hd_crop_grid, image_token_count, load_recipe
from phi3v_core.errors import ConfigError
from phi3v_core.methods import METHOD_NAMES


def test_defaults_are_valid_and_derived_values() -> None:
    cfg = BenchConfig(global_batch=64, gpus=8, nodes=2, micro_batch=2).validate()
    assert cfg.world_size == 16
    assert cfg.grad_accum == 2
    assert cfg.images_per_step == 64
    assert BenchConfig(seq_profile="ucf101", global_batch=4).images_per_step == 32


def test_cell_id_names_identity_not_protocol() -> None:
    cfg = BenchConfig(method="qlora", attn="flash_attention_2", model="phi-3.5-vision", gpus=8, global_batch=64)
    assert cfg.cell_id() == "qlora-fa2-bf16-phi-3.5-vision-c16-docvqa-b64-mb1-1n8g-gc"
    # steps/repeats/seed/release decide how long and where, not what: same identity, same file name.
    other = cfg.replace(steps=50, repeats=5, seed=3, release="v9")
    assert other.identity() == cfg.identity()
    assert other.cell_id() == cfg.cell_id()
    assert cfg.replace(nodes=2).cell_id() != cfg.cell_id()


def test_model_path_cell_id_is_unique_per_path(tmp_path) -> None:
    a, b = tmp_path / "x" / "ckpt", tmp_path / "y" / "ckpt"
    for folder in (a, b):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    ca, cb = BenchConfig(model=str(a)), BenchConfig(model=str(b))
    assert ca.validate() and cb.validate()
    assert "ckpt-" in ca.cell_id() and "/" not in ca.cell_id()
    assert ca.cell_id() != cb.cell_id()


def test_validate_reports_every_problem_at_once() -> None:
    cfg = BenchConfig(
        method="sft", attn="flash_attention_2", precision="fp32", model="/no/such/folder", num_crops=17,
        global_batch=10, gpus=4, steps=1, warmup=-1, release="bad release",
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for fragment in ("method 'sft'", "flash_attention_2 needs bf16", "/no/such/folder", "num_crops must be <= 16",
                     "not a multiple of gpus*nodes*micro_batch", "steps must be >= 2", "warmup must be",
                     "release 'bad release'"):
        assert fragment in text, fragment
    assert text.startswith("8 problems")


def test_from_dict_rejects_unknown_fields() -> None:
    cfg = BenchConfig(method="full", release="v1")
    assert BenchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config field"):
        BenchConfig.from_dict({**cfg.to_dict(), "lr": 1e-4})


def test_parse_field_value_types_and_hints() -> None:
    assert parse_field_value("gpus", "8") == 8
    assert parse_field_value("gradient_checkpointing", "off") is False
    assert parse_field_value("method", "lora") == "lora"
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        parse_field_value("stepz", "3")
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_field_value("gpus", "eight")
    with pytest.raises(ConfigError, match="expected true or false"):
        parse_field_value("gradient_checkpointing", "maybe")


def test_docvqa_profile_matches_published_mean_sequence_length() -> None:
    """The profile's page, through the HD rule and the token formula, plus its text = the published mean length."""
    p = SEQ_PROFILES["docvqa"]
    rows, cols = hd_crop_grid(p.image_width, p.image_height, p.recommended_num_crops)
    assert rows * cols <= p.recommended_num_crops
    image_tokens = p.image_tokens()  # the product's path: image_token_count_for_size
    assert image_tokens == image_token_count(rows, cols) == 144 * rows * cols + 12 * rows + 157  # spec: 144·hc·wc + 12·hc + 157
    published = {row["avg_seq_tokens"] for row in load_recipe().reference_speed if row["dataset"] == "docvqa"}
    assert len(published) == 1  # Phi-3CookBook fine-tuning guide: mean 2443.23 tokens at num_crops=16
    assert image_tokens + p.text_tokens == round(published.pop())
    # the text share is a plausible DocVQA prompt + answer, not a number chosen to close the sum
    assert 30 <= p.text_tokens <= 120 and p.answer_tokens < p.text_tokens


def test_docvqa_profile_tiles_as_derived_with_the_real_processor() -> None:
    import phi3v_core.processing as processing
    p = SEQ_PROFILES["docvqa"]
    processor = processing.Phi3VImageProcessor(num_crops=16)
    assert processor.num_image_tokens(p.image_width, p.image_height) == 2377


def test_method_names_match_the_training_registry() -> None:
    import phi3v_core.methods as methods
    registry = getattr(methods, "METHODS", None)
    if registry is None:
        pytest.skip("phi3v_core.methods.METHODS not written yet")
    assert set(registry) == set(METHOD_NAMES)


def test_old_field_names_still_load() -> None:
    from bench.config import parse_field_value

    old = BenchConfig(global_batch=16).to_dict()
    old["batch_size"] = old.pop("global_batch")
    assert BenchConfig.from_dict(old).global_batch == 16
    assert BenchConfig.from_dict({"attention": "eager"}).attn == "eager"
    assert BenchConfig(global_batch=16).batch_size == 16  # read-only alias for older callers
    assert parse_field_value("batch_size", "32") == 32
    with pytest.raises(ConfigError, match="both batch_size"):
        BenchConfig.from_dict({"batch_size": 8, "global_batch": 8})


def test_optimizer_and_offload_are_identity_and_named_only_when_not_default() -> None:
    from bench.matrix import parse_grid

    base = BenchConfig(release="r")
    assert base.cell_id().endswith("-gc")  # earlier results keep their names
    assert BenchConfig(release="r", optim="adamw_8bit", gradient_checkpointing=False).cell_id().endswith("-nogc-adamw_8bit")
    assert BenchConfig(release="r", method="full", offload="optimizer").cell_id().endswith("-offload-optimizer")
    assert {"optim", "offload"} <= set(base.identity())
    assert any("optim 'sgd'" in p for p in BenchConfig(release="r", optim="sgd").problems())
    grid = parse_grid(["gradient_checkpointing=on,off", "optim=adamw,adamw_8bit"])
    assert grid == {"gradient_checkpointing": [True, False], "optim": ["adamw", "adamw_8bit"]}


def test_the_workload_is_declared_once_and_mapped_onto_training_by_name() -> None:
    # BenchConfig adds placement and protocol to the core Workload; it declares none of the workload's fields again,
    # and to_train_config carries every workload field (a changed value shows in the TrainConfig it builds)
    import dataclasses

    from phi3v_core.training.workload import to_train_config
    from phi3v_core.workload import Workload

    workload = {f.name for f in dataclasses.fields(Workload)}
    assert workload <= {f.name for f in dataclasses.fields(BenchConfig)}
    assert not workload & set(BenchConfig.__annotations__)  # BenchConfig's own fields only
    changed = BenchConfig(method="full", attn="eager", precision="fp32", num_crops=2, global_batch=4, micro_batch=2,
                          seed=7, gradient_checkpointing=False, optim="adamw_8bit", checkpoint_towers="llm",
                          freeze_llm=True, compile=True, vision_lr=1e-5, projector_lr=2e-5, packing=True,
                          pack_tokens=512, learning_rate=3e-5, release="t")
    train = to_train_config(changed, "unused", 3)
    for name in workload - {"seq_profile", "model", "offload", "kernels"}:
        assert getattr(train, name) == getattr(changed, name) != getattr(Workload(), name), name
    assert (train.model, train.offload, train.kernels) == ("tiny", "none", "none")

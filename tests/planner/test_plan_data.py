"""phi3v-plan --data as a plan for the user's data (#24 §1) and num_crops from the user's images (#25 §3)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from phi3v_core.processing import image_processing
from planner import crops
from planner.cli import main
from planner.crops import CROP_CHOICES, NATIVE_SHARE, resize_factor, task_samples
from planner.dataplan import MIN_RUN_STEPS, MIN_STEPS_PER_EPOCH
from planner.render import why_method
from tests.data_folders import turn, write_folder
from tests.safety_helpers import HANG_GUARD_S

# The newcomer's folder of #24: 6 records, 8 PNGs (pages, photos, a thumbnail)
SIZES = [(1008, 1680), (800, 600), (320, 240), (640, 480), (1700, 2200), (500, 375), (224, 224), (1024, 768)]


@pytest.fixture(scope="module")
def mydata(tmp_path_factory):
    records = [{"id": str(k), "conversations": [turn([f"img{k}.png"])] + ([turn([f"img{k + 6}.png"])] if k < 2 else [])}
               for k in range(6)]  # fmt: skip
    return write_folder(tmp_path_factory.mktemp("mydata"), {f"img{i}.png": size for i, size in enumerate(SIZES)}, records)


def _run(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per sentence: phrases are searched whole
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return "\n".join(" ".join(line.strip("│ ").split()) for line in out.splitlines())


def _json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_one_fit_verdict_on_the_users_data(mydata, capsys):
    data = _json(capsys, "--gpu", "RTX4090", "--data", str(mydata))
    best = next(m for m in data["methods"] if m["method"] == data["recommended"])
    assert best["fits"]
    # the data section judges the same method on the same layout: no sample "fits nowhere" beside fits = true
    assert data["data"]["does_not_fit"] == {"method": best["method"], "count": 0, "samples": []}
    largest = data["data"]["largest_sample"]
    assert largest["seq_len"] == data["data"]["seq_len"]["max"]  # memory is planned for the largest sample
    # a GPU where nothing fits: the data section names the samples, never "None"
    small = _json(capsys, "--gpu", "T4", "--data", str(mydata), "--method", "full", "--num-crops", "16")
    assert small["recommended"] is None and not small["methods"][0]["fits"]
    assert small["data"]["does_not_fit"]["count"] >= 1


def test_the_command_trains_the_users_data(mydata, capsys, monkeypatch):
    out = _run(capsys, monkeypatch, "--gpu", "RTX4090", "--data", str(mydata))
    flat = " ".join(out.split())  # the launch command may wrap inside its panel
    assert f"--task jsonl --data_dir {mydata} --method" in flat
    assert f"--output_dir ./output/{mydata.name}-" in flat
    workload = next(line for line in out.splitlines() if line.startswith("Workload:"))
    assert str(mydata) in workload and "6 samples" in workload and "docvqa," not in workload
    data = _json(capsys, "--gpu", "RTX4090", "--data", str(mydata))
    recommended = data["data"]["num_crops_table"]["recommended"]
    for m in data["methods"]:
        if m["fits"]:
            assert f"--data_dir {mydata}" in m["command"] and f"--num_crops {recommended} " in m["command"]


def test_finetune_accepts_the_printed_command(mydata, capsys):
    """The command, as printed, resolves in phi3v-finetune (on an RTX 4090 as the plan assumes) to the plan's
    numbers, on the user's folder."""
    import shlex

    from phi3v_core.cli.finetune import build_config, build_parser
    from phi3v_core.training import Machine

    data = _json(capsys, "--gpu", "RTX4090", "--data", str(mydata), "--method", "lora", "--model-path", "tiny")
    lora = data["methods"][0]
    # The plan names no folder for a preset (a shell placeholder stops the command); finetune gets the preset itself.
    argv = ["tiny" if a.startswith("${PHI3V_MODEL") else a for a in shlex.split(lora["command"])]
    assert argv[0] == "phi3v-finetune" and "--no_eval" in argv  # the folder has no *_val.jsonl
    rtx4090 = Machine(cuda=True, capability=(8, 9), device_count=1, world_size=1, flash_attn=True)
    cfg = build_config(build_parser().parse_args(argv[1:]), rtx4090)
    assert (cfg.task, cfg.data_dir, cfg.num_crops) == ("jsonl", str(mydata), data["data"]["num_crops"])
    train, hp = cfg.train, lora["hyperparameters"]
    assert (train.global_batch, train.micro_batch) == (lora["global_batch"], lora["micro_batch"])
    assert (train.num_train_epochs, train.warmup_steps) == (hp["epochs"], hp["warmup_steps"])
    assert any("--no_eval" in note for note in data["data"]["notes"])
    # ... and finetune reads the folder it names: with --no_eval only the training file, so a folder without
    # *_val.jsonl trains (it was refused with "no *_val.jsonl file" after the model imports).
    from phi3v_core.training.run import _load_data

    task = _load_data(cfg)
    assert (len(task.train), len(task.eval)) == (6, 0)


def test_methods_left_out_are_not_judged(mydata, capsys, monkeypatch):
    out = _run(capsys, monkeypatch, "--gpu", "RTX4090", "--data", str(mydata), "--method", "lora")
    assert "full not judged (left out by --method)" in out
    assert not re.search(r"full (does|do) not fit", out)
    assert why_method("lora") .startswith("full does not fit")  # all judged: the recipe's order as before
    assert why_method("lora", ["lora", "qlora"]).startswith("lora is the recipe's first choice among the methods asked")
    text = why_method("qlora", ["lora", "qlora"])
    assert text.startswith("lora does not fit; qlora") and "full not judged" in text


def test_schedule_is_sized_to_the_data(mydata, capsys, monkeypatch):
    data = _json(capsys, "--gpu", "RTX4090", "--data", str(mydata))
    best = next(m for m in data["methods"] if m["method"] == data["recommended"])
    samples, batch = 6, best["global_batch"]
    assert batch <= samples and math.ceil(samples / batch) >= min(MIN_STEPS_PER_EPOCH, samples)
    hp = best["hyperparameters"]
    steps = math.ceil(samples / batch) * hp["epochs"]
    assert steps >= MIN_RUN_STEPS and hp["warmup_steps"] <= steps // 10
    assert f"--batch_size {batch} " in best["command"] and f"--warmup_steps {hp['warmup_steps']} " in best["command"]
    assert f"--num_train_epochs {hp['epochs']} " in best["command"]
    out = _run(capsys, monkeypatch, "--gpu", "RTX4090", "--data", str(mydata))
    assert "fewer than the recipe's global batch 64: planned with global batch" in out
    asked = _run(capsys, monkeypatch, "--gpu", "RTX4090", "--data", str(mydata), "--global-batch", "64")
    assert "warning: --batch_size 64 is larger than the data's 6 samples" in asked


@pytest.mark.parametrize("extra", [(), ("--method", "lora"), ("--gpu", "T4", "--method", "full", "--num-crops", "16")])
def test_no_python_none_in_text(mydata, capsys, monkeypatch, extra):
    argv = ["--gpu", "RTX4090", "--data", str(mydata), *extra]
    if "T4" in extra:
        argv = ["--data", str(mydata), *extra]
    out = _run(capsys, monkeypatch, *argv)
    assert not re.search(r"\bNone\b", out), [line for line in out.splitlines() if "None" in line]


def test_num_crops_table_of_the_users_images(mydata, capsys, monkeypatch):
    # the processor's own geometry: the image processor and the table resize with the same function
    assert crops.hd_resize_target is image_processing.hd_resize_target
    data = _json(capsys, "--gpu", "RTX4090", "--data", str(mydata))
    table = data["data"]["num_crops_table"]
    rows = {row["num_crops"]: row for row in table["rows"]}
    assert set(CROP_CHOICES) <= set(rows)
    images = [SIZES[k] for k in range(6)] + [SIZES[6], SIZES[7]]
    for n, row in rows.items():
        assert row["tokens_per_sample"]["p50"] <= row["tokens_per_sample"]["p95"]
        assert row["upscaled_share"] == pytest.approx(sum(resize_factor(w, h, n) > 1 for w, h in images) / 8, abs=1e-4)
        assert row["predicted_reserved_gib"] > 0 and row["epoch_s"] > 0
    # more crops never shrink memory or time
    ordered = [rows[n] for n in sorted(rows)]
    assert all(a["predicted_reserved_gib"] <= b["predicted_reserved_gib"] + 1e-9 for a, b in zip(ordered, ordered[1:]))
    # the rule: the smallest num_crops keeping >= 90 % at native resolution or more (else the largest)
    native = {n: sum(resize_factor(w, h, n) >= 1 for w, h in images) / 8 for n in range(1, 17)}
    expected = next((n for n in range(1, 17) if native[n] >= NATIVE_SHARE), 16)
    assert table["recommended"] == expected == data["data"]["num_crops"]
    out = _run(capsys, monkeypatch, "--gpu", "RTX4090", "--data", str(mydata))
    assert "num_crops for your images" in out and f"--num_crops {expected} " in " ".join(out.split())
    assert "native resolution" in out


def test_rule_picks_the_smallest_num_crops_for_small_photos(tmp_path, capsys):
    images = {f"p{i}.png": size for i, size in enumerate([(640, 480), (500, 375), (600, 600), (800, 533), (480, 640)] * 2)}
    records = [{"id": str(i), "conversations": [turn([name], "Is it a dog?", "yes")]} for i, name in enumerate(images)]
    write_folder(tmp_path, images, records, "photos_train.jsonl")
    data = _json(capsys, "--gpu", "A100-80GB", "--data", str(tmp_path), "--method", "lora")
    chosen = data["data"]["num_crops"]
    assert chosen < 16 and "--num_crops 16" not in data["methods"][0]["command"]
    table = {row["num_crops"]: row for row in data["data"]["num_crops_table"]["rows"]}
    assert table[16]["upscaled_share"] == 1.0  # every photo is upscaled at the recipe's 16: tokens for no detail
    assert table[chosen]["tokens_per_sample"]["p50"] < table[16]["tokens_per_sample"]["p50"]
    # --num-crops overrides the rule and says so
    asked = _json(capsys, "--gpu", "A100-80GB", "--data", str(tmp_path), "--method", "lora", "--num-crops", "16")
    assert asked["data"]["num_crops"] == 16 and "the rule recommends" in asked["data"]["notes"][0]


def test_crops_table_of_the_recipes_tasks(capsys, monkeypatch):
    tables = _json(capsys, "--crops_table")
    assert set(tables) == {"docvqa", "nlvr2", "hateful_memes", "ucf101"}
    doc = {row["num_crops"]: row for row in tables["docvqa"]["rows"]}
    assert doc[16]["upscaled_share"] == 0 and doc[16]["downscaled_share"] == 1  # pages: 16 crops still downscale
    assert tables["docvqa"]["recommended"] == 16
    assert "2443.23" in tables["docvqa"]["source"]  # where the page sizes come from
    assert tables["nlvr2"]["recommended"] < 16 and tables["ucf101"]["recommended"] < 4
    # the expected DocVQA length at 16 crops is the recipe's published mean (the distribution's weights)
    mean = sum(crops.sample_shape(_shape(), s.image_sizes, s.text_tokens, 16).seq_len * s.weight
               for s in task_samples("docvqa"))  # fmt: skip
    assert mean == pytest.approx(2443.23, abs=1.0)
    priced = _json(capsys, "--crops_table", "--gpu", "A100-80GB", "--method", "lora")
    assert all(row["epoch_s"] and row["predicted_reserved_gib"] for row in priced["nlvr2"]["rows"])
    assert "lora" in priced["nlvr2"]["cost_basis"]
    out = _run(capsys, monkeypatch, "--crops_table")
    assert "docvqa: num_crops" in out and "pass --gpu NAME" in out


def _shape():
    from planner.shapes import load_shape

    return load_shape("phi-3.5-vision")


def test_crops_table_imports_no_torch():
    code = (
        "import sys, io, contextlib\n"
        "from planner.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--crops_table', '--gpu', 'T4'])\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_skip_bad_plans_a_folder_with_one_bad_record(tmp_path, capsys, monkeypatch):
    """`--skip_bad` is one concept in plan, finetune and convert (#24 §3): plan leaves the record out, says so, and
    the command it prints passes the flag on; without it the bad record is refused at file:line."""
    records = [{"id": str(k), "conversations": [turn(["ok.png"], "What?")]} for k in range(5)]
    records.append({"id": "bad", "conversations": [turn(["missing.png"], "What?")]})
    write_folder(tmp_path, {"ok.png": (640, 480)}, records)
    monkeypatch.setenv("PHI3V_DEBUG", "")
    with pytest.raises(SystemExit) as refused:
        main(["--gpu", "RTX4090", "--data", str(tmp_path)])
    assert refused.value.code == 1 and "mine_train.jsonl:6" in capsys.readouterr().err
    out = _run(capsys, monkeypatch, "--gpu", "RTX4090", "--data", str(tmp_path), "--skip_bad")
    assert "1 record left out for bad images (--skip_bad" in out
    assert "mine_train.jsonl:6" in out
    data = _json(capsys, "--gpu", "RTX4090", "--data", str(tmp_path), "--skip_bad")
    best = next(m for m in data["methods"] if m["method"] == data["recommended"])
    assert "--skip_bad" in best["command"].split()
    profile = data["data"]["profile"] if "profile" in data["data"] else data["data"]
    assert profile["samples"] == 5 and len(profile["skipped"]) == 1

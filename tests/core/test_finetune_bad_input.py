"""phi3v-finetune bad input: every number bounded, folders checked, all before any data or model loads.

Each case: exit 1, one ``error:`` line naming the problem, no traceback, and nothing on disk changed (hashed).
No training happens here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v_core.cli.finetune import main
from tests.safety_helpers import expect_user_error, snapshot

BASE = ["--synthetic", "4", "--no-tqdm"]
#: Hang guard for a subprocess only (a loaded machine may be slow to import); never a speed target.
HANG_GUARD_S = 900


pytestmark = pytest.mark.usefixtures("finetune_env")


NUMBERS = [
    (["--learning_rate", "inf"], "argument --learning_rate: must be a finite number in (0, 1], got inf"),
    (["--learning_rate", "nan"], "argument --learning_rate: must be a finite number in (0, 1], got nan"),
    (["--learning_rate=-inf"], "argument --learning_rate: must be a finite number"),
    (["--learning_rate", "0"], "argument --learning_rate: must be a finite number in (0, 1], got 0"),
    (["--learning_rate", "5"], "argument --learning_rate: must be a finite number in (0, 1], got 5"),
    (["--learning_rate", "abc"], "argument --learning_rate: expected a number, got 'abc'"),
    (["--wd", "inf"], "argument --wd: must be a finite number in [0, 10], got inf"),
    (["--wd", "nan"], "argument --wd: must be a finite number"),
    (["--num_train_epochs", "inf"], "argument --num_train_epochs: must be a finite number"),
    (["--num_train_epochs", "0"], "argument --num_train_epochs: must be a finite number in (0, 10000]"),
    (["--lora_alpha_ratio", "nan"], "argument --lora_alpha_ratio: must be a finite number"),
    (["--lora_alpha_ratio", "0"], "argument --lora_alpha_ratio: must be a finite number in (0, 1024]"),
    (["--lora_dropout", "1"], "argument --lora_dropout: must be a finite number in [0, 0.99], got 1"),
    (["--lora_dropout", "-0.1"], "argument --lora_dropout: must be a finite number"),
    (["--batch_size", "0"], "argument --batch_size: must be an integer in 1..65536, got 0"),
    (["--batch_size", "1000000000"], "argument --batch_size: must be an integer in 1..65536"),
    (["--batch_size", "1e3"], "argument --batch_size: expected an integer, got '1e3'"),
    (["--batch_size_per_gpu", "0"], "argument --per_device_train_batch_size: must be an integer in 1..4096, got 0"),
    (["--max_steps", "0"], "argument --max_steps: must be an integer in 1..100000000 or -1, got 0"),
    (["--max_steps", "-2"], "argument --max_steps: must be an integer in 1..100000000 or -1, got -2"),
    (["--warmup_steps", "-1"], "argument --warmup_steps: must be an integer in 0..100000000, got -1"),
    (["--save_steps", "-1"], "argument --save_steps: must be an integer in 0..100000000, got -1"),
    (["--seed", "-1"], "argument --seed: must be an integer in 0..4294967295, got -1"),
    (["--seed", str(2**40)], "argument --seed: must be an integer in 0..4294967295"),
    (["--synthetic", "0"], "argument --synthetic: must be an integer in 1..100000, got 0"),
    (["--synthetic", "1000000000"], "argument --synthetic: must be an integer in 1..100000"),
    (["--synthetic", "9" * 5000], "argument --synthetic: expected an integer of at most 30 digits"),
    (["--eval_limit", "0"], "argument --eval_limit: must be an integer in 1..10000000, got 0"),
    (["--max_new_tokens", "0"], "argument --max_new_tokens: must be an integer in 1..131072, got 0"),
    (["--max_new_tokens", "200000"], "argument --max_new_tokens: must be an integer in 1..131072"),
    (["--eval_batch_size", "0"], "argument --eval_batch_size: must be an integer in 1..4096, got 0"),
    (["--num_workers", "-1"], "argument --dataloader_num_workers: must be an integer in 0..256, got -1"),
    (["--lora_rank", "0"], "argument --lora_rank: must be an integer in 1..65536, got 0"),
    (["--use_lora", "--lora_rank", "65"], "--lora_rank 65 exceeds the model's hidden size 64"),
    (["--max_length", "200000"], "--max_length 200000 exceeds the model context of 131072 tokens"),
    (["--max_length", "5"], "argument --max_length: must be an integer in 16..10000000, got 5"),
    (["--num_crops", "9" * 40], "argument --num_crops: expected an integer of at most 30 digits"),
    (["--output_dir"], "argument --output_dir: expected one argument"),
    (["--overwrite_output_dir=yes"], "argument --overwrite_output_dir: ignored explicit argument 'yes'"),
]


@pytest.mark.parametrize(("flags", "message"), NUMBERS, ids=[" ".join(f)[:40] for f, _ in NUMBERS])
def test_every_number_is_bounded_before_anything_loads(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    err = expect_user_error(main, [*BASE, "--output_dir", str(out), *flags], message, tmp_path, capsys)
    assert not out.exists(), err


def _fake_run(folder: Path, *, complete: bool, checkpoint: int | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps({"method": "lora", "learning_rate": 4e-5}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / "run_complete.json").write_text(json.dumps({"global_step": 3, "max_steps": 3}))
    if checkpoint is not None:
        (folder / f"checkpoint-{checkpoint}").mkdir()
        (folder / f"checkpoint-{checkpoint}" / "trainer_state.json").write_text("{}")
    return folder


def _model_folder(folder: Path, config: object, weights: bytes | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (folder / "model.safetensors").write_bytes(weights if weights is not None else b"\x08" + b"\x00" * 7 + b"{}      ")
    return folder


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    out = _fake_run(tmp_path / "run", complete=True)
    expect_user_error(
        main,
        [*BASE, "--output_dir", str(out)],
        f"--output_dir {out} already holds a complete run (step 3); pass --overwrite_output_dir to replace it, "
        "or choose another --output_dir",
        tmp_path,
        capsys,
    )


def test_an_unfinished_run_is_not_overwritten(tmp_path, capsys):
    out = _fake_run(tmp_path / "run", complete=False, checkpoint=2)
    expect_user_error(
        main, [*BASE, "--output_dir", str(out)], "already holds an unfinished run (checkpoint 2)", tmp_path, capsys
    )


def _main_in_subprocess(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``main(argv)`` in a fresh interpreter, printing which heavy modules were imported and the exit code."""
    code = (
        "import sys\n"
        "from phi3v_core.cli.finetune import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), code)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=HANG_GUARD_S
    )


@pytest.mark.parametrize(
    ("complete", "flags", "expected"),
    [
        (False, ["--output_dir", "run"], "--output_dir run already holds an unfinished run (checkpoint 2); pass"),
        (True, ["--output_dir", "run"], "--output_dir run already holds a complete run (step 3); pass --overwrite"),
        (False, [], "--output_dir output already holds an unfinished run"),  # the default folder too
    ],
)
def test_a_run_in_the_output_folder_answers_before_torch_is_imported(tmp_path, complete, flags, expected):
    # Which modules were imported when the refusal came (never a wall-clock assert).
    _fake_run(tmp_path / ("run" if flags else "output"), complete=complete, checkpoint=None if complete else 2)
    done = _main_in_subprocess([*BASE, *flags], tmp_path)
    assert "HEAVY [] 1" in done.stdout, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr


def test_a_lora_run_folder_does_not_receive_a_full_run(tmp_path, capsys):
    out = _fake_run(tmp_path / "run", complete=True)
    expect_user_error(
        main, [*BASE, "--method", "full", "--output_dir", str(out)], "already holds a complete run", tmp_path, capsys
    )


def test_overwrite_refuses_a_folder_with_files_it_did_not_write(tmp_path, capsys):
    out = _fake_run(tmp_path / "run", complete=True)
    (out / "my_notes.txt").write_text("keep me")
    expect_user_error(
        main,
        [*BASE, "--output_dir", str(out), "--overwrite_output_dir"],
        f"--output_dir {out} holds files phi3v-finetune did not write (my_notes.txt)",
        tmp_path,
        capsys,
    )


def test_overwrite_and_resume_conflict(tmp_path, capsys):
    out = _fake_run(tmp_path / "run", complete=False, checkpoint=1)
    expect_user_error(
        main,
        [*BASE, "--output_dir", str(out), "--overwrite_output_dir", "--resume"],
        "--resume continues the run in",
        tmp_path,
        capsys,
    )


def test_a_model_folder_is_not_an_output_folder(tmp_path, capsys):
    out = _model_folder(tmp_path / "model", {"model_type": "phi3_v"})
    expect_user_error(
        main,
        [*BASE, "--output_dir", str(out)],
        f"--output_dir {out} holds config.json, model.safetensors, which the run would overwrite",
        tmp_path,
        capsys,
    )


def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    expect_user_error(
        main, [*BASE, "--output_dir", str(target)], f"--output_dir {target} exists and is not a folder", tmp_path, capsys
    )


def test_output_dir_below_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    target = tmp_path / "file.txt" / "run"
    expect_user_error(main, [*BASE, "--output_dir", str(target)], "is a file, not a folder", tmp_path, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_in_a_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        expect_user_error(main, [*BASE, "--output_dir", str(locked / "run")], "is not writable", tmp_path, capsys)
    finally:
        locked.chmod(0o700)


def test_output_dir_containing_the_data(tmp_path, capsys):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    expect_user_error(
        main,
        ["--task", "jsonl", "--data_dir", str(data), "--output_dir", str(tmp_path / "out")],
        f"--output_dir {tmp_path / 'out'} contains the source folder --data_dir {data}",
        tmp_path,
        capsys,
    )


def test_output_dir_inside_the_data(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    expect_user_error(
        main,
        ["--task", "jsonl", "--data_dir", str(data), "--output_dir", str(data / "run")],
        "is inside the source folder --data_dir",
        tmp_path,
        capsys,
    )


def test_output_dir_is_the_model_folder(tmp_path, capsys):
    model = _model_folder(tmp_path / "model", {"model_type": "phi3_v"})
    expect_user_error(
        main,
        [*BASE, "--model_name_or_path", str(model), "--output_dir", str(model)],
        f"--output_dir {model} is the source folder --model_name_or_path {model}",
        tmp_path,
        capsys,
    )


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        ({"model_type": "llama"}, None, "config.json has model_type 'llama', not 'phi3_v'"),
        ("{not json", None, "config.json is not readable JSON"),
        ([1, 2], None, "config.json has model_type None, not 'phi3_v'"),
        ({"model_type": "phi3_v"}, b"\x00\x01", "model.safetensors: truncated (2 bytes, no safetensors header)"),
        (
            {"model_type": "phi3_v"},
            b"\x40\x00\x00\x00\x00\x00\x00\x00" + b"{",
            "model.safetensors: truncated or not a safetensors file",
        ),
        (
            {"model_type": "phi3_v"},
            b"\x2c" + b"\x00" * 7 + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'[:44],
            "model.safetensors: unreadable safetensors header",
        ),
    ],
    ids=["wrong-type", "bad-json", "not-an-object", "tiny-file", "huge-header", "cut-header"],
)
def test_model_folder_type_and_weight_headers_are_checked_first(config, weights, message, tmp_path, capsys):
    model = _model_folder(tmp_path / "model", config, weights)
    expect_user_error(
        main,
        [*BASE, "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "run")],
        message,
        tmp_path,
        capsys,
    )


def test_a_truncated_tensor_payload_is_found_from_the_header(tmp_path, capsys):
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    weights = len(header).to_bytes(8, "little") + header + b"\x00" * 8  # 8 of 16 bytes
    model = _model_folder(tmp_path / "model", {"model_type": "phi3_v"}, weights)
    expect_user_error(
        main,
        [*BASE, "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "run")],
        "model.safetensors: truncated: the header describes",
        tmp_path,
        capsys,
    )


def test_sequence_longer_than_max_length_is_named_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*BASE, "--num_crops", "1", "--max_length", "64", "--no-eval", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "longer than --max_length 64" in err and "records are never truncated" in err
    assert snapshot(tmp_path) == before and not out.exists()


# -- every problem at once ------------------------------------------------------------------------------------------


def test_bad_values_folders_data_and_schedule_are_reported_in_one_invocation(tmp_path):
    # Four groups in one command: two bad flag values (argparse), a missing data folder, a warm-up as long as the
    # run, and an output folder below a file. Before, the first answer named only the two flag values, and each fix
    # revealed the next group; now one line names all five, before torch is imported, and nothing is written.
    (tmp_path / "afile").write_text("x")
    argv = [
        "--task", "jsonl", "--data_dir", str(tmp_path / "nope"), "--learning_rate", "5", "--lora_rank", "0",
        "--max_steps", "3", "--warmup_steps", "50", "--output_dir", str(tmp_path / "afile" / "run"),
    ]
    before = snapshot(tmp_path)
    done = _main_in_subprocess(argv, tmp_path)
    assert "HEAVY [] 1" in done.stdout, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 5 problems: "), done.stderr
    for fragment in (
        "argument --learning_rate: must be a finite number in (0, 1], got 5",
        "argument --lora_rank: must be an integer in 1..65536, got 0 (see phi3v-finetune --help)",
        f"--data_dir {tmp_path / 'nope'}: no such folder",
        "--warmup_steps 50 is not below --max_steps 3",
        f"{tmp_path / 'afile'} is a file, not a folder",
    ):
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before


def test_the_config_problems_name_every_group_at_once(tmp_path):
    # The full validation (FinetuneConfig.problems on a machine without CUDA): flags that exclude each other, the
    # data, the schedule, a TrainConfig range, flash attention on this machine and a run already in the output folder.
    from phi3v_core.cli.finetune import build_config, build_parser
    from phi3v_core.errors import ConfigError
    from phi3v_core.training import Machine

    out = _fake_run(tmp_path / "run", complete=True)
    args = build_parser().parse_args([
        "--task", "ucf101", "--use_qlora", "--method", "lora", "--num_crops", "0", "--max_steps", "3",
        "--warmup_steps", "50", "--use_flash_attention", "--output_dir", str(out),
    ])
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_config(args, Machine(cuda=False, world_size=1))
    message = str(info.value)
    expected = [
        "--use_qlora conflicts with --method lora; drop one of them",
        "--task ucf101 needs --data_dir",
        "--use_flash_attention needs a CUDA GPU (Ampere or newer) with flash-attn",
        "--warmup_steps 50 is not below --max_steps 3",
        f"--output_dir {out} already holds a complete run (step 3)",
        "--num_crops 0 is out of range",
    ]
    assert message.startswith(f"{len(expected)} problems: "), message
    assert [message.index(fragment) for fragment in expected] == sorted(message.index(f) for f in expected)
    assert snapshot(tmp_path) == before


def test_the_first_answer_holds_every_problem_that_does_not_need_the_gpu(tmp_path):
    # --num_crops 0 (a TrainConfig range) used to wait until the warm-up and the output folder were fixed, because
    # TrainConfig's checks imported torch. Now the torch-free first answer names all three, each once; fp16 without
    # CUDA joins them where torch is a CPU build (known from torch/version.py), else it is all that is left.
    from phi3v_core.software import torch_is_cpu_build

    (tmp_path / "afile").write_text("x")
    argv = ["--synthetic", "4", "--num_crops", "0", "--precision", "fp16", "--max_steps", "3"]
    fp16 = (
        "--precision fp16 needs a CUDA GPU (fp16 mixed precision with loss scaling does not run on CPU); "
        "use --precision fp32 or --precision bf16"
    )
    expected = [
        "--warmup_steps 50 is not below --max_steps 3",
        f"{tmp_path / 'afile'} is a file, not a folder",
        "--num_crops 0 is out of range: the recipe asserts num_crops <= 16; pass 1..16",
        *([fp16] if torch_is_cpu_build() else []),
    ]
    before = snapshot(tmp_path)
    done = _main_in_subprocess([*argv, "--warmup_steps", "50", "--output_dir", str(tmp_path / "afile" / "run")], tmp_path)
    assert "HEAVY [] 1" in done.stdout, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {len(expected)} problems: "), done.stderr
    assert all(lines[0].count(fragment) == 1 for fragment in expected), lines[0]
    assert snapshot(tmp_path) == before


def test_a_presets_sizes_join_the_first_answer(tmp_path):
    # The built-in presets' sizes come from the shipped records (phi3v_core.preset_files), so --lora_rank above the
    # tiny preset's hidden size is named with the schedule problem before torch or transformers is imported; before,
    # it waited for the second answer.
    done = _main_in_subprocess(
        [*BASE, "--use_lora", "--lora_rank", "65", "--max_steps", "3", "--warmup_steps", "50"], tmp_path
    )
    assert "HEAVY [] 1" in done.stdout, done.stdout + done.stderr
    line = done.stderr.strip()
    assert line.startswith("error: 2 problems: "), line
    assert "--lora_rank 65 exceeds the model's hidden size 64" in line and "--warmup_steps 50" in line


def test_where_cuda_is_unknown_before_torch_fp16_is_all_the_second_answer_says(tmp_path, monkeypatch):
    # A CUDA build of torch on a machine without a usable GPU (simulated: the build is not read as a CPU one): the
    # first answer leaves fp16 out, the second, once torch is imported, names it alone.
    import torch

    from phi3v_core.cli.finetune import build_config, build_parser
    from phi3v_core.errors import ConfigError
    from phi3v_core.training import machine

    if torch.cuda.is_available():
        pytest.skip("the fixed command would train on this GPU")
    monkeypatch.setattr(machine, "torch_is_cpu_build", lambda torch_dir=None: False)
    (tmp_path / "afile").write_text("x")
    argv = ["--synthetic", "4", "--precision", "fp16", "--max_steps", "3", "--num_crops"]
    with pytest.raises(ConfigError) as first:
        build_config(build_parser().parse_args([*argv, "0", "--warmup_steps", "50", "--output_dir",
                                                str(tmp_path / "afile" / "run")]))
    assert str(first.value).startswith("3 problems: ") and "fp16" not in str(first.value)
    assert "--num_crops 0 is out of range" in str(first.value)
    with pytest.raises(ConfigError) as second:
        build_config(build_parser().parse_args([*argv, "1", "--output_dir", str(tmp_path / "run")]))
    assert str(second.value) == (
        "--precision fp16 needs a CUDA GPU (fp16 mixed precision with loss scaling does not run on CPU); "
        "use --precision fp32 or --precision bf16"
    )

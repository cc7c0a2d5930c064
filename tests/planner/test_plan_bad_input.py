"""phi3v-plan bad input (issue #11): one line naming the flag (or file:line), exit 1, no traceback, nothing written;
``--json`` is strict JSON."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest

from planner.cli import main
from tests.safety_helpers import HANG_GUARD_S, expect_user_error, repo_env

GPU = ["--gpu", "A100-80GB"]

CASES = [
    (["--gpu", "A10O-80GB"], "unknown GPU 'A10O-80GB'; did you mean A100-80GB"),
    (["--gpu", "H100-SMX"], "did you mean H100-SXM"),
    (["--gpu", "zzzz"], "unknown GPU 'zzzz'; no close match (phi3v-plan --list-gpus lists all)"),
    (GPU + ["--count", "0"], "--gpus 0 must be >= 1"),
    (GPU + ["--count", "many"], "argument --gpus: invalid int value"),
    (GPU + ["--nodes", "0"], "--nodes 0 must be >= 1"),
    (GPU + ["--num-crops", "17"], "--num_crops 17 must be between 1 and 16"),
    (GPU + ["--num-crops", "0"], "--num_crops 0 must be between 1 and 16"),
    (GPU + ["--data", "{tmp}/missing"], "--data {tmp}/missing: not a folder"),
    (GPU + ["--data", "{tmp}/notes.txt"], "--data {tmp}/notes.txt: not a folder"),
    (GPU + ["--data", "{tmp}/corrupt"], "{tmp}/corrupt/docs_train.jsonl:2: invalid JSON"),
    (GPU + ["--deadline", "nan"], "argument --deadline: must be a finite number"),
    (GPU + ["--deadline", "inf"], "argument --deadline: must be a finite number"),
    (GPU + ["--deadline", "-1"], "argument --deadline: must be a finite number in (0,"),
    (GPU + ["--inter-node-gbit", "nan"], "argument --inter-node-gbit: must be a finite number"),
    (GPU + ["--text-tokens", "-1"], "argument --text-tokens: must be an integer in 0..1000000"),
    (GPU + ["--dataset-size", "0"], "--dataset-size 0 must be >= 1"),
    (GPU + ["--batch-size", "0"], "--batch_size 0 must be >= 1"),
    (GPU + ["--seq-len", "-5"], "--seq-len -5 must be >= 1"),
    (GPU + ["--max-micro-batch", "0"], "--max-micro-batch must be >= 1"),
    (GPU + ["--image-size", "0x0"], "--image-size 0x0 must be positive"),
    (GPU + ["--image-size", "big"], "'big' is not WIDTHxHEIGHT"),
    (GPU + ["--task", "coco"], "--task 'coco' is not one of docvqa"),
    (GPU + ["--method", "sft"], "argument --method: invalid choice: 'sft'"),
    (GPU + ["--cloud", "gcp"], "argument --cloud: invalid choice: 'gcp'"),
    (GPU + ["--bogus"], "unrecognized arguments: --bogus (see phi3v-plan --help)"),
]


def _tree_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    corrupt = tmp_path / "corrupt"
    (corrupt / "images").mkdir(parents=True)
    record = {"id": "a", "image": "images/a.png",
              "conversations": [{"from": "human", "value": "<|image_1|>\nq"}, {"from": "gpt", "value": "a"}]}
    (corrupt / "docs_train.jsonl").write_text(json.dumps(record) + "\n{not json\n")
    return {"tmp": str(tmp_path)}


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_1(argv, message, workspace, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    before = _tree_hash(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([a.format(**workspace) for a in argv])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    assert message.format(**workspace) in captured.err
    assert captured.out == ""
    assert _tree_hash(tmp_path) == before


def _no_constants(name: str) -> float:
    raise AssertionError(f"{name} is not JSON")


@pytest.mark.parametrize(
    "argv",
    [GPU + ["--count", "8", "--nodes", "2", "--deadline", "1", "--dataset-size", "1000", "--json"],
     ["--gpu", "T4", "--method", "full", "--json"],  # nothing fits: the empty speed and margins must still be JSON
     ["--list-gpus", "--json"]],
    ids=["deadline", "nothing-fits", "list-gpus"],
)
def test_json_output_is_strict(argv, capsys) -> None:
    assert main(argv) == 0
    text = capsys.readouterr().out
    value = json.loads(text, parse_constant=_no_constants)  # NaN/Infinity would call parse_constant

    def finite(item) -> None:
        if isinstance(item, float):
            assert math.isfinite(item)
        elif isinstance(item, dict):
            for v in item.values():
                finite(v)
        elif isinstance(item, list):
            for v in item:
                finite(v)

    finite(value)


# -- issue #27: plan refuses what the model cannot take (the context rule finetune and `convert check` apply) --------


@pytest.mark.parametrize(
    ("flags", "said"),
    [(["--seq-len", "10000000"], "--seq-len 10000000 is more than the model's context (131,072 tokens)"),
     (["--text-tokens", "1000000"], "tokens per sample is more than the model's context")],
)  # fmt: skip
def test_a_workload_past_the_models_context_is_refused(tmp_path, capsys, flags, said):
    expect_user_error(main, ["--gpu", "A100-80GB", *flags], said, tmp_path, capsys)


def _refusal(module: str, *args: str) -> str:
    """Run a real CLI; it must exit 1 with one ``error:`` line and no traceback; that line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=repo_env(),
                          timeout=HANG_GUARD_S)  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    return proc.stderr


def _plan_and_check_refusals(data):
    plan = _refusal("planner.cli", "--gpu", "A100-80GB", "--data", str(data))
    check = _refusal("phi3v_core.cli.convert", "check", str(data), "--split", "train")
    return plan, check


def test_an_eps_image_is_refused_by_plan_and_check_with_one_reason(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    # Pillow reads an EPS header by itself but decodes its pixels only through Ghostscript: header-only planning
    # accepted what check (which decodes) refused.
    (data / "images" / "page.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    record = {"id": "r0", "conversations": [{"user": "<|image_1|>\nWhat?", "assistant": "ok", "images": ["page.eps"]}]}
    (data / "mine_train.jsonl").write_text(json.dumps(record) + "\n")
    plan, check = _plan_and_check_refusals(data)
    reason = f"{data}/mine_train.jsonl:1: conversations[0].images[0] {data}/images/page.eps: EPS image: its pixels "
    assert reason in plan and reason in check, (plan, check)
    assert "convert it to PNG or JPEG" in plan and "convert it to PNG or JPEG" in check


def test_a_record_past_the_models_context_is_refused_by_plan_and_check_with_one_reason(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    turn = {"user": "word " * 90_000, "assistant": "ok"}  # under the 500 000-character field limit
    records = [{"id": "small", "conversations": [{"user": "hi", "assistant": "ok"}]},
               {"id": "huge", "conversations": [turn] * 3}]  # ~ 340 k tokens in all: past 131 072  # fmt: skip
    (data / "mine_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plan, check = _plan_and_check_refusals(data)
    reason = f"jsonl:{data}: 1 training record(s) longer than --max_length 131072 (record 'huge'"
    assert reason in plan and reason in check, (plan, check)
    assert f"({data}/mine_train.jsonl:2)" in plan  # plan also names the line
    assert "records are never truncated: shorten them, lower --num_crops" in plan
    assert "records are never truncated: shorten them, lower --num_crops" in check


@pytest.mark.parametrize(("flags", "said"), [
    (["--gpu", "A100-80GB", "--save", "x.json"], "--save belongs to --validate and does nothing without it"),
    (["--gpu", "A100-80GB", "--repeats", "2"], "--repeats belongs to --validate and does nothing without it"),
    (["--list-gpus", "--validate"], "--list-gpus and --validate are separate reports"),
    (["--validate", "--save", "{tmp}"], "is a folder; name the result file to write"),
])  # fmt: skip
def test_flags_that_would_do_nothing_are_refused_before_any_work(tmp_path, capsys, flags, said):
    argv = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    expect_user_error(main, argv, said, tmp_path, capsys)

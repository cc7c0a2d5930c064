"""phi3v-plan bad input (issue #11): one line naming the flag (or file:line), exit 1, no traceback, nothing written;
``--json`` is strict JSON."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from planner.cli import main
from tests.safety_helpers import expect_user_error

GPU = ["--gpu", "A100-80GB"]

CASES = [
    (["--gpu", "A10O-80GB"], "unknown GPU 'A10O-80GB'; did you mean A100-80GB"),
    (["--gpu", "H100-SMX"], "did you mean H100-SXM"),
    (["--gpu", "zzzz"], "unknown GPU 'zzzz'; no close match (phi3v-plan --list-gpus lists all)"),
    (GPU + ["--count", "0"], "--count 0 must be >= 1"),
    (GPU + ["--count", "many"], "argument --count: invalid int value"),
    (GPU + ["--nodes", "0"], "--nodes 0 must be >= 1"),
    (GPU + ["--num-crops", "17"], "--num-crops 17 must be between 1 and 16"),
    (GPU + ["--num-crops", "0"], "--num-crops 0 must be between 1 and 16"),
    (GPU + ["--data", "{tmp}/missing"], "--data {tmp}/missing: not a folder"),
    (GPU + ["--data", "{tmp}/notes.txt"], "--data {tmp}/notes.txt: not a folder"),
    (GPU + ["--data", "{tmp}/corrupt"], "{tmp}/corrupt/docs_train.jsonl:2: invalid JSON"),
    (GPU + ["--deadline", "nan"], "argument --deadline: must be a finite number"),
    (GPU + ["--deadline", "inf"], "argument --deadline: must be a finite number"),
    (GPU + ["--deadline", "-1"], "argument --deadline: must be a finite number in (0,"),
    (GPU + ["--inter-node-gbit", "nan"], "argument --inter-node-gbit: must be a finite number"),
    (GPU + ["--text-tokens", "-1"], "argument --text-tokens: must be an integer in 0..1000000"),
    (GPU + ["--dataset-size", "0"], "--dataset-size 0 must be >= 1"),
    (GPU + ["--batch-size", "0"], "--batch-size 0 must be >= 1"),
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


def test_a_data_record_past_the_models_context_is_refused_naming_it(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    turn = {"user": "word " * 90_000, "assistant": "ok"}  # under the 500 000-character field limit
    record = {"id": "huge", "conversations": [turn] * 3}  # ~ 340 k tokens in all: past 131 072
    (data / "mine_train.jsonl").write_text(json.dumps(record) + "\n")
    expect_user_error(main, ["--gpu", "A100-80GB", "--data", str(data)], "more than the model's context", tmp_path,
                      capsys)  # fmt: skip


@pytest.mark.parametrize(("flags", "said"), [
    (["--gpu", "A100-80GB", "--save", "x.json"], "--save belongs to --validate and does nothing without it"),
    (["--gpu", "A100-80GB", "--repeats", "2"], "--repeats belongs to --validate and does nothing without it"),
    (["--list-gpus", "--validate"], "--list-gpus and --validate are separate reports"),
    (["--validate", "--save", "{tmp}"], "is a folder; name the result file to write"),
])  # fmt: skip
def test_flags_that_would_do_nothing_are_refused_before_any_work(tmp_path, capsys, flags, said):
    argv = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    expect_user_error(main, argv, said, tmp_path, capsys)

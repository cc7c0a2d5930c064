"""phi3v-bench bad input (issue #11): one line, exit 1, no traceback, refused before measuring, nothing changed on disk."""

from __future__ import annotations

import json
import os
import struct

import pytest

import bench.runner
import bench.selfcheck
from bench.cli import main
from bench.config import BenchConfig
from bench.store import save_result
from tests.bench.factories import make_result
from tests.bench.test_bench_safety import folder_hash, never_measure

RUN = ["run", "--model", "tiny", "--warmup", "0", "--repeats", "1"]
MATRIX = ["matrix", "--grid", "method=lora", "--set", "model=tiny", "steps=2", "--no-progress"]

CASES = [
    # run: flag values
    (RUN + ["--steps", "1000000000"], "steps 1000000000 is above the limit of 100000"),
    (RUN + ["--steps", "nan"], "argument --max_steps: invalid int value"),
    (RUN + ["--steps", "1"], "steps must be >= 2"),
    (["run", "--repeats", "0"], "repeats must be a positive integer, got 0"),
    (["run", "--gpus", "0"], "gpus must be a positive integer, got 0"),
    (["run", "--gpus", "100000"], "gpus 100000 is above the limit"),
    (["run", "--seed", "-1"], "seed must be an integer >= 0"),
    (["run", "--num-crops", "17"], "num_crops must be <= 16"),
    (["run", "--micro-batch", "3"], "is not a multiple of gpus*nodes*micro_batch"),
    (RUN + ["--timeout", "-1"], "--timeout -1 must be > 0 seconds"),
    (RUN + ["--timeout", "nan"], "--timeout nan must be > 0 seconds, finite"),
    (RUN + ["--timeout", "inf"], "--timeout inf must be > 0 seconds, finite"),
    (RUN + ["--timeout", "1e9"], "at most 604800"),
    (RUN + ["--master-port", "70000"], "argument --master_port: must be an integer in 1..65535"),
    (["run", "--method", "sft"], "method 'sft' is not one of full, frozen_vision, lora, qlora"),
    (["run", "--attn", "flash"], "attn 'flash' is not one of eager, sdpa, flash_attention_2"),
    (["run", "--precision", "fp8"], "precision 'fp8' is not one of bf16, fp16, fp32"),
    (["run", "--seq-profile", "video"], "seq_profile 'video' is not one of"),
    (["run", "--node-rank", "0"], "--master_addr missing"),
    # run: paths, refused before measuring
    (RUN + ["--steps", "2", "--out", "{file}"], "exists and is not a folder"),
    (RUN + ["--steps", "2", "--out", "{file}/sub"], "is a file, not a folder"),
    (RUN + ["--release", "../escape"], "release '../escape' must be letters, digits"),
    (RUN + ["--release", "a/b"], "release 'a/b' must be letters, digits"),
    (RUN + ["--release", ".."], "release '..' must be letters, digits"),
    (["run", "--model", "{llama}"], "config.json has model_type 'llama', not 'phi3_v'"),
    (["run", "--model", "{truncated}"], "model.safetensors: truncated"),
    (["run", "--model", "{tmp}/no-such-model"], "is neither a preset"),
    (["run", "--model", "{file}"], "is neither a preset"),
    # matrix
    (["matrix"], "pass --preset"),
    (["matrix", "--grid", "nonsense"], "grid axis 'nonsense' must look like field=v1,v2"),
    (["matrix", "--grid", "steps=2,3"], "grid axis 'steps' is not swept"),
    (["matrix", "--grid", "method=lora,sft"], "method 'sft' is not one of"),
    (["matrix", "--preset", "fast"], "unknown preset 'fast'; choose one of seed-a100, seed-v100, quick"),
    (["matrix", "--preset", "quick", "--set", "steps=nan"], "steps='nan': expected an integer"),
    (["matrix", "--preset", "quick", "--set", "repeats=0"], "repeats must be a positive integer"),
    (["matrix", "--preset", "quick", "--set", "steps=1000000000"], "above the limit of 100000"),
    (["matrix", "--preset", "quick", "--set", "gpu=2"], "unknown config field 'gpu'; did you mean 'gpus'?"),
    (MATRIX + ["--out", "{file}"], "exists and is not a folder"),
    (MATRIX + ["--release", "../x"], "release '../x' must be letters"),
    (["matrix", "--grid", "method=lora", "--set", "steps=2", "--no-progress", "--set", "model={llama}"], "model_type 'llama'"),
    # compare
    (["compare", "{tmp}/missing-a", "{tmp}/missing-b"], "missing-a: no such file or folder"),
    (["compare", "{corrupt}", "{out}"], "broken.json:1: invalid JSON"),
    (["compare", "{out}", "{out}", "--threshold", "nan"], "argument --threshold: must be a finite number"),
    (["compare", "{out}", "{out}", "--alpha", "inf"], "argument --alpha: must be a finite number"),
    (["compare", "{out}", "{out}", "--alpha", "0"], "--alpha must be in (0, 1)"),
    (["compare", "{out}", "{out}", "--min-repeats", "0"], "--min-repeats must be in 1..100"),
    # report
    (["report", "{out}", "--out", "{file}"], "--out {file} exists and is not a folder"),
    (["report", "{out}", "--out", "{file}/report"], "is a file, not a folder"),
    (["report", "{corrupt}", "--out", "{tmp}/report"], "broken.json:1: invalid JSON"),
    # selfcheck
    (["selfcheck", "--steps", "1"], "--steps must be >= 2"),
    (["selfcheck", "--steps", "1000000000"], "--steps must be <= 1000"),
]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A results folder holding one result, a plain file, a corrupt result, and two bad model folders."""
    monkeypatch.setattr(bench.runner, "run_config", never_measure)
    monkeypatch.setattr(bench.selfcheck, "run_selfcheck", never_measure)
    out = tmp_path / "results"
    save_result(make_result(BenchConfig(method="lora", gpus=8, global_batch=64, release="v1", out=str(out))))
    (tmp_path / "notes.txt").write_text("not a folder")
    corrupt = tmp_path / "corrupt" / "v1" / "hw"
    corrupt.mkdir(parents=True)
    (corrupt / "broken.json").write_text('{"config": ')
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text(json.dumps({"model_type": "phi3_v"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (truncated / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    return {"tmp": str(tmp_path), "out": str(out), "file": str(tmp_path / "notes.txt"),
            "corrupt": str(tmp_path / "corrupt"), "llama": str(llama), "truncated": str(truncated)}


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_1_and_changes_nothing(argv, message, workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out (results) then lands in the hashed folder too
    argv = [a.format(**workspace) for a in argv]
    if "--out" not in argv and argv[0] in ("run", "matrix"):
        argv += ["--out", workspace["out"]]
    before = folder_hash(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message.format(**workspace) in err
    assert captured.out == ""
    assert folder_hash(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["run", "matrix", "report"])
def test_unwritable_out_is_refused_before_anything_runs(command, workspace, tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = {"run": RUN + ["--steps", "2"], "matrix": MATRIX, "report": ["report", workspace["out"]]}[command]
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(locked / "sub")])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not writable" in err and str(locked) in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)

"""phi3v-bench keeps results safe (issue #11): one writer per results folder, refusal before measuring, measured numbers
never lost when the write fails, and a killed sweep takes its workers and temp folders with it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench.matrix
import bench.runner
import bench.store
from bench.cli import main
from bench.config import BenchConfig
from phi3v_core.fs import LOCK_NAME
from tests.bench.factories import make_result
from tests.safety_helpers import HANG_GUARD_S

TINY = ["model=tiny", "num_crops=1", "global_batch=2", "micro_batch=2", "precision=fp32", "warmup=0", "repeats=1"]


def folder_hash(folder: Path) -> str:
    """A digest of every path, file content and permission under ``folder`` (``missing`` when it does not exist)."""
    if not folder.exists():
        return "missing"
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(str(path.stat().st_mode).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def never_measure(*_args, **_kwargs):
    raise AssertionError("a refused command must not start measuring")


def _one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """A real second process holding ``folder``'s lock until it is killed."""
    code = (
        "import sys, time\n"
        "from phi3v_core.fs import FolderLock\n"
        f"FolderLock({str(folder)!r}, command={command!r}, flag='--out').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(3600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# -- 1. one writer per results folder ------------------------------------------------------------------------------


def test_second_sweep_into_a_locked_out_refuses_at_once_naming_the_holder(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("someone's notes")
    holder = _hold_lock(out, "phi3v-bench matrix --preset quick")
    try:
        before = folder_hash(out)
        monkeypatch.setattr(bench.runner, "run_config", never_measure)
        for argv in (
            ["matrix", "--grid", "method=lora,full", "--set", *TINY, "steps=2", "--out", str(out), "--no-progress"],
            ["run", "--model", "tiny", "--steps", "2", "--warmup", "0", "--repeats", "1", "--out", str(out)],
        ):
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 1
            err = _one_line_error(capsys.readouterr().err)
            assert f"pid {holder.pid} on {socket.gethostname()}" in err
            assert "phi3v-bench matrix --preset quick" in err and "one writer per folder" in err
            assert folder_hash(out) == before  # nothing written, the holder's lock untouched
    finally:
        holder.kill()
        holder.wait(timeout=HANG_GUARD_S)


def test_console_run_refuses_a_locked_out_in_one_line(tmp_path) -> None:
    out = tmp_path / "results"
    holder = _hold_lock(out, "phi3v-bench run --method full")
    try:
        before = folder_hash(out)
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cli", "run", "--model", "tiny", "--steps", "2", "--warmup", "0",
             "--repeats", "1", "--out", str(out), "--json"],
            capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, "PHI3V_DEBUG": ""},
        )
    finally:
        holder.kill()
        holder.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == 1 and proc.stdout == ""
    err = _one_line_error(proc.stderr)
    assert f"pid {holder.pid}" in err and "phi3v-bench run --method full" in err
    assert folder_hash(out) == before


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "results"
    holder = _hold_lock(out, "phi3v-bench matrix --preset quick")
    holder.send_signal(signal.SIGKILL)  # dies without releasing: its lock is stale
    holder.wait(timeout=HANG_GUARD_S)
    assert (out / LOCK_NAME).is_file()
    seen = []

    def fake_run_config(cfg: BenchConfig):
        seen.append(json.loads((out / LOCK_NAME).read_text()))  # held by us while measuring
        return make_result(cfg)

    monkeypatch.setattr(bench.runner, "run_config", fake_run_config)
    assert main(["matrix", "--grid", "method=lora", "--set", "gpus=8", "global_batch=64", "--release", "v1",
                 "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert f"took over a stale lock on --out {out} left by pid {holder.pid}" in captured.err
    assert seen[0]["pid"] == os.getpid() and seen[0]["command"].startswith("phi3v-bench matrix --grid method=lora")
    assert json.loads(captured.out.strip().splitlines()[-1])["counts"]["ok"] == 1
    assert not (out / LOCK_NAME).exists()  # released at the end


# -- 3. measured numbers are never lost ----------------------------------------------------------------------------


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_run_prints_the_numbers_when_the_result_cannot_be_written(as_json, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.runner, "run_config", lambda cfg: make_result(cfg, step_time=0.25, jitter=0.0))
    monkeypatch.setattr(bench.store, "atomic_write_text", _disk_full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "results"
    argv = ["run", "--gpus", "8", "--batch-size", "64", "--release", "v1", "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--json"] if as_json else []))
    assert exc.value.code == 1
    captured = capsys.readouterr()
    err = _one_line_error(captured.err)
    assert "no space left on the device" in err and str(out / "v1") in err and ".json" in err
    expected_img_s = 64 / 0.25  # what the fake runner measured
    if as_json:
        printed = json.loads(captured.out.strip().splitlines()[-1])
        assert printed["path"] is None and printed["summary"]["img_per_s"] == pytest.approx(expected_img_s)
        assert printed["write_error"] in err
    else:
        assert f"{expected_img_s:.3f}" in captured.out
    # A copy is kept where it could be written, and named in the message.
    copies = list((tmp_path / "tmp").glob("phi3v-bench-unsaved-*.json"))
    assert len(copies) == 1 and str(copies[0]) in err
    assert json.loads(copies[0].read_text())["summary"]["img_per_s"] == pytest.approx(expected_img_s)


def test_matrix_keeps_the_measured_cell_and_stops_when_writing_fails(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.runner, "run_config", lambda cfg: make_result(cfg, step_time=0.5, jitter=0.0))
    monkeypatch.setattr(bench.matrix, "atomic_write_text", _disk_full)
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        main(["matrix", "--grid", "method=lora,full", "--set", "gpus=8", "global_batch=64", "--release", "v1",
              "--out", str(out), "--json"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    err = _one_line_error(captured.err)
    assert "was measured but its result could not be written" in err and "no space left on the device" in err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert len(summary["cells"]) == 1  # the sweep stopped: the next cell would have failed the same way
    cell = summary["cells"][0]
    assert cell["saved"] is False and cell["result"]["summary"]["img_per_s"] == pytest.approx(64 / 0.5)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_file_size_limit_names_the_path_and_the_cause(tmp_path) -> None:
    """``ulimit -f`` in a real subprocess: the result write fails with EFBIG, the numbers are still printed."""
    out = tmp_path / "results"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # as a shell with `ulimit -f` does for its output
        "import bench.runner\n"
        "from tests.bench.factories import make_result\n"
        "bench.runner.run_config = lambda cfg: make_result(cfg, step_time=0.5, jitter=0.0)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "from bench.cli import main\n"
        f"main(['run', '--gpus', '8', '--batch-size', '64', '--release', 'v1', '--out', {str(out)!r}, '--json'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "PHI3V_DEBUG": "", "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1
    err = _one_line_error(proc.stderr)
    assert "file too large" in err and str(out / "v1") in err
    assert json.loads(proc.stdout.strip().splitlines()[-1])["summary"]["img_per_s"] == pytest.approx(128.0)
    assert not list(out.rglob("*.json"))  # no half-written result


# -- 4. a killed sweep takes its workers and temp folders with it -------------------------------------------------


def _worker_loaded_torch(process) -> bool:
    """The process is a benchmark worker that has got as far as loading torch (so it is really working)."""
    try:
        return "bench.worker" in " ".join(process.cmdline()) and any(
            "libtorch" in m.path for m in process.memory_maps()
        )
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess / AccessDenied: not (yet) one
        return False


@pytest.mark.slow
def test_sigterm_to_a_sweep_kills_its_worker_and_removes_temp_folders(tmp_path) -> None:
    import psutil

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "results"
    # Many steps: the worker is certainly still running when the signal comes, however fast the machine is.
    argv = [sys.executable, "-m", "bench.cli", "matrix", "--grid", "method=lora", "--set", *TINY, "steps=100000",
            "--release", "v1", "--out", str(out), "--no-progress"]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp), "PHI3V_DEBUG": ""})
    tree: list[psutil.Process] = []
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while time.monotonic() < deadline and sweep.poll() is None:
            tree = psutil.Process(sweep.pid).children(recursive=True)
            if any(_worker_loaded_torch(p) for p in tree):
                break
            time.sleep(0.2)
        assert sweep.poll() is None, sweep.communicate()
        assert tree, "the sweep never started a worker"
        assert list(tmp.glob("phi3v-bench-*"))  # the repeat's temp folder exists while it runs
        sweep.send_signal(signal.SIGTERM)
        sweep.wait(timeout=HANG_GUARD_S)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    survivors = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    assert sweep.returncode != 0
    # No temp folder of ours left behind (torch may keep its compile cache, torchinductor_<user>, there: not ours).
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert not (out / LOCK_NAME).exists()  # the lock went with it
    assert not list(out.rglob("*.json"))  # the interrupted cell wrote no result

"""What a SIGKILLed measurement leaves (issue #27 §3 leaks, §2 orphan workers): real processes, real signals.

A killed runner's worker dies with it (parent-death signal); its ``/tmp/phi3v-bench-*`` folders are removed by the
next measurement, which says so; a result stranded in a hidden ``.json.<x>.tmp`` is put in place under the lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.config import BenchConfig
from bench.preflight import one_writer
from bench.scratch import OWNER_NAME, clean_stale
from bench.store import iter_result_files, load_result, result_path
from tests.bench.factories import gpu_env, make_result
from tests.safety_helpers import HANG_GUARD_S, process_running, repo_env, wait_until


def test_a_sigkilled_runner_takes_its_worker_and_the_next_run_cleans_its_folders(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    pid_file = tmp_path / "worker.pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    runner = (
        "import sys, bench.runner as r\n"
        "from bench.config import BenchConfig\n"
        f"r.launch_commands = lambda *a, **k: [[sys.executable, '-c', {hang!r}]]\n"
        "r.run_config(BenchConfig(release='t'), timeout_s=600)\n"
    )
    env = {**repo_env(), "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-c", runner], env=env)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the fake worker never started")
        worker = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can clean up now
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not process_running(worker), "the worker outlived its SIGKILLed runner")
    left = sorted(p.name for p in scratch.iterdir())
    assert any(n.startswith("phi3v-bench-flops-") for n in left) and len(left) == 2, left  # the leak, before
    foreign = scratch / "phi3v-bench-not-ours"
    foreign.mkdir()  # no owner file: never touched
    messages = clean_stale(scratch)
    assert len(messages) == 2 and all("scratch folder of a measurement that was killed" in m for m in messages)
    assert sorted(p.name for p in scratch.iterdir()) == ["phi3v-bench-not-ours"]


def test_a_live_measurements_folder_is_never_cleaned(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bench.scratch import owned_tempdir\n"
         "with owned_tempdir('phi3v-bench-') as (d, fd):\n    print(d, flush=True); sys.stdin.read()"],
        env={**repo_env(), "TMPDIR": str(tmp_path)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        folder = Path(holder.stdout.readline().strip())
        assert (folder / OWNER_NAME).is_file()
        assert clean_stale(tmp_path) == [] and folder.is_dir()
    finally:
        holder.communicate("", timeout=HANG_GUARD_S)
    assert not folder.exists()  # removed by its owner at the end


def _stranded(tmp_path: Path, text: str) -> tuple[Path, Path]:
    cfg = BenchConfig(release="t", out=str(tmp_path))
    final = result_path(tmp_path, "t", gpu_env(count=1).hardware, cfg)
    final.parent.mkdir(parents=True)
    tmp = final.with_name(f".{final.name}.k1ll3d.tmp")  # what atomic_write_text leaves when killed before its rename
    tmp.write_text(text)
    return tmp, final


def test_a_finished_result_stranded_by_a_kill_is_recovered_by_the_next_writer(tmp_path: Path, capsys) -> None:
    cfg = BenchConfig(release="t", out=str(tmp_path))
    tmp, final = _stranded(tmp_path, make_result(cfg, env=gpu_env(count=1)).to_json())
    assert list(iter_result_files([tmp_path])) == []  # a reader only says so
    assert "a result write stranded by a kill" in capsys.readouterr().err and tmp.exists()
    with one_writer(str(tmp_path), "phi3v-bench matrix"):
        pass
    assert "recovered a finished result" in capsys.readouterr().err
    assert not tmp.exists() and load_result(final).status == "ok"


def test_a_cut_off_result_write_is_removed_and_said(tmp_path: Path, capsys) -> None:
    tmp, final = _stranded(tmp_path, json.dumps({"schema": "phi3v-bench"})[:10])
    with one_writer(str(tmp_path), "phi3v-bench matrix"):
        pass
    assert "cut off by a kill" in capsys.readouterr().err and not tmp.exists() and not final.exists()


def test_a_fifo_named_json_in_a_results_folder_is_skipped_not_read(tmp_path: Path, capsys) -> None:
    (tmp_path / "t").mkdir()
    os.mkfifo(tmp_path / "t" / "cell.json")
    assert list(iter_result_files([tmp_path])) == []  # returns at once: never opened
    assert "FIFO" in capsys.readouterr().err


_KILLED_AT_PUBLISH = """
import os, signal, sys
import phi3v_core.io as io
io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed between the write and the rename
io.atomic_write_json(sys.argv[1], {"trace": 1})
"""


def test_a_cache_write_killed_before_its_rename_is_removed_by_the_next_writer_not_a_live_ones(tmp_path: Path) -> None:
    from phi3v_core.io import remove_dead_temps

    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_PUBLISH, str(tmp_path / "key.json")], env=repo_env(),
                          timeout=HANG_GUARD_S)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    (dead,) = tmp_path.glob(".key.json.*.tmp")
    live = tmp_path / f".other.json.{os.getpid()}-abc.tmp"  # a writer that still runs (this process)
    live.write_text("{")
    assert remove_dead_temps(tmp_path, "*.json") == [dead]
    assert not dead.exists() and live.exists()

"""Recovery touches only what its transaction made (issue #27 §1), through the real CLIs.

A journal that names anything but the hidden siblings and plain names phi3v writes is refused with one line and
nothing changes, byte for byte; a folder the user re-created after a killed overwrite is left as is and reported;
read-only commands report an interrupted transaction and never repair it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from phi3v_core.transaction import intent_path
from tests.safety_helpers import HANG_GUARD_S, repo_env, run_with_full_disk_at_the_journal, snapshot


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from phi3v_core.cli.convert import main; main()", *argv],
        env=repo_env(), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip


def _world(tmp_path: Path) -> tuple[Path, Path]:
    """``work/data`` (the transaction's target, with an old run aside) and ``victim`` (what no journal may touch)."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    (victim / "sub" / "model.safetensors").write_bytes(b"\x00" * 64)
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    (data / "user.txt").write_text("the user's")
    return data, victim


def _swap(data: Path, **override: object) -> dict:
    record = {"target": data.name, "pid": 4242, "kind": "swap", "command": "phi3v-convert",
              "staged": f".{data.name}.phi3v-new-4242", "aside": f".{data.name}.phi3v-old-4242",
              "id": uuid.uuid4().hex, "old": None}  # fmt: skip
    return {**record, **override}


def _hostile(data: Path, victim: Path) -> dict[str, tuple[Path, dict]]:
    moves = data / ".moves.phi3v-txn.json"
    staged = {"kind": "moves", "command": "phi3v-finetune final save", "pid": 4242, "staged": ".final-staging",
              "names": ["model.safetensors"], "id": uuid.uuid4().hex, "replaces": {}}  # fmt: skip
    return {
        "aside ..": (intent_path(data), _swap(data, aside="../victim")),
        "aside absolute": (intent_path(data), _swap(data, aside=str(victim))),
        "staged ..": (intent_path(data), _swap(data, staged="../victim")),
        "name with /": (intent_path(data), _swap(data, kind="set_aside", aside="x/../../victim", done_marker="d")),
        "other target": (intent_path(data), _swap(data, target="victim", staged=".victim.phi3v-new-1")),
        "moves staged ..": (moves, {**staged, "staged": "../../victim"}),
        "moves names ..": (moves, {**staged, "names": ["../x", "model.safetensors"]}),
        "no id (older version or by hand)": (intent_path(data), {k: v for k, v in _swap(data).items() if k != "id"}),
        "not json": (intent_path(data), None),
    }


CASES = ["aside ..", "aside absolute", "staged ..", "name with /", "other target", "moves staged ..",
         "moves names ..", "no id (older version or by hand)", "not json"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_journal_is_refused_by_a_writer_and_nothing_changes_byte_for_byte(tmp_path, case):
    data, victim = _world(tmp_path)
    (data / ".final-staging").mkdir()
    (data / ".final-staging" / "model.safetensors").write_text("staged")
    path, record = _hostile(data, victim)[case]
    path.write_text("{cut" if record is None else json.dumps(record))
    before = snapshot(tmp_path)
    proc = _cli("synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(data), "--overwrite")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "refused, nothing was touched" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["aside ..", "moves staged .."])
def test_a_read_only_check_reports_a_pending_transaction_and_repairs_nothing(tmp_path, case):
    data, victim = _world(tmp_path)
    path, record = _hostile(data, victim)[case]
    path.write_text(json.dumps(record))
    before = snapshot(tmp_path)
    proc = _cli("check", str(data))
    assert "left a transaction" in proc.stderr and "this command only reads" in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before


# A real overwrite killed half-way: the old run is aside, the new one (with the transaction's proof) in place.
_KILLED_OVERWRITE = """
import os, signal, sys
from pathlib import Path
from phi3v_core.transaction import SetAside
run = Path(sys.argv[1])
SetAside(run, "phi3v-finetune", done_marker="run_complete.json")
(run / "half.txt").write_text("half-written")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_overwrite(run: Path) -> Path:
    run.mkdir(parents=True)
    (run / "old.txt").write_text("the previous run")
    proc = subprocess.run([sys.executable, "-c", _KILLED_OVERWRITE, str(run)], env=repo_env(), timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL
    (aside,) = run.parent.glob(f".{run.name}.phi3v-replaced-*")
    return aside


def test_a_folder_recreated_after_a_killed_overwrite_is_left_as_is_and_the_old_run_kept(tmp_path):
    run = tmp_path / "work" / "run"
    aside = _killed_overwrite(run)
    import shutil

    shutil.rmtree(run)  # the user removes the half-written folder and puts their own there
    run.mkdir()
    (run / "mine.txt").write_text("new work of the user")
    before = snapshot(run)
    before_aside = snapshot(aside)
    proc = _cli("synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(run))  # a writer on the path
    assert f"{run} was changed after the interrupted command" in proc.stderr, proc.stderr
    assert f"left as is; the previous content is kept at {aside}" in proc.stderr
    assert snapshot(run) == before and snapshot(aside) == before_aside
    assert not intent_path(run).exists()
    proc = _cli("synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(run))  # later commands keep naming it
    assert f"{aside} is left over" in proc.stderr and snapshot(aside) == before_aside


def test_a_read_only_check_never_rolls_back_a_killed_overwrite(tmp_path):
    run = tmp_path / "work" / "run"
    aside = _killed_overwrite(run)
    before = snapshot(tmp_path)
    proc = _cli("check", str(run))
    assert "phi3v-finetune --output_dir" in proc.stderr and "finishes or rolls it back" in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before
    # the next writer rolls it back: the proof says the half-written folder is the transaction's own
    proc = _cli("synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(run))
    assert "restored the previous content" in proc.stderr, proc.stderr
    assert (run / "old.txt").read_text() == "the previous run" and not aside.exists()


def test_a_live_transaction_refuses_a_second_writer(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("old")
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from phi3v_core.transaction import SetAside
        SetAside(Path(sys.argv[1]), "long-overwrite", done_marker="done")
        print("ready", flush=True)
        time.sleep(3600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script, str(run)], env=repo_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        from phi3v_core.fs import FolderLock, StorageError

        with pytest.raises(StorageError, match="is being replaced by pid"):
            FolderLock(run, "second").acquire()
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=HANG_GUARD_S)


def test_a_full_disk_or_size_limit_in_convert_names_the_folder(tmp_path):
    out = tmp_path / "data"
    command = f"ulimit -f 1; exec {sys.executable} -c 'from phi3v_core.cli.convert import main; main()' synthetic " \
              f"--task nlvr2 --n 2 --out_dir {out}"  # fmt: skip
    proc = subprocess.run(["bash", "-c", command], env=repo_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {out}: file too large"), proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


_SIGTERM_IN_THE_SWAP = """
import os, signal, sys
import phi3v_core.transaction as txn
real = txn._exchange
def exchange(a, b):
    os.kill(os.getpid(), signal.SIGTERM)  # lands in the middle of the swap's renames
    return real(a, b)
txn._exchange = exchange
from phi3v_core.cli.convert import main
main()
"""


def test_sigterm_during_converts_swap_never_leaves_the_data_folder_missing(tmp_path):
    out = tmp_path / "data"
    first = _cli("synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(out))
    assert first.returncode == 0, first.stderr
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_IN_THE_SWAP, "synthetic", "--task", "nlvr2", "--n", "3", "--out_dir", str(out),
         "--overwrite"], env=repo_env(), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert (out / "nlvr2_train.jsonl").is_file()  # the swap ran to its end before the stop landed
    assert len((out / "nlvr2_train.jsonl").read_text().splitlines()) == 3
    check = _cli("check", str(out))
    assert check.returncode == 0, check.stderr


def test_a_full_disk_at_the_overwrite_journal_names_the_journal_and_keeps_the_old_data(tmp_path):
    out = tmp_path / "data"
    args = ["synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", str(out)]
    first = subprocess.run([sys.executable, "-m", "phi3v_core.cli.convert", *args], env=repo_env(),
                           capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path)
    proc = run_with_full_disk_at_the_journal("phi3v_core.cli.convert", [*args, "--overwrite"], repo_env())
    journal = intent_path(out)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {journal}") and "no space left on the device" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before  # the old data as it was, no journal, draft or staged folder left

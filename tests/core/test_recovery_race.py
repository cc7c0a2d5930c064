"""Recovery racing a writer (issue #27): real processes, an overwrite killed by SIGKILL, then one process recovering
the folder while another writer starts on it. Every trial must end with the old run restored (and the writer's file
in it, or the writer refused in one line): never a mix of the killed run's files and the old ones, never
``Directory not empty``, never the old run left hidden beside the folder."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.safety_helpers import HANG_GUARD_S, repo_env

TRIALS = 20

# Imports the training module once, then per trial forks the overwrite that gets killed (cheap on a loaded machine).
_TRIALS = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
from phi3v_core.training.run import guarded_output_dir

RECOVER = "import sys; from phi3v_core.transaction import recover; sys.stdin.readline(); recover(sys.argv[1])"
WRITE = '''
import sys
from pathlib import Path
from phi3v_core.fs import FolderLock, StorageError
sys.stdin.readline()
try:
    lock = FolderLock(Path(sys.argv[1]), "writer").acquire()
except StorageError as exc:
    print(f"refused: {exc}")
    sys.exit(3)
(Path(sys.argv[1]) / "writer.txt").write_text("writer")
lock.release()
'''
root, trials, env = Path(sys.argv[1]), int(sys.argv[2]), dict(os.environ)
results = []
for trial in range(trials):
    run = root / f"run{trial}"
    with guarded_output_dir(run, command="old") as out:
        (out / "old.txt").write_text("old")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the overwrite that is killed while its new run is half-written
        with guarded_output_dir(run, command="killed", overwrite=True) as out:
            (out / "new.txt").write_text("new")
            os.write(ready_w, b"x")
            time.sleep(3600)
        os._exit(0)
    os.read(ready_r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for code in (RECOVER, WRITE)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [proc.communicate(timeout=3600) for proc in procs]
    results.append({
        "codes": [p.returncode for p in procs], "out": [o for o, _ in outs], "err": [e for _, e in outs],
        "files": sorted(p.name for p in run.iterdir()) if run.is_dir() else None,
        "old": (run / "old.txt").read_text() if (run / "old.txt").is_file() else None,
        "hidden": sorted(p.name for p in root.glob(f".{run.name}.*")),
    })
print(json.dumps(results))
"""


def test_recovery_racing_a_writer_leaves_the_old_run_or_the_writers_folder_never_a_mix(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _TRIALS, str(tmp_path), str(TRIALS)], env=repo_env(),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == TRIALS
    for trial, r in enumerate(results):
        said = "".join(r["out"] + r["err"])
        assert "Directory not empty" not in said and "Traceback" not in said, (trial, r)
        assert r["codes"][0] == 0, (trial, r)  # the recovery itself never fails
        assert r["codes"][1] in (0, 3), (trial, r)  # the writer wrote, or was refused in one line
        assert r["hidden"] == [], (trial, r)  # the old run is never left hidden, no journal or copy left over
        assert r["old"] == "old" and "new.txt" not in r["files"], (trial, r)  # the old run, not a mix with the killed
        if r["codes"][1] == 0:
            assert "writer.txt" in r["files"], (trial, r)  # the writer's work is in the folder it locked
        else:
            assert "writer.txt" not in r["files"] and r["out"][1].startswith("refused: "), (trial, r)
            assert "is recovering the interrupted killed" in r["out"][1], (trial, r)  # not "being replaced by" a dead pid

"""Every stop is a clean stop: signals delivered to the real CLIs at chosen moments (found by polling for files)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.safety_helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
LEAN = ["--synthetic", "2", "--use_lora", "--lora_rank", "4", "--num_crops", "1", "--batch_size", "1",
        "--max_steps", "2", "--warmup_steps", "0", "--no-eval", "--no-tqdm"]  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PHI3V_MODEL", "PHI3V_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf-cache"), OMP_NUM_THREADS="1")
    return env


def _start(tmp_path: Path, module: str, *argv: str) -> subprocess.Popen:
    code = f"import sys; from {module} import main; sys.exit(main({list(argv)!r}))"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(check, proc: subprocess.Popen) -> None:
    """Poll until ``check()`` holds (the chosen moment); a hang guard, no timing assumption."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the moment: {proc.communicate()}")
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.02)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


_CLEANUP = """
import sys, time
from pathlib import Path
from phi3v_core.cli.common import handle_errors
root = Path(sys.argv[1])
@handle_errors
def main():
    try:
        (root / "started").write_text("")
        time.sleep(3600)
    finally:
        (root / "cleaning").write_text("")
        while sys.argv[2] == "wait" and not (root / "go-on").exists():
            time.sleep(0.01)
        (root / "cleaned").write_text("")
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_runs_the_cleanup_of_an_exception_and_exits_128_plus_its_number(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", _CLEANUP, str(tmp_path), "no"], env=_env(tmp_path),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait(lambda: (tmp_path / "started").exists(), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + sig, err
    assert (tmp_path / "cleaned").exists()
    assert err == f"error: stopped by {sig.name}; cleaned up, nothing half-written\n"


def test_a_second_signal_during_cleanup_does_not_cut_it_short(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _CLEANUP, str(tmp_path), "wait"], env=_env(tmp_path),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait(lambda: (tmp_path / "started").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _wait(lambda: (tmp_path / "cleaning").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # let the second signal arrive while the cleanup waits (the outcome does not depend on it)
    (tmp_path / "go-on").write_text("")
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143 and (tmp_path / "cleaned").exists(), err


def test_the_bench_uses_the_same_stop_policy():
    from bench import runner
    from phi3v_core.signals import Stopped

    before = signal.getsignal(signal.SIGTERM)
    with runner.terminate_on_signals(), pytest.raises(Stopped) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode; never reached
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def _staging(parent: Path, name: str) -> list[Path]:
    return list(parent.glob(f".{name}.phi3v-new-*"))


@pytest.mark.slow
def test_sigterm_while_convert_writes_leaves_no_folder_and_nothing_hidden(tmp_path):
    out = tmp_path / "twin"
    proc = _start(tmp_path, "phi3v_core.cli.convert", "synthetic", "--task", "docvqa", "--n", "3000",
                  "--out_dir", str(out))  # fmt: skip
    _wait(lambda: any(p.is_dir() for p in _staging(tmp_path, "twin")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    assert not out.exists() and _hidden(tmp_path) == []


@pytest.mark.slow
def test_sigkill_while_convert_overwrites_keeps_the_old_folder_and_the_next_command_cleans_up(tmp_path):
    from phi3v_core.cli.convert import main

    out = tmp_path / "twin"
    assert main(["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    proc = _start(tmp_path, "phi3v_core.cli.convert", "synthetic", "--task", "docvqa", "--n", "3000",
                  "--out_dir", str(out), "--overwrite")  # fmt: skip
    _wait(lambda: any(p.is_dir() for p in _staging(tmp_path, "twin")), proc)
    proc.kill()
    proc.communicate(timeout=HANG_GUARD_S)
    assert sorted(p.name for p in out.iterdir()) == before  # the old folder is still there
    check = subprocess.run(
        [sys.executable, "-m", "phi3v_core.cli.convert", "check", str(out), "--task", "docvqa"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert _staging(tmp_path, "twin"), "a read-only check repairs nothing (issue #27)"
    writer = subprocess.run(
        [sys.executable, "-m", "phi3v_core.cli.convert", "synthetic", "--task", "docvqa", "--n", "2", "--out_dir",
         str(out), "--overwrite"], env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert writer.returncode == 0, writer.stderr
    assert "removed .twin.phi3v-new-" in writer.stderr
    assert [n for n in _hidden(tmp_path) if n != ".twin.phi3v.lock"] == []  # an unlocked lock file refuses nothing


@pytest.mark.slow
def test_two_converts_into_one_new_folder_one_wins_the_other_is_refused(tmp_path):
    out = tmp_path / "twin"
    # Either the loser meets the winner's lock or, once the winner is done, a folder that is not empty: both refuse.
    # A few samples prove it; more only lengthen the winner's write.
    argv = ("synthetic", "--task", "docvqa", "--n", "12", "--out_dir", str(out))
    procs = [_start(tmp_path, "phi3v_core.cli.convert", *argv) for _ in range(2)]
    results = [(p.wait(timeout=HANG_GUARD_S), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "is in use by pid" in loser or "is not empty" in loser, loser
    assert len(list((out / "images").iterdir())) > 0 and _hidden(tmp_path) == []


def test_convert_writes_through_a_symlinked_output_folder(tmp_path):
    from phi3v_core.cli.convert import main

    real = tmp_path / "disk" / "twin"
    assert main(["synthetic", "--task", "docvqa", "--n", "2", "--out_dir", str(real)]) == 0
    link = tmp_path / "twin"
    link.symlink_to(real)
    assert main(["synthetic", "--task", "docvqa", "--n", "3", "--out_dir", str(link), "--overwrite", "--json"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    train = next(real.glob("*_train.jsonl"))
    assert len(train.read_text().splitlines()) == 3


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A complete tiny run (two steps), made once; tests copy it."""
    root = tmp_path_factory.mktemp("old")
    out = root / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "phi3v_core.cli.finetune", *LEAN, "--save_steps", "1", "--output_dir", str(out)],
        env=_env(root), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _overwrite_started(tmp_path: Path, out: Path) -> bool:
    return any(tmp_path.glob(".run.phi3v-replaced-*")) and (out / "train_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_overwrite_keeps_the_finished_run(tmp_path, old_run, sig):
    out = tmp_path / "run"
    shutil.copytree(old_run, out)
    proc = _start(tmp_path, "phi3v_core.cli.finetune", *LEAN, "--max_steps", "50", "--output_dir", str(out),
                  "--overwrite_output_dir")  # fmt: skip
    _wait(lambda: _overwrite_started(tmp_path, out), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "stopped by SIGTERM" in err, err[-3000:]
        assert _hidden(tmp_path) == []  # restored at once
    else:
        assert proc.returncode == -signal.SIGKILL
        # the next command on the folder restores the old run and says so
        again = _start(tmp_path, "phi3v_core.cli.finetune", *LEAN, "--output_dir", str(out), "--resume", "--json")
        stdout, err = again.communicate(timeout=HANG_GUARD_S)
        assert again.returncode == 0, err[-3000:]
        assert "restored the previous content" in err and json.loads(stdout)["status"] == "complete"
        assert [n for n in _hidden(tmp_path) if not n.startswith(".run.phi3v-txn")] == []
    assert json.loads((out / "run_complete.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").read_bytes() == (old_run / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_overwrite_through_a_symlinked_run_folder_keeps_the_link(tmp_path, old_run):
    real = tmp_path / "disk" / "run"
    shutil.copytree(old_run, real)
    link = tmp_path / "run"
    link.symlink_to(real)
    proc = _start(tmp_path, "phi3v_core.cli.finetune", *LEAN, "--max_steps", "1", "--output_dir", str(link),
                  "--overwrite_output_dir")  # fmt: skip
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, err[-3000:]
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads((real / "run_complete.json").read_text())["global_step"] == 1
    assert _hidden(real.parent) == []


def test_stop_policy_is_installed_by_the_cli_entry_for_every_command():
    import inspect

    from phi3v_core.cli import common

    source = inspect.getsource(common.handle_errors)
    assert "stop_on_signals()" in source  # the one mechanism; each CLI main is wrapped by handle_errors
    from bench.cli import main as bench_main
    from phi3v_core.cli.convert import main as convert_main
    from phi3v_core.cli.finetune import main as finetune_main
    from planner.cli import main as plan_main

    for main in (bench_main, convert_main, finetune_main, plan_main):
        assert getattr(main, "__wrapped__", None) is not None, main


@pytest.mark.slow
def test_ctrl_c_while_a_finetune_holds_its_folder_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, "phi3v_core.cli.finetune", *LEAN, "--output_dir", str(out))
    _wait(lambda: (out / ".phi3v.lock").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT" in err and not (out / ".phi3v.lock").exists() and _hidden(tmp_path) == []

"""``pytest -m gpu`` is a short check of a new GPU machine: its tests' estimates on one H100 add up to <= 3 minutes.

Every GPU test states its estimate (``@pytest.mark.gpu(seconds=N)``); ``pytest -m gpu --collect-only`` prints each
one and their total (``tests/conftest.py``). The whole selfcheck (``phi3v-bench selfcheck``, minutes per card) is its
own command, not a GPU test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import GPU_BUDGET_S, REPO_ROOT


def test_gpu_tests_fit_three_minutes_on_one_h100() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(REPO_ROOT / "tests")], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=1800)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = re.search(r"GPU tests: (\d+), estimated total ~(\d+) s on one H100", proc.stdout)
    assert summary, proc.stdout[-2000:]
    listed = re.findall(r"^  ~ *(\d+) s  (\S+)$", proc.stdout, flags=re.MULTILINE)
    assert len(listed) == int(summary.group(1)) >= 10  # each GPU test listed with its estimate
    assert "without an estimate" not in proc.stdout and "(no estimate)" not in proc.stdout
    assert sum(int(s) for s, _ in listed) == int(summary.group(2)) <= GPU_BUDGET_S == 180
    assert not any("selfcheck_json" in nodeid for _, nodeid in listed)  # the whole selfcheck is no GPU test

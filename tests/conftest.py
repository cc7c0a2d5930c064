"""Shared fixtures: seeding, paths to the shared checkpoint folders, auto-skip of GPU tests."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PHI3V_SHARED", REPO_ROOT.parent / "shared"))
CKPT_35 = SHARED / "checkpoints" / "phi-3.5-vision-instruct"
CKPT_V1 = SHARED / "checkpoints" / "phi-3-vision-128k-instruct"

#: pytest-xdist workers running the suite side by side (``-n 2`` in CI); 1 without xdist.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# The cores shared out between the workers, at most 2 each: more threads than cores would only make them wait on each
# other. Subprocesses that tests start (workers, torchrun ranks) get the same share through OMP_NUM_THREADS.
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


#: The GPU tests' budget on one H100 (seconds): ``pytest -m gpu`` is a quick check of a new machine, not the
#: selfcheck (``phi3v-bench selfcheck`` is its own command).
GPU_BUDGET_S = 180.0


def gpu_estimate_s(item: pytest.Item) -> float | None:
    """A GPU test's estimated seconds on one H100: ``@pytest.mark.gpu(seconds=N)`` (None when it states none).

    A test that needs several GPUs (``@pytest.mark.gpu(seconds=N, gpus=2)``) skips on one H100: 0 there.
    """
    marker = item.get_closest_marker("gpu")
    seconds = marker.kwargs.get("seconds") if marker is not None else None
    if seconds is None:
        return None
    return 0.0 if int(marker.kwargs.get("gpus", 1)) > 1 else float(seconds)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if WORKERS > 1:
        # Longest first: the ``slow`` tests start at once, so that no worker is left running one alone at the end.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_report_collectionfinish(config: pytest.Config, start_path: Path, items: list[pytest.Item]) -> list[str]:
    """With ``-m gpu``: each GPU test's estimate on one H100 and their total; otherwise the total in one line."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return []
    estimates = [(item.nodeid, gpu_estimate_s(item)) for item in gpu]
    total = sum(s or 0.0 for _, s in estimates)
    missing = sum(1 for _, s in estimates if s is None)
    lines = []
    if len(gpu) == len(items):  # only GPU tests selected (-m gpu): list them
        lines += [f"  ~{s:4.0f} s  {nodeid}" if s is not None else f"  (no estimate)  {nodeid}"
                  for nodeid, s in estimates]
    lines.append(f"GPU tests: {len(gpu)}, estimated total ~{total:.0f} s on one H100 (budget {GPU_BUDGET_S:.0f} s)"
                 + (f"; {missing} without an estimate (@pytest.mark.gpu(seconds=N))" if missing else ""))
    return lines


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_process_state() -> Iterator[None]:
    """A test that trains in this process must not hand its process group or environment to the tests after it.

    DeepSpeed makes a one-process group and sets the launcher variables (``RANK``, ``MASTER_PORT``, ...) for it, and
    ``TrainingArguments`` sets ``ACCELERATE_USE_DEEPSPEED`` process-wide; subprocesses inherit the environment too.
    """
    saved = dict(os.environ)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    yield
    if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def ckpt35() -> Path:
    if not (CKPT_35 / "config.json").exists():
        pytest.skip("../shared/checkpoints/phi-3.5-vision-instruct is not available")
    return CKPT_35


@pytest.fixture
def ckpt_v1() -> Path:
    if not (CKPT_V1 / "config.json").exists():
        pytest.skip("../shared/checkpoints/phi-3-vision-128k-instruct is not available")
    return CKPT_V1


@pytest.fixture
def finetune_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No torchrun variables, no default model, no debug tracebacks, an empty offline Hub cache.

    The phi3v-finetune tests use it (``pytestmark = pytest.mark.usefixtures("finetune_env")``) so that their results
    do not depend on the machine or the shell they run in.
    """
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PHI3V_MODEL", "PHI3V_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

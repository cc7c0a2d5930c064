"""The process group a torchrun job creates before training carries ``TrainConfig.ddp_timeout``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from phi3v_core.training.api import init_distributed


def test_group_is_created_with_the_run_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real (one-process, gloo) group: the timeout read back from the group is ``ddp_timeout``, not a default."""
    real_init = dist.init_process_group
    calls: list[dict[str, Any]] = []

    def one_process_init(**kwargs: Any) -> None:
        # torchrun's env:// rendezvous would wait for rank 1; a file rendezvous of one keeps the call real.
        calls.append(kwargs)
        real_init(init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1, **kwargs)

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the gate that decides to create a group
    monkeypatch.setattr(dist, "init_process_group", one_process_init)
    assert not dist.is_initialized()
    try:
        assert init_distributed(cuda=False, timeout_s=4321) is True
        assert calls == [{"backend": "gloo", "timeout": timedelta(seconds=4321)}]
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert backend.options._timeout == timedelta(seconds=4321)
        assert init_distributed(cuda=False, timeout_s=1) is False  # an existing group is reused, not re-created
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_single_process_creates_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(cuda=False, timeout_s=60) is False
    assert not dist.is_initialized()



@pytest.mark.gpu(seconds=5)
def test_nccl_group_gets_the_run_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same on NCCL, whose own default (10 minutes) is what used to replace ``ddp_timeout``.

    A one-rank NCCL group on GPU 0: no model, no memory to speak of - passes on an H100, an A100 and a V100 alike.
    """
    real_init = dist.init_process_group

    def one_process_init(**kwargs: Any) -> None:
        real_init(init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1, **kwargs)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", one_process_init)
    try:
        assert init_distributed(cuda=True, timeout_s=4321) is True
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cuda"))
        assert backend.options._timeout == timedelta(seconds=4321)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

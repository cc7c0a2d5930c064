"""Fixtures of the bench tests."""

from __future__ import annotations

import pytest

import bench.fit

#: The real reader (psutil), for the tests that check it with a monkeypatched psutil.
REAL_HOST_AVAILABLE = bench.fit.host_available_bytes


@pytest.fixture(autouse=True)
def _plenty_of_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of other behaviour must not depend on this machine's free RAM: the fit check (bench/fit.py) sees 1 TiB
    unless a test sets its own number (tests/bench/test_fit.py does)."""
    monkeypatch.setattr(bench.fit, "host_available_bytes", lambda: float(1 << 40))

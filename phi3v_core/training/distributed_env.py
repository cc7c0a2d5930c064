"""The distributed launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
checked as one set before anything is built.

torchrun (and the bench's launcher) set all five; a process that finds only some of them, or a value that is not a
number, was not started by a launcher and would train as a wrong rank with no lock or manifest. Each problem names the
variable and the fix.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

__all__ = ["LAUNCHER_VARS", "distributed_env_problems", "env_int"]

#: What a launcher sets for every process of a job.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_INTEGER_VARS = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 1, "MASTER_PORT": 1}  # name -> smallest valid value


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """``int(environ[name])``, or ``default`` when it is unset or not an integer (reported by the check below)."""
    value = (os.environ if environ is None else environ).get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _group_exists() -> bool:
    """Whether this process already runs a process group (then MASTER_PORT is held by it, not by another job).

    Read without importing torch: if ``torch.distributed`` was never imported, no group exists.
    """
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def distributed_env_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem with the launcher variables of this process (empty when none is set, or all are consistent).

    Args:
        environ: The environment (default: ``os.environ``).
    """
    env = os.environ if environ is None else environ
    present = [name for name in LAUNCHER_VARS if name in env]
    if not present:
        return []
    problems = []
    for name, smallest in _INTEGER_VARS.items():
        value = env.get(name)
        if value is None:
            continue
        if not value.strip().isdigit() or int(value) < smallest or (name == "MASTER_PORT" and int(value) > 65535):
            limit = "1..65535" if name == "MASTER_PORT" else f"an integer >= {smallest}"
            problems.append(f"environment variable {name}={value!r} is not {limit}; unset it or fix it")
    missing = [name for name in LAUNCHER_VARS if name not in env]
    if missing and any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        shown = " ".join(f"{n}={env[n]}" for n in present)
        problems.append(
            f"{shown} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: this process was not "
            "started by a distributed launcher; start multi-process runs with torchrun (phi3v-bench run --gpus N), "
            f"or unset {' '.join(present)} for a single process"
        )
    if problems:
        return problems
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if "RANK" in env and rank >= world:
        problems.append(f"RANK={rank} is not below WORLD_SIZE={world}; fix the launcher settings")
    # Under torchrun the agent itself holds MASTER_PORT (TORCHELASTIC_RUN_ID is set); a hand-made rank-0 environment
    # must find it free, or the process group fails with a bare "address already in use".
    if "MASTER_PORT" in env and rank == 0 and "TORCHELASTIC_RUN_ID" not in env and not _group_exists():
        host = env.get("MASTER_ADDR", "127.0.0.1")
        if host in ("127.0.0.1", "localhost", "0.0.0.0", socket.gethostname()) and _port_busy(host, int(env["MASTER_PORT"])):
            problems.append(
                f"MASTER_PORT={env['MASTER_PORT']} is already in use on {host} (another job?); pick a free port "
                "or unset MASTER_PORT"
            )
    return problems

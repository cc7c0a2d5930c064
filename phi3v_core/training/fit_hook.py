"""The memory check ``phi3v-finetune`` runs before building a model, found as a plugin.

``phi3v_core`` may not import the planner (tests/test_architecture.py), yet the planner holds the memory model. The
planner therefore registers its check under the ``phi3v_bench.fit_check`` entry-point group (pyproject.toml:
``planner.fit_check:finetune_fit_problem``) and this module calls every function in the group: the core depends on
the call's shape only. An installation without the entry point (an editable install from before it existed: rerun
``pip install -e .``) checks nothing, as before.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import Any

__all__ = ["GROUP", "fit_problems"]

#: The entry-point group a memory check registers under.
GROUP = "phi3v_bench.fit_check"


def fit_problems(train: Any, task: str, data_dir: str | None, world: int, local: int, cuda: bool) -> list[str]:
    """Every registered check's refusal of this run (empty: it fits, or no check is installed).

    Args:
        train: The run's TrainConfig.
        task: Task name.
        data_dir: The data folder, if any.
        world: Processes of the run; ``local``: those on this node.
        cuda: It trains on GPUs.
    """
    problems = []
    for entry in entry_points(group=GROUP):
        try:
            problem = entry.load()(train, task, data_dir, world, local, cuda)
        except Exception as exc:  # noqa: BLE001 - a check that cannot predict must not stop a run it would allow
            print(f"note: memory check {entry.value} skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        if problem:
            problems.append(problem)
    return problems

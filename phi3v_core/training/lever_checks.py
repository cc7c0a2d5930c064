"""The checks of the per-tower and kernel levers (:mod:`phi3v_core.training.levers`), torch-free so a command can
ask them before the training stack is imported. Called by :meth:`TrainConfig.problems
<phi3v_core.training.config.TrainConfig.problems>`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from phi3v_core.kernels import KERNEL_NAMES
from phi3v_core.methods import METHODS, get_method

# ``TrainConfig`` and ``Machine`` (phi3v_core.training.config, which calls this module), typed loosely to keep
# imports one-way.
TrainConfig = Any
Machine = Any

__all__ = ["lever_problems"]


def lever_problems(cfg: TrainConfig, env: Machine) -> list[str]:
    """Every problem with the kernel, compile and per-tower settings (field names as in :class:`TrainConfig`)."""
    out = []
    if cfg.kernels not in KERNEL_NAMES:
        out.append(f"kernels {cfg.kernels!r} is unknown; choose one of {', '.join(KERNEL_NAMES)}")
    elif cfg.kernels == "liger":
        if not env.probed:
            pass  # whether Triton has a GPU here is asked with the probed machine
        elif not env.cuda:
            out.append("kernels liger needs a CUDA GPU (Liger's kernels are Triton, which runs on GPUs only); "
                       "use kernels none on this machine")
        elif importlib.util.find_spec("liger_kernel") is None:
            out.append("kernels liger needs the liger-kernel package (pip install 'phi3v-bench[liger]')")
    if cfg.checkpoint_towers not in ("both", "llm", "vision"):
        out.append(f"checkpoint_towers {cfg.checkpoint_towers!r} is unknown; choose one of both, llm, vision")
    for name in ("vision_lr", "projector_lr"):
        value = getattr(cfg, name)
        if value is not None and not 0 < value < 1:
            out.append(f"{name} must be in (0, 1) (got {value})")
    if cfg.method not in METHODS:
        return out  # reported by the choice checks
    trained = get_method(cfg.method).trained_towers(cfg.freeze_vision, cfg.freeze_llm)
    if not trained:
        out.append(f"freeze_llm with method {cfg.method!r} trains nothing (the image path is frozen too); "
                   "use method full or lora with freeze_llm")
    for name, tower in (("vision_lr", "vision"), ("projector_lr", "projector")):
        if getattr(cfg, name) is not None and tower not in trained:
            out.append(f"{name} is set but method {cfg.method!r} does not train the {tower} tower here; drop it")
    return out

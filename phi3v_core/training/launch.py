"""Process entry point for (multi-process, multi-node) training: one JSON file describes the run.

Run it directly, or under torchrun on one or many nodes::

    python -m phi3v_core.training.launch --config run.json
    torchrun --nproc_per_node=2 -m phi3v_core.training.launch --config run.json
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 --master_addr=10.0.0.1 --master_port=29500 \\
        -m phi3v_core.training.launch --config run.json

``run.json``::

    {
      "train": {"model": "tiny", "method": "lora", "max_steps": 10, "global_batch": 4, "output_dir": "runs/x"},
      "data": {"factory": "phi3v_core.training.synthetic:synthetic_dataset", "kwargs": {"num_examples": 64}},
      "eval_data": null
    }

``train`` holds :class:`~phi3v_core.training.TrainConfig` fields. ``data``/``eval_data`` name a factory
``"module:function"`` returning a map-style dataset of encoded examples, with keyword arguments; ``data`` defaults to
the synthetic dataset (64 examples at ``train.num_crops``). The main process writes ``train_result.json`` next to
the model.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from transformers import TrainerCallback

from phi3v_core.entrypoint import CliParser, handle_errors
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.training.api import TrainResult, train, write_json_atomic
from phi3v_core.training.config import TrainConfig
from phi3v_core.training.run import guarded_output_dir

__all__ = ["DataSpec", "LaunchSpec", "load_spec", "main", "run"]

_SYNTHETIC = "phi3v_core.training.synthetic:synthetic_dataset"


@dataclass
class DataSpec:
    """A dataset factory and its keyword arguments.

    Attributes:
        factory: ``"package.module:function"`` returning a map-style ``Dataset`` of encoded examples.
        kwargs: Keyword arguments for the factory.
    """

    factory: str = _SYNTHETIC
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Dataset:
        """Import the factory and call it.

        Raises:
            ConfigError: The factory cannot be imported or is not callable.
        """
        module_name, _, attr = self.factory.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"data factory {self.factory!r} must look like 'package.module:function'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"data factory {self.factory!r} cannot be imported ({exc}); check the module path"
            ) from exc
        if not callable(factory):
            raise ConfigError(f"data factory {self.factory!r} is not callable")
        return factory(**self.kwargs)


@dataclass
class LaunchSpec:
    """A parsed ``run.json``."""

    train: TrainConfig
    data: DataSpec
    eval_data: DataSpec | None = None


def _data_spec(raw: Any, where: str, problems: list[str]) -> DataSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"factory", "kwargs"}:
        problems.append(f"{where} must be an object with 'factory' and optional 'kwargs'")
        return None
    kwargs = raw.get("kwargs", {})
    if not isinstance(kwargs, dict):
        problems.append(f"{where}.kwargs must be an object")
        return None
    return DataSpec(factory=str(raw.get("factory", _SYNTHETIC)), kwargs=kwargs)


def load_spec(path: str | Path) -> LaunchSpec:
    """Read and check a ``run.json`` (every problem at once).

    Raises:
        ConfigError: Unreadable JSON, unknown sections or fields.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict) or "train" not in raw:
        raise ConfigError(f"{path}: expected an object with a 'train' section (TrainConfig fields)")
    problems = [
        f"{path}: unknown section {key!r} (use train, data, eval_data)"
        for key in raw
        if key not in ("train", "data", "eval_data")
    ]
    cfg = None
    if not isinstance(raw["train"], dict):
        problems.append(f"{path}: 'train' must be an object of TrainConfig fields")
    else:
        try:
            cfg = TrainConfig.from_dict(raw["train"], where=f"{path}: train")
        except ConfigError as exc:
            problems.append(str(exc))
    data = _data_spec(raw.get("data"), "data", problems)
    eval_data = _data_spec(raw.get("eval_data"), "eval_data", problems)
    raise_all(problems)
    assert cfg is not None  # raise_all returned: no problem, so the train section parsed
    if data is None:
        data = DataSpec(kwargs={"num_examples": 64, "num_crops": cfg.num_crops, "seed": cfg.seed})
    return LaunchSpec(train=cfg, data=data, eval_data=eval_data)


def run(spec: LaunchSpec | str | Path, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Validate, build the datasets, train, and write ``train_result.json`` (main process).

    Args:
        spec: A :class:`LaunchSpec` or the path of a ``run.json``.
        callbacks: Extra Trainer callbacks.
    """
    if not isinstance(spec, LaunchSpec):
        spec = load_spec(spec)
    spec.train.validate()  # before building data: config problems come first and cost nothing
    spec.train.extra.setdefault("data", {"factory": spec.data.factory, "kwargs": spec.data.kwargs})
    # One writer per output folder (the lock names the holder; a killed run's stale lock is taken over).
    with guarded_output_dir(spec.train.output_dir, command="phi3v_core.training.launch", resume=spec.train.resume):
        result = train(
            spec.train,
            train_dataset=spec.data.build(),
            eval_dataset=spec.eval_data.build() if spec.eval_data else None,
            callbacks=callbacks,
        )
        if _is_main_process():
            write_json_atomic(result.output_dir / "train_result.json", result.to_dict())
    return result


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@handle_errors
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m phi3v_core.training.launch --config run.json [--json]``."""
    parser = CliParser(
        prog="python -m phi3v_core.training.launch",
        description="Train Phi-3(.5)-vision from one JSON run file (works under torchrun, single- or multi-node).",
        epilog=(
            "examples:\n"
            "  python -m phi3v_core.training.launch --config run.json\n"
            "  torchrun --nproc_per_node=2 -m phi3v_core.training.launch --config run.json --json\n"
            "  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\\n"
            "      -m phi3v_core.training.launch --config run.json"
        ),
    )
    parser.add_argument("--config", required=True, help="run.json with 'train' (TrainConfig) and optional 'data'")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (main process)")
    args = parser.parse_args(argv)
    result = run(args.config)
    if _is_main_process():
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            last = result.losses.get(result.global_step)
            print(
                f"trained {result.report.method} for {result.global_step} steps on {result.world_size} process(es); "
                f"final loss {last if last is not None else float('nan'):.4f}; saved to {result.saved_to or result.output_dir}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

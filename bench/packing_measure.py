"""Packed vs padded on a mixed-length workload, through the real training path (``python -m bench.packing_measure``).

The synthetic workload interleaves the recipe's task shapes (by default a DocVQA page, a Hateful Memes meme and an
NLVR2 photo pair; ``--tasks`` picks others), so a padded micro-batch pads everything to its longest sample; both modes
train the same examples in the same order with the same seed (the Trainer's seeded sampler shuffles them: the stored
``sample_tokens`` list them in the order trained, so consecutive ``micro_batch`` groups are the micro-batches).
Padded and packed runs alternate (``--repeats`` pairs: padded-packed, packed-padded, ...; after one untimed run of
each, ``--prime``) so that a drift of this host's load, or a slow first run, hits both alike. Per mode it reports the median
step time over every timed step of its runs, the padding fraction (computed tokens that are padding), real tokens/s
and the per-step losses (packing must leave them unchanged), then the speed-up in real tokens/s.

``--model_config`` is a preset name or a config JSON (a ``config.json`` of the Phi3V shape): a file is built once,
randomly initialised from ``--seed``, and both modes train that same model. The tiny preset's step is mostly its CLIP
tower, which packing does not shrink; ``bench/configs/packing-decoder-heavy.json`` (hidden 512, 4 layers; CLIP width
128, 2 live layers) has about the real model's ratio of decoder to CLIP FLOPs per image crop (2.7 vs Phi-3.5-vision's
2.5, LoRA, forward and backward, :mod:`phi3v_core.flops`), so its step is mostly decoder work as the real one's is. ``--output PATH`` (or ``--save``, to
``results/validation/packing-<machine>-<date>.json``) stores the result with its command, commit, date and machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from phi3v_core.constants import load_recipe
from phi3v_core.errors import ConfigError
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training import StepTimer, TrainConfig, train
from phi3v_core.training.synthetic import SyntheticDataset

__all__ = [
    "MIXED_TASKS", "RunSummary", "build_parser", "default_output", "measure", "mixed_dataset", "model_source",
    "run_pairs", "save_result",
]

#: The tasks whose shapes the default workload interleaves (one example of each in turn).
MIXED_TASKS = ("docvqa", "hateful_memes", "nlvr2")

#: The folder stored results go to (``--save``).
VALIDATION_DIR = Path("results/validation")


class _Interleaved(Dataset):
    """Example ``i`` is example ``i // k`` of part ``i % k``: every micro-batch mixes the parts' lengths."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts = parts
        self.length = min(len(p) for p in parts) * len(parts)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.parts[index % len(self.parts)][index // len(self.parts)]


class _Recorded(Dataset):
    """Record every index read, in order: with no loader workers the training's reads are the last ones, in the
    order the Trainer's (seeded, shuffling) sampler feeds them."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.reads.append(index)
        return self.base[index]


def mixed_dataset(num_examples: int, num_crops: int, seed: int = 0, tasks: tuple[str, ...] = MIXED_TASKS) -> Dataset:
    """``num_examples`` examples cycling through ``tasks``' image shapes, each with a short answer."""
    processor = Phi3VProcessor.tiny(num_crops=num_crops)
    profiles = load_recipe().profiles
    per_part = -(-num_examples // len(tasks))
    parts = [
        SyntheticDataset(
            num_examples=per_part, processor=processor, image_size=(p.image_width, p.image_height),
            images_per_example=p.images_per_sample, prompt_words=12, answer_words=4, seed=seed + k,
            distinct_examples=4,
        )
        for k, p in enumerate(profiles[name] for name in tasks)
    ]
    return ConcatDataset([_Interleaved(parts)])


def model_source(model_config: str, folder: Path, seed: int) -> str:
    """What ``TrainConfig.model`` gets for ``model_config``: a preset's name as is, or the folder into which the
    config file's randomly initialised model (seeded) was saved."""
    from phi3v_core.config import MODEL_PRESETS, get_config

    if model_config in MODEL_PRESETS:
        return model_config
    config = get_config(model_config)  # ConfigError: neither a preset nor a readable config
    import torch

    from phi3v_core.model import Phi3VForCausalLM

    torch.manual_seed(seed)
    Phi3VForCausalLM(config).save_pretrained(folder)
    return str(folder)


@dataclass
class RunSummary:
    """One training run: its timed steps' seconds, real and computed tokens, every step's loss, and the dataset
    indices it trained, in order (consecutive ``global_batch`` groups are its steps)."""

    step_seconds: list[float]
    real_tokens: list[int]
    computed_tokens: list[int]
    losses: list[float]
    order: list[int]


def measure(packing: bool, args: argparse.Namespace, model: str, dataset: Dataset) -> RunSummary:
    """Train ``args.warmup + args.steps`` steps of ``model`` on ``dataset``; the timed steps' records."""
    timer = StepTimer()
    recorded = _Recorded(dataset)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=model, method=args.method, precision="fp32", attn=args.attn, num_crops=args.num_crops,
            micro_batch=args.micro_batch, global_batch=args.global_batch, max_steps=args.steps + args.warmup,
            warmup_steps=0, learning_rate=1e-4, output_dir=out, save_final=False, save_steps=0, seed=args.seed,
            logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
            packing=packing, pack_tokens=args.pack_tokens,
        )
        train(cfg, ConcatDataset([recorded]), callbacks=[timer])
    timed = timer.records[args.warmup :]
    trained = args.global_batch * (args.steps + args.warmup)
    return RunSummary(
        step_seconds=[r.seconds for r in timed], real_tokens=[int(r.tokens) for r in timed],
        computed_tokens=[int(r.computed_tokens) for r in timed], losses=[float(r.loss) for r in timer.records],
        order=recorded.reads[-trained:],
    )


def summarise(runs: list[RunSummary]) -> dict[str, Any]:
    """One mode's figures over its runs: the median of every timed step, padding fraction, real tokens/s, and the
    first run's per-step losses (every run trains the same steps)."""
    seconds = [s for run in runs for s in run.step_seconds]
    real = sum(sum(run.real_tokens) for run in runs)
    computed = sum(sum(run.computed_tokens) for run in runs)
    median = statistics.median(seconds)
    return {
        "step_s_median": median,
        "padding_fraction": 1 - real / computed,
        "real_tokens_per_s": real / len(seconds) / median,
        "losses": runs[0].losses,
    }


def _workload(args: argparse.Namespace, dataset: Dataset, order: list[int]) -> dict[str, Any]:
    """The stored workload; ``sample_tokens`` and ``images_per_sample`` in the order the runs trained the samples
    (consecutive ``micro_batch`` groups are the micro-batches), which is not the dataset's: the Trainer shuffles."""
    profiles = load_recipe().profiles
    return {
        "model_config": args.model_config, "method": args.method, "attention": args.attn, "precision": "fp32",
        "num_crops": args.num_crops, "micro_batch": args.micro_batch, "pack_tokens": args.pack_tokens,
        "tasks": list(args.tasks),
        "sample_tokens": [int(len(dataset[i]["input_ids"])) for i in order],
        "images_per_sample": [profiles[args.tasks[i % len(args.tasks)]].images_per_sample for i in order],
    }


def run_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate padded and packed runs ``args.repeats`` times; the stored ``result`` (workload, both modes,
    speed-up in real tokens/s).

    With ``args.prime`` one untimed run of each mode comes first: on the loaded 2-core host the first run of a
    process was up to 3x slower than later ones despite its warm-up step, which would charge whichever mode runs
    first. The pairs then alternate which mode leads (padded-packed, packed-padded, ...), so a drift of the host's
    load over the runs hits both modes alike.
    """
    dataset = mixed_dataset(args.global_batch * (args.steps + args.warmup), args.num_crops, args.seed, args.tasks)
    runs: dict[bool, list[RunSummary]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        model = model_source(args.model_config, Path(folder), args.seed)
        if args.prime:
            primer = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})
            for packing in (False, True):
                measure(packing, primer, model, dataset)
        for pair in range(args.repeats):
            for packing in (False, True) if pair % 2 == 0 else (True, False):
                runs[packing].append(measure(packing, args, model, dataset))
    order = runs[False][0].order
    tokens = [int(len(dataset[i]["input_ids"])) for i in order]
    timed = tokens[args.global_batch * args.warmup :]
    per_step = [sum(timed[k : k + args.global_batch]) for k in range(0, len(timed), args.global_batch)]
    for run in runs[False] + runs[True]:  # the same samples in the same steps, as the stored order says
        if run.order != order or run.real_tokens != per_step:
            raise RuntimeError("the padded and packed runs trained different samples; the comparison is void")
    padded, packed = summarise(runs[False]), summarise(runs[True])
    return {
        "workload": _workload(args, dataset, order), "padded": padded, "packed": packed,
        "speed_up": packed["real_tokens_per_s"] / padded["real_tokens_per_s"],
    }


def default_output(tasks: tuple[str, ...]) -> Path:
    """``results/validation/packing[-<tasks>]-<machine>-<yyyymmdd>.json`` (the tasks only when not the default mix)."""
    from phi3v_core.environment import capture_environment, utc_now

    label = "" if tuple(tasks) == MIXED_TASKS else "-" + "-".join(tasks).replace("_", "-")
    date = utc_now()[:10].replace("-", "")
    return VALIDATION_DIR / f"packing{label}-{capture_environment().hardware}-{date}.json"


def save_result(result: dict[str, Any], path: Path, command: str, env: Any) -> Path:
    """Write ``result`` with its provenance in :func:`planner.validate.save_validation`'s shape (``command, date,
    machine, git_sha, git_dirty, environment, result``), the environment ``env`` captured when the run began."""
    from dataclasses import asdict

    from phi3v_core.environment import utc_now
    from phi3v_core.io import atomic_write_json

    record = {"command": command, "date": utc_now(), "machine": env.hardware, "git_sha": env.git_sha,
              "git_dirty": env.git_dirty, "environment": asdict(env), "result": result}
    return atomic_write_json(path, record)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.packing_measure``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", "--model-config", default="tiny",
                        help="a model preset name or a config JSON file (default: tiny)")
    parser.add_argument("--tasks", default=",".join(MIXED_TASKS),
                        help=f"comma-separated recipe tasks to interleave (default {','.join(MIXED_TASKS)})")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--num_crops", "--num-crops", dest="num_crops", type=int, default=4)
    parser.add_argument("--micro_batch", "--micro-batch", dest="micro_batch", type=int, default=6)
    parser.add_argument("--global_batch", "--global-batch", dest="global_batch", type=int, default=6)
    parser.add_argument("--pack_tokens", "--pack-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="padded/packed pairs, run alternately (default 1)")
    parser.add_argument("--prime", action=argparse.BooleanOptionalAction, default=True,
                        help="first one untimed run of each mode (default on; --no-prime for a quick check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the result with its provenance to this JSON file")
    parser.add_argument("--save", action="store_true",
                        help="write it to results/validation/packing[-<tasks>]-<machine>-<date>.json")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with ``args`` as a one-line message (None: fine), before anything heavy runs."""
    from phi3v_core.config import MODEL_PRESETS

    profiles = load_recipe().profiles
    unknown = [t for t in args.tasks if t not in profiles]
    if unknown or not args.tasks:
        return f"--tasks {','.join(args.tasks)}: unknown task(s) {unknown}; choose from {', '.join(profiles)}"
    if args.model_config not in MODEL_PRESETS and not Path(args.model_config).is_file():
        return (f"--model_config {args.model_config}: neither a preset ({', '.join(MODEL_PRESETS)}) nor a config "
                "JSON file; pass a preset name or the path of a config.json")
    for name in ("steps", "repeats", "micro_batch", "global_batch", "num_crops"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1 (got {getattr(args, name)})"
    if args.warmup < 0:
        return f"--warmup must be 0 or more (got {args.warmup})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run padded and packed alternately; print both and the speed-up (JSON with ``--json``), store with
    ``--output``/``--save``."""
    import json

    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from phi3v_core.environment import capture_environment
    from phi3v_core.software import quiet_known_notices

    quiet_known_notices()

    env = capture_environment()  # the code and machine as the run starts (edits during a long run do not count)
    try:
        result = run_pairs(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output or args.save:
        threads = os.environ.get("OMP_NUM_THREADS")
        command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python -m bench.packing_measure " + shlex.join(raw)
        path = save_result(result, Path(args.output) if args.output else default_output(args.tasks), command, env)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    for mode in ("padded", "packed"):
        run = result[mode]
        print(f"{mode}: step {run['step_s_median']:.3f} s (median), padding {run['padding_fraction']:.1%}, "
              f"{run['real_tokens_per_s']:.0f} real tokens/s")
        print("  losses per step: " + ", ".join(f"{v:.6f}" for v in run["losses"]))
    print(f"speed-up packed/padded (real tokens/s): {result['speed_up']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

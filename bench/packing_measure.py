"""Packed vs padded on a mixed-length workload, through the real training path (``python -m bench.packing_measure``).

The synthetic workload interleaves the recipe's task shapes (a DocVQA page, a Hateful Memes meme, an NLVR2 photo
pair), so a padded micro-batch pads everything to its page; both runs train the same examples in the same order with
the same seed. Prints per run the median step time, the padding fraction (computed tokens that are padding), real
tokens/s and the per-step losses (packing must leave them unchanged), then the speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from phi3v_core.constants import load_recipe
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training import StepTimer, TrainConfig, train
from phi3v_core.training.synthetic import SyntheticDataset

__all__ = ["MIXED_TASKS", "mixed_dataset", "measure"]

#: The tasks whose shapes the mixed workload interleaves (one example of each in turn).
MIXED_TASKS = ("docvqa", "hateful_memes", "nlvr2")


class _Interleaved(Dataset):
    """Example ``i`` is example ``i // k`` of part ``i % k``: every micro-batch mixes the parts' lengths."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts = parts
        self.length = min(len(p) for p in parts) * len(parts)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.parts[index % len(self.parts)][index // len(self.parts)]


def mixed_dataset(num_examples: int, num_crops: int, seed: int = 0) -> Dataset:
    """``num_examples`` examples cycling through :data:`MIXED_TASKS`' image shapes, each with a short answer."""
    processor = Phi3VProcessor.tiny(num_crops=num_crops)
    profiles = load_recipe().profiles
    per_part = -(-num_examples // len(MIXED_TASKS))
    parts = [
        SyntheticDataset(
            num_examples=per_part, processor=processor, image_size=(p.image_width, p.image_height),
            images_per_example=p.images_per_sample, prompt_words=12, answer_words=4, seed=seed + k,
            distinct_examples=4,
        )
        for k, p in enumerate(profiles[name] for name in MIXED_TASKS)
    ]
    return ConcatDataset([_Interleaved(parts)])


def measure(packing: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.warmup + args.steps`` steps and summarise the timed ones."""
    dataset = mixed_dataset(args.global_batch * (args.steps + args.warmup), args.num_crops, args.seed)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model="tiny", method=args.method, precision="fp32", attn=args.attn, num_crops=args.num_crops,
            micro_batch=args.micro_batch, global_batch=args.global_batch, max_steps=args.steps + args.warmup,
            warmup_steps=0, learning_rate=1e-4, output_dir=out, save_final=False, save_steps=0, seed=args.seed,
            logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
            packing=packing, pack_tokens=args.pack_tokens,
        )
        train(cfg, dataset, callbacks=[timer])
    timed = timer.records[args.warmup :]
    median = statistics.median(r.seconds for r in timed)
    real = sum(r.tokens for r in timed) / len(timed)
    computed = sum(r.computed_tokens for r in timed) / len(timed)
    return {
        "packing": packing, "step_time_median_s": median, "padding_fraction": 1 - real / computed,
        "real_tokens_per_s": real / median, "computed_tokens_per_step": computed, "real_tokens_per_step": real,
        "losses": [r.loss for r in timer.records],
    }


def main(argv: list[str] | None = None) -> int:
    """Run padded then packed; print both and the speed-up (JSON with ``--json``). The flags are spelled as
    ``phi3v-bench run``'s."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--num-crops", dest="num_crops", type=int, default=4)
    parser.add_argument("--micro-batch", dest="micro_batch", type=int, default=6)
    parser.add_argument("--global-batch", dest="global_batch", type=int, default=6)
    parser.add_argument("--pack_tokens", "--pack-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runs = [measure(False, args), measure(True, args)]
    speedup = runs[0]["step_time_median_s"] / runs[1]["step_time_median_s"]
    if args.json:
        print(json.dumps({"runs": runs, "speedup": speedup}))
        return 0
    for run in runs:
        print(
            f"{'packed' if run['packing'] else 'padded'}: step {run['step_time_median_s']:.3f} s (median), padding "
            f"{run['padding_fraction']:.1%}, {run['real_tokens_per_s']:.0f} real tokens/s, "
            f"{run['computed_tokens_per_step']:.0f} computed / {run['real_tokens_per_step']:.0f} real tokens per step"
        )
        print("  losses per step: " + ", ".join(f"{v:.6f}" for v in run["losses"]))
    print(f"speed-up packed/padded: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

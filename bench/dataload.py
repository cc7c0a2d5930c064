"""The CPU side of a benchmark: how long each timed step waited for its batch, and how fast the processor encodes.

* **Data-loader wait.** :class:`phi3v_core.training.trainer.Phi3VTrainer` times its prefetch of each optimizer step's
  micro-batches (``StepRecord.data_wait_seconds``); the worker stores them per timed step (``data_wait_s``). The
  Trainer fetches a step's batches *after* the previous step's closing device synchronisation, so this is time the
  GPU sat idle waiting for the host. :func:`data_wait_note` reads it back as a share of the step.
* **Processor rate.** :func:`measure_processor_rate` encodes fresh examples of the workload (image rendering, HD
  transform, tokenization) and collates them on *one* thread, as one DataLoader worker does: samples per second per
  CPU core. ``phi3v-plan`` turns a rate like this into the cores per GPU the data loader needs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DATA_WAIT_WARN_SHARE", "data_wait_note", "data_wait_share", "measure_processor_rate"]

#: Above this share of the step spent waiting for data, ``phi3v-bench run`` says the GPU starved.
DATA_WAIT_WARN_SHARE = 0.05


def measure_processor_rate(
    encode: Callable[[int], dict[str, Any]], collate: Callable[[list[dict[str, Any]]], Any], samples: int = 2
) -> float:
    """Samples per second one CPU thread encodes and collates (what one DataLoader worker delivers).

    Args:
        encode: Encodes example ``i`` afresh (no cache), e.g. ``SyntheticDataset.encode``.
        collate: The training collator.
        samples: Examples to encode (at least 1).

    Returns:
        Samples per second on one thread.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run one thread each
    try:
        began = time.perf_counter()
        collate([encode(index) for index in range(max(1, samples))])
        return max(1, samples) / (time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)


def data_wait_share(step_times_s: Sequence[float], data_wait_s: Sequence[float]) -> float | None:
    """Median share of a step's wall time spent waiting for its batch (``None`` when no wait was recorded).

    A step's wall time is its compute (``step_times_s``) plus its wait.
    """
    if not data_wait_s or len(data_wait_s) != len(step_times_s):
        return None
    return statistics.median(wait / (wait + step) for step, wait in zip(step_times_s, data_wait_s) if wait + step > 0)


def data_wait_note(repeats: Sequence[Any], processor_samples_per_s: float | None, samples_per_step: int | None) -> str | None:
    """One line on the data loader of a run: the wait's share of the step, a warning above 5 %, the processor rate.

    Args:
        repeats: The result's :class:`bench.results.RepeatSample` list.
        processor_samples_per_s: Measured processor rate (one thread), or ``None``.
        samples_per_step: Samples per optimizer step over all ranks, or ``None``.
    """
    shares = [s for r in repeats if (s := data_wait_share(r.step_times_s, r.data_wait_s)) is not None]
    if not shares:
        return None
    share = statistics.median(shares)
    rate = f"; processor {processor_samples_per_s:.2f} samples/s per core" if processor_samples_per_s else ""
    if share <= DATA_WAIT_WARN_SHARE:
        return f"data loader: the device waited {share:.1%} of each step for its batch (median){rate}"
    steps = [t for r in repeats for t in r.step_times_s]
    need = ""
    if processor_samples_per_s and samples_per_step and steps:
        cores = samples_per_step / statistics.median(steps) / processor_samples_per_s
        need = f"; keeping up needs about {cores:.1f} cores of processing at this step time"
    return (
        f"[yellow]data loader starves the device[/]: it waited {share:.1%} of each step for its batch (median, over "
        f"{DATA_WAIT_WARN_SHARE:.0%}){rate}{need}; in training, raise phi3v-finetune's --dataloader_num_workers or pre-process the images"
    )


#: ``num_crops`` values the stored rate table covers (the planner takes the nearest).
RATE_CROPS = (1, 4, 9, 16)


def measure_rate_table(model: str | None, samples: int = 3, crops: Sequence[int] = RATE_CROPS) -> dict[str, Any]:
    """Processor samples/s per core for every task profile and ``num_crops`` (``planner/data/processor_rate.json``).

    Args:
        model: Checkpoint folder whose tokenizer to use (None: the tiny test tokenizer).
        samples: Fresh examples encoded per cell.
        crops: ``num_crops`` values to measure.

    Returns:
        The table, with the CPU, versions and the command that produced it.
    """
    import platform

    import torch

    from phi3v_core.constants import load_recipe
    from phi3v_core.environment import capture_environment
    from phi3v_core.processing import PAD_TOKEN_ID, Phi3VDataCollator, Phi3VProcessor
    from phi3v_core.training.synthetic import SyntheticDataset

    collate = Phi3VDataCollator(pad_token_id=PAD_TOKEN_ID)
    rates: dict[str, dict[str, float]] = {}
    for name, profile in load_recipe().profiles.items():
        rates[name] = {}
        for num_crops in crops:
            processor = Phi3VProcessor.from_pretrained(model, num_crops=num_crops) if model else Phi3VProcessor.tiny(num_crops)
            dataset = SyntheticDataset(
                num_examples=samples, processor=processor, image_size=(profile.image_width, profile.image_height),
                images_per_example=profile.images_per_sample, prompt_words=profile.text_tokens // 2,
                answer_words=max(1, profile.answer_tokens // 2), seed=0,
            )  # fmt: skip
            rates[name][str(num_crops)] = round(measure_processor_rate(dataset.encode, collate, samples), 3)
    return {
        "_about": "Samples per second that ONE CPU core encodes (synthetic in-memory images of the task's profile "
        "size, no JPEG decoding: HD transform, tokenizer, collator) at each num_crops; the planner divides a GPU's "
        "predicted samples/s by it for the data-loader cores per GPU. Regenerate: python -m bench.dataload "
        "--model CHECKPOINT --out planner/data/processor_rate.json",
        "cpu": capture_environment().cpu,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "tokenizer": "checkpoint" if model else "tiny",
        "images_per_sample": {name: profile.images_per_sample for name, profile in load_recipe().profiles.items()},
        "samples_per_s_per_core": rates,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.dataload``: measure the processor rate table and write it as JSON."""
    import argparse
    import json
    from pathlib import Path

    from phi3v_core.io import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m bench.dataload", description=main.__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder for the real tokenizer (default: tiny)")
    parser.add_argument("--out", default=None, help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    table = measure_rate_table(args.model)
    if args.out:
        atomic_write_json(Path(args.out), table)
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

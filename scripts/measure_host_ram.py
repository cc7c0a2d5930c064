"""Peak host RAM of ``phi3v-bench run``'s CPU worker on depth-reduced Phi-3.5-vision copies (issue #24 §2).

Each case runs the benchmark worker's own path (:func:`bench.worker.run_rank`: synthetic workload, processor-rate
probe, the fine-tuning core's ``train`` with the real Trainer and method, the CPU memory step, the FLOP count) in a
fresh process, on the ``phi-3.5-vision`` preset with ``num_hidden_layers`` (and optionally CLIP's depth) reduced, at
real width. A thread samples the process's RSS (psutil, every 20 ms) and names the phase of its peak; the peak itself is
``ru_maxrss``. The planner's prediction for the same reduced shape (:func:`bench.fit.predict`) is recorded beside it.

Usage (writes results/validation/host-ram-<machine>-<date>.json with provenance; commit first so git_dirty is false):

    OMP_NUM_THREADS=2 python scripts/measure_host_ram.py --layers 1 2 3 --vision-layers 2 --num-crops 4 \
        --save results/validation/host-ram-cpu-Intel-Xeon-2t-20261207.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
PRESET = "phi-3.5-vision"


class RssSampler:
    """The process's RSS every ``period_s`` seconds, with the phase that was current at the highest sample."""

    def __init__(self, period_s: float = 0.02) -> None:
        import psutil

        self.process, self.period_s = psutil.Process(), period_s
        self.phase, self.peak, self.peak_phase = "imports", 0, "imports"
        self.marks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period_s)

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        if rss > self.peak:
            self.peak, self.peak_phase = rss, self.phase
        return rss

    def mark(self, phase: str) -> None:
        """Start ``phase`` and record the RSS at its start."""
        self.marks[phase] = self.sample()
        self.phase = phase
        print(f"{time.strftime('%H:%M:%S')} {phase} (RSS {self.marks[phase] / GIB:.2f} GiB, peak so far "
              f"{self.peak / GIB:.2f} GiB)", file=sys.stderr, flush=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _reduce_preset(layers: int, vision_layers: int | None) -> None:
    """Make the ``phi-3.5-vision`` preset ``layers`` decoder layers deep (and CLIP ``vision_layers``), real width."""
    from phi3v_core.config import MODEL_PRESETS

    full = MODEL_PRESETS[PRESET]

    def reduced(**overrides: Any) -> Any:
        extra: dict[str, Any] = {"num_hidden_layers": layers}
        if vision_layers is not None:
            extra["vision_config"] = {"num_hidden_layers": vision_layers}
        return full(**{**extra, **overrides})

    MODEL_PRESETS[PRESET] = reduced


def _instrument(sampler: RssSampler) -> None:
    """Mark the phases: model build, method prepare, training, the FLOP count."""
    import bench.worker
    import phi3v_core.training.model_setup as setup

    build = setup.build_model

    def build_model(*args: Any, **kwargs: Any) -> Any:
        sampler.mark("model build")
        model = build(*args, **kwargs)
        sampler.mark("method prepare")
        return model

    setup.build_model = build_model
    step_flops = bench.worker._step_flops

    def flops(*args: Any, **kwargs: Any) -> Any:
        sampler.mark("FLOP count")
        return step_flops(*args, **kwargs)

    bench.worker._step_flops = flops
    from transformers import TrainerCallback

    import phi3v_core.training

    class Phases(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sampler.mark(f"step {state.global_step + 1} forward/backward")

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sampler.mark(f"step {state.global_step + 1} optimizer")

    train = phi3v_core.training.train

    def train_marked(cfg: Any, dataset: Any, callbacks: list[Any] | None = None, **kwargs: Any) -> Any:
        sampler.mark("train setup")
        return train(cfg, dataset, callbacks=[*(callbacks or []), Phases()], **kwargs)

    phi3v_core.training.train = train_marked


def predicted(cfg: Any, layers: int, vision_layers: int | None) -> dict[str, float]:
    """The planner's CPU host-RAM prediction (bench.fit.predict) for the reduced shape, and its parts."""
    import planner.shapes
    from bench.fit import predict
    from phi3v_core.config import get_config

    _reduce_preset(layers, vision_layers)
    shape = planner.shapes.ModelShape.from_config(get_config(PRESET), PRESET)
    real = planner.shapes.load_shape
    planner.shapes.load_shape = lambda model: shape if model == PRESET else real(model)
    try:
        return {"host_bytes": predict(cfg, gpu=False).host_bytes}
    finally:
        planner.shapes.load_shape = real


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: the worker's run_rank on the reduced preset; its RSS peak and phases."""
    sampler = RssSampler().start()
    import torch  # noqa: F401 - the imports are part of the fixed cost

    import bench.worker
    from bench.config import BenchConfig

    sampler.mark("workload")
    _reduce_preset(args.layers, args.vision_layers)
    _instrument(sampler)
    cfg = BenchConfig(method=args.method, model=PRESET, precision="fp32", attn="sdpa", num_crops=args.num_crops,
                      global_batch=args.micro_batch, micro_batch=args.micro_batch, steps=args.steps, warmup=0,
                      repeats=1, gradient_checkpointing=True, release="host-ram")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="host-ram-") as out:
        payload = bench.worker.run_rank(cfg, Path(out))
    sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "layers": args.layers, "vision_layers": args.vision_layers or 24, "num_crops": args.num_crops,
        "method": args.method, "micro_batch": args.micro_batch, "status": payload.get("status"),
        "message": payload.get("message"), "seconds": time.monotonic() - started,
        "peak_rss_bytes": peak, "sampled_peak_rss_bytes": sampler.peak, "peak_phase": sampler.peak_phase,
        "rss_at_phase_start_bytes": sampler.marks, "total_params": payload.get("total_params"),
        "trainable_params": payload.get("trainable_params"),
        "cpu_tensor_peak_bytes": (payload.get("memory") or {}).get("cpu_tensor_peak_bytes"),
        "config": cfg.to_dict(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--vision-layers", type=int, default=None)
    parser.add_argument("--num-crops", type=int, default=16)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help="write the rows with provenance to this JSON file")
    args = parser.parse_args()
    if args.child:
        args.layers = args.layers[0]
        print(json.dumps(child(args)))
        return 0
    rows = []
    for layers in args.layers:
        command = [sys.executable, __file__, "--child", "--layers", str(layers), "--num-crops", str(args.num_crops),
                   "--method", args.method, "--micro-batch", str(args.micro_batch), "--steps", str(args.steps)]
        if args.vision_layers is not None:
            command += ["--vision-layers", str(args.vision_layers)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        from bench.config import BenchConfig

        row["predicted_host_bytes"] = predicted(BenchConfig.from_dict(row["config"]), layers, args.vision_layers)["host_bytes"]
        print(f"layers {layers}: peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB ({row['peak_phase']}), predicted "
              f"{row['predicted_host_bytes'] / GIB:.2f} GiB, {row['seconds']:.0f} s", file=sys.stderr)
        rows.append(row)
    if args.save:
        from planner.validate import save_validation

        save_validation({"rows": rows}, args.save, "OMP_NUM_THREADS=2 python " + " ".join(sys.argv))
    else:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

"""Validate the speed model where we can measure: this CPU (``phi3v-plan --validate``).

A micro-benchmark of a few seconds measures this machine's matmul rate, memory bandwidth and per-operator overhead;
those are the only CPU inputs. The same speed model that plans GPUs (:func:`planner.speed.predict_speed`, with the
constants of ``planner/data/calibration.json`` that are not GPU rates) then predicts the step time of several
``phi3v-bench`` configurations, which are run for real (``bench.worker.run_rank``, in this process) and compared.
Nothing is fitted to the step times the model is judged on.

Imports torch and bench lazily: the rest of the planner stays torch-free.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from phi3v_core.workload import Workload
from planner.calibration import fit_speed_constants, load_calibration
from planner.estimate import SampleShape
from planner.shapes import ModelShape, load_shape
from planner.speed import Interconnect, Rates, SpeedConstants, predict_speed
from planner.train_setup import TrainSetup

__all__ = [
    "DEFAULT_CASES", "SMALL_SIZE", "ValidationCase", "checkpoint_ratios", "eight_bit_adamw_memory", "measure_rates",
    "mid_size_model", "packing_lines", "packing_validation", "save_validation", "validate_cpu",
]

#: A mid-size model of the same structure (a few layers of real-ish width) for the CPU validation.
MID_SIZE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,  # head_dim 16, as tiny's (its LongRoPE factors are sized for it)
    "num_key_value_heads": 16,
    "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4},
    "img_processor": {"image_dim_out": 128},
}


#: A small model (4 layers, no checkpointing) where optimizer states, not logits, weigh in the peak.
SMALL_SIZE = {
    "vocab_size": 8192,
    "pad_token_id": 0,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "rope_scaling": {"type": "su", "long_factor": [1.0] * 16, "short_factor": [1.0] * 16},
    "vision_config": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4},
    "img_processor": {"image_dim_out": 128, "num_img_tokens": 144, "model_name": "small", "name": "clip_vision_model"},
}


@dataclass(frozen=True)
class ValidationCase:
    """One ``phi3v-bench`` configuration to measure and predict."""

    model: str  # "tiny" or "mid"
    method: str
    num_crops: int
    micro_batch: int
    grad_accum: int = 1
    gradient_checkpointing: bool = True

    @property
    def label(self) -> str:
        """Short label."""
        gc = "" if self.gradient_checkpointing else " nogc"
        return f"{self.model} {self.method} c{self.num_crops} mb{self.micro_batch}x{self.grad_accum}{gc}"

    def run(self, model: str) -> Workload:
        """What the case trains on ``model`` (a preset or a folder): ``phi3v-bench``'s DocVQA twin on this CPU, fp32
        and sdpa, seed 0."""
        return Workload(
            seq_profile="docvqa", method=self.method, attn="sdpa", precision="fp32", model=model,
            num_crops=self.num_crops, global_batch=self.micro_batch * self.grad_accum, micro_batch=self.micro_batch,
            gradient_checkpointing=self.gradient_checkpointing, seed=0,
        )  # fmt: skip


DEFAULT_CASES: tuple[ValidationCase, ...] = (
    ValidationCase("tiny", "full", 1, 1),
    ValidationCase("tiny", "full", 4, 2),
    ValidationCase("tiny", "lora", 4, 1),
    ValidationCase("tiny", "frozen_vision", 2, 2),
    ValidationCase("mid", "full", 1, 1),
    ValidationCase("mid", "full", 4, 1),
    ValidationCase("mid", "lora", 2, 2),
    ValidationCase("mid", "full", 1, 2, 2),
    # the same LoRA step with and without recompute: the predicted on/off ratio is checked too (checkpoint_ratio)
    ValidationCase("mid", "lora", 4, 1, 1, True),
    ValidationCase("mid", "lora", 4, 1, 1, False),
)


def measure_rates(seconds: float = 1.0) -> Rates:
    """Measure this CPU: fp32 matmul FLOP/s, streaming bandwidth, softmax elements/s and one operator's cost.

    Each probe takes the median of repeats within about ``seconds``, timed in process CPU seconds: on a shared
    machine wall-clock time measures the other processes' load; CPU time measures the work (the training steps are
    timed the same way, single-threaded, see :func:`validate_cpu`).
    """
    import torch

    def best_of(fn: Any, budget: float) -> float:
        fn()
        times = []
        end = time.perf_counter() + budget
        while time.perf_counter() < end or len(times) < 3:
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return statistics.median(times)

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = 2 * n**3 / best_of(lambda: torch.mm(a, b), seconds / 4)
    big = torch.empty(64 * 2**20 // 4).normal_()
    out = torch.empty_like(big)
    bandwidth = 3 * big.numel() * 4 / best_of(lambda: torch.add(big, big, out=out), seconds / 4)
    layer = torch.nn.Linear(8, 8)
    x = torch.ones(4, 8, requires_grad=True)

    def tiny_step() -> None:
        # one module forward + backward: what an operator of a training step costs besides its arithmetic
        layer(x).sum().backward()

    op = best_of(tiny_step, seconds / 4) / 4  # linear forward + sum, and their two backward nodes
    logits = torch.randn(512, 32768, requires_grad=True)  # 64 MB: out of cache, like a vocabulary-wide loss

    def softmax_unit() -> None:
        torch.log_softmax(logits, dim=-1).sum().backward()

    softmax = logits.numel() / best_of(softmax_unit, seconds / 4)
    return Rates(
        matmul_flops=matmul,
        bandwidth=bandwidth,
        op_overhead_s=op,
        softmax_elements_per_s=softmax,
        source=f"measured on this CPU: {matmul / 1e9:.1f} GFLOP/s fp32 matmul ({n}³), {bandwidth / 1e9:.1f} GB/s "
        f"(add, 3×64 MB), {softmax / 1e6:.0f} M softmax elements/s (fwd+bwd), {op * 1e6:.1f} µs per operator "
        f"({torch.get_num_threads()} thread(s), CPU seconds)",
    )


def mid_size_model(folder: Path) -> Path:
    """Save a randomly initialised mid-size model (config + weights) into ``folder``."""
    from phi3v_core.config import tiny_config

    config = tiny_config()
    values = config.to_dict()
    for key, value in MID_SIZE.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    config = type(config).from_dict(values)
    import torch

    from phi3v_core.model import Phi3VForCausalLM

    torch.manual_seed(0)
    Phi3VForCausalLM(config).save_pretrained(folder)
    return folder


def _shape(model: str) -> ModelShape:
    return load_shape(model)


def _measure(case: ValidationCase, model: str, steps: int) -> dict[str, Any]:
    """Train ``1 + steps`` optimizer steps the way ``phi3v-bench`` does; per-step wall and CPU seconds."""
    from transformers import TrainerCallback

    from phi3v_core.processing import Phi3VProcessor
    from phi3v_core.training import StepTimer, train
    from phi3v_core.training.workload import build_workload, to_train_config

    class CpuTimer(TrainerCallback):  # type: ignore[misc]
        """Process CPU seconds per optimizer step (robust to other processes sharing the cores)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._begin = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._begin = time.process_time()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.seconds.append(time.process_time() - self._begin)

    cfg = case.run(model)
    warmup = 1
    total = warmup + steps
    # presets and the mid-size folder have no tokenizer files: bench uses the offline tiny processor for them too
    workload = build_workload(cfg, Phi3VProcessor.tiny(num_crops=cfg.num_crops), cfg.global_batch * total)
    timer, cpu = StepTimer(), CpuTimer()
    # the Trainer prints its logs to stdout: keep stdout for the report (``--validate --json`` stays valid JSON)
    with tempfile.TemporaryDirectory(prefix="phi3v-plan-validate-") as out, contextlib.redirect_stdout(sys.stderr):
        train(to_train_config(cfg, out, total), workload.dataset, callbacks=[timer, cpu])
    wall = [r.seconds for r in timer.records][warmup :]
    return {
        "wall_s": wall,
        "cpu_s": cpu.seconds[warmup :],
        "tokens_per_sample": workload.tokens_per_sample,
        "supervised_tokens": workload.supervised_tokens_per_sample,
    }


def validate_cpu(
    cases: tuple[ValidationCase, ...] = DEFAULT_CASES, steps: int = 2, bench_seconds: float = 1.5, repeats: int = 1
) -> dict[str, Any]:
    """Measure the CPU, predict each case's step time with the speed model, run it, compare.

    Args:
        cases: Configurations to run (methods × crops × micro-batch, tiny and mid-size models).
        steps: Timed optimizer steps per case (after one warm-up step).
        bench_seconds: Time budget of the micro-benchmark.
        repeats: Runs of every case (micro-benchmark, prediction and measurement each time); a row reports the
            median and the spread (min..max) of its errors, so a reader sees how much of the error is noise.

    Returns:
        ``{"rates": ..., "rows": [{case, measured_s, predicted_s, error_pct, ...}], "median_abs_error_pct": ...}``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: CPU seconds = the work, whatever else runs on this machine
    try:
        return _validate(cases, steps, bench_seconds, repeats)
    finally:
        torch.set_num_threads(threads)


def _validate(cases: tuple[ValidationCase, ...], steps: int, bench_seconds: float, repeats: int) -> dict[str, Any]:
    constants, _fitted = fit_speed_constants(load_calibration(), load_shape("phi-3-vision"))
    single = Interconnect(1, 1, 32.0, False, 12.5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="phi3v-plan-mid-") as scratch, contextlib.redirect_stdout(sys.stderr):
        models = {"tiny": "tiny", "mid": str(mid_size_model(Path(scratch)))}
        for case in cases:
            model = models[case.model]
            shape = _shape(model)
            workload = SampleShape.from_images(shape, case.num_crops, (1008, 1680), text_tokens=66)
            setup = TrainSetup.from_workload(case.run(model), cuda=False)
            runs = [_run_case(case, model, shape, workload, setup, constants, single, steps, bench_seconds)
                    for _ in range(repeats)]
            measured = statistics.median(r["measured_s"] for r in runs)
            predicted = statistics.median(r["predicted_s"] for r in runs)
            errors = [r["error_pct"] for r in runs]
            rows.append(
                {
                    "case": case.label,
                    "model": case.model,
                    "method": case.method,
                    "num_crops": case.num_crops,
                    "micro_batch": case.micro_batch,
                    "grad_accum": case.grad_accum,
                    "gradient_checkpointing": case.gradient_checkpointing,
                    "seq_len_predicted": workload.seq_len,
                    "tokens_per_sample_measured": runs[0]["tokens_per_sample"],
                    "measured_s": measured,
                    "measured_wall_s": statistics.median(r["measured_wall_s"] for r in runs),
                    "predicted_s": predicted,
                    "predicted_other_checkpointing_s": statistics.median(r["predicted_other_checkpointing_s"] for r in runs),
                    "error_pct": 100 * (predicted / measured - 1),
                    "error_pct_min": min(errors),
                    "error_pct_max": max(errors),
                    "predicted_times_s": runs[0]["predicted_times_s"],
                    "rates": runs[0]["rates"],
                    "repeats": runs,
                }
            )
    errors = [abs(r["error_pct"]) for r in rows]
    return {
        "note": "predictions from the micro-benchmark's rates and the speed model's constants; nothing is fitted to "
        "the measured step times",
        "rows": rows,
        "median_abs_error_pct": statistics.median(errors) if errors else None,
        "max_abs_error_pct": max(errors) if errors else None,
        "repeats": repeats,
        "max_error_spread_pct": max((r["error_pct_max"] - r["error_pct_min"] for r in rows), default=None),
        "checkpoint_ratios": checkpoint_ratios(rows),
        "packing": packing_validation(),
    }


def checkpoint_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step time with / without checkpointing for every case measured both ways: predicted, measured, error."""
    out = []
    key = ("model", "method", "num_crops", "micro_batch", "grad_accum")
    off = {tuple(r[k] for k in key): r for r in rows if not r.get("gradient_checkpointing", True)}
    for on in rows:
        twin = off.get(tuple(on[k] for k in key))
        if not on.get("gradient_checkpointing", True) or twin is None:
            continue
        # predicted with the rates measured before the checkpointed case, for both settings
        predicted = on["predicted_s"] / on["predicted_other_checkpointing_s"]
        measured = on["measured_s"] / twin["measured_s"]
        out.append(
            {
                "case": on["case"],
                "predicted_ratio": predicted,
                "measured_ratio": measured,
                "error_pct": 100 * (predicted / measured - 1),
            }
        )
    return out


def _run_case(
    case: ValidationCase, model: str, shape: ModelShape, workload: SampleShape, setup: TrainSetup, constants: Any,
    interconnect: Interconnect, steps: int, bench_seconds: float,
) -> dict[str, Any]:
    """One repeat of one case: measure the CPU's rates, predict the step, run it."""
    import torch

    rates = measure_rates(bench_seconds)  # just before the run: the same share of a busy machine
    torch.manual_seed(0)
    payload = _measure(case, model, steps)
    # logits at the bench examples' supervised positions (read from the encoded data, not from timings)
    workload = replace(workload, supervised_tokens=payload["supervised_tokens"])
    prediction = predict_speed(shape, workload, setup, None, interconnect, constants, rates=rates)
    # the other checkpointing setting under the same rates: the predicted on/off ratio must not carry the
    # drift of two separate rate measurements on a busy machine
    twin = replace(setup, gradient_checkpointing=not setup.gradient_checkpointing)
    twin_prediction = predict_speed(shape, workload, twin, None, interconnect, constants, rates=rates)
    assert prediction is not None and twin_prediction is not None
    measured = statistics.median(payload["cpu_s"])
    return {
        "measured_s": measured,
        "measured_wall_s": statistics.median(payload["wall_s"]),
        "predicted_s": prediction.step_s,
        "predicted_other_checkpointing_s": twin_prediction.step_s,
        "error_pct": 100 * (prediction.step_s / measured - 1),
        "predicted_times_s": prediction.times,
        "tokens_per_sample": payload.get("tokens_per_sample"),
        "rates": rates.source,
    }


def save_validation(result: dict[str, Any], path: str | Path, command: str) -> Path:
    """Write ``result`` with the machine, commit, date and command that produced it (the README cites such files)."""
    from dataclasses import asdict

    from phi3v_core.environment import capture_environment, utc_now
    from phi3v_core.io import atomic_write_json

    env = capture_environment()
    record = {"command": command, "date": utc_now(), "machine": env.hardware, "git_sha": env.git_sha,
              "git_dirty": env.git_dirty, "environment": asdict(env), "result": result}
    return atomic_write_json(Path(path), record)


def eight_bit_adamw_memory() -> dict[str, Any]:
    """Full fine-tuning of :data:`SMALL_SIZE` with bitsandbytes' 8-bit AdamW: MemTracker's peak vs the closed form.

    One warm-up and one tracked step on CPU (fp32, sdpa, no checkpointing, 2 crops of 672x336); bytes.
    """
    from phi3v_core.config import get_config
    from phi3v_core.model import Phi3VForCausalLM
    from planner.estimate import estimate_memory
    from planner.trace import build_batch, measure_step

    config = get_config("tiny", **SMALL_SIZE)
    shape = ModelShape.from_config(config, "small")
    model = Phi3VForCausalLM(config)
    dead = model.dead_parameter_names()
    for name, param in model.named_parameters():
        param.requires_grad_(name not in dead)
    model.train()
    workload = SampleShape.from_images(shape, num_crops=2, image_size=(672, 336), text_tokens=40, answer_tokens=32)
    setup = TrainSetup(method="full", precision="fp32", attn="sdpa", gradient_checkpointing=False,
                       optimizer_foreach=False, zero_stage=0, optim="adamw_8bit")
    measured = measure_step(model, build_batch(shape, workload), setup)["peak"]["Total"]
    plain = replace(setup, optim="adamw")
    return {
        "case": "small (h 256, 4 layers) full, 8-bit AdamW, fp32, no checkpointing, 2 crops",
        "measured_peak_bytes": int(measured),
        "predicted_peak_bytes": int(estimate_memory(shape, setup, workload).allocated),
        "predicted_plain_adamw_bytes": int(estimate_memory(shape, plain, workload).allocated),
    }


#: Where ``phi3v-bench`` validation results live in the source tree.
VALIDATION_DIR = Path(__file__).resolve().parents[1] / "results" / "validation"


def packing_validation(folder: str | Path = VALIDATION_DIR, rates: Rates | None = None) -> list[dict[str, Any]]:
    """The planner's packed/padded speed-up beside the bench's, one entry per ``packing-*.json`` in ``folder``
    (``python -m bench.packing_measure --save``; none: an empty list). Rates are measured once when not given."""
    files = sorted(Path(folder).glob("packing-*.json"))
    if not files:
        return []
    rates = rates or measure_rates(1.0)
    constants, _fitted = fit_speed_constants(load_calibration(), load_shape("phi-3-vision"))
    return [_packing_case(path, rates, constants) for path in files]


def _packing_case(path: Path, rates: Rates, constants: SpeedConstants) -> dict[str, Any]:
    """One bench file's measured speed-up beside the planner's.

    The file's ``result`` (CPU, the same samples padded and packed) gives the workload — model config, attention,
    micro-batch, pack budget, per-sample tokens in the order trained (each ``micro_batch`` consecutive ones were one
    micro-batch) — and the measured padding and real tokens/s both ways. The prediction packs those micro-batches
    with :mod:`planner.packing` under this CPU's rates; a sample's vision cost is taken as the average sample's
    (square images at the file's num_crops).
    """
    from planner.packing import predict_packing, row_cost, token_sums

    record = json.loads(path.read_text())
    result, work = record["result"], record["result"]["workload"]
    model = str(work["model_config"])
    in_tree = VALIDATION_DIR.parents[1] / model  # a path in the file is relative to the source tree
    shape = load_shape(str(in_tree) if not Path(model).exists() and in_tree.exists() else model)
    lengths = [int(n) for n in work["sample_tokens"]]
    images = round(statistics.mean(work["images_per_sample"])) if work.get("images_per_sample") else 1
    mean = SampleShape.from_images(shape, int(work["num_crops"]), None, images=max(images, 1), text_tokens=0)
    supervised = work.get("supervised_tokens")  # optional: per sample, or their mean; unknown = every token
    if isinstance(supervised, list):
        supervised = statistics.mean(supervised)
    mean = replace(mean, seq_len=round(statistics.mean(lengths)),
                   supervised_tokens=None if supervised is None else round(float(supervised)))  # fmt: skip
    # bench.packing_measure trains without checkpointing unless the file says otherwise
    run = Workload(method=work["method"], precision=work["precision"], attn=work["attention"],
                      gradient_checkpointing=bool(work.get("gradient_checkpointing", False)),
                      micro_batch=int(work["micro_batch"]), global_batch=int(work["micro_batch"]))  # fmt: skip
    setup = TrainSetup.from_workload(run, cuda=False)
    budget = work.get("pack_tokens")
    sums = token_sums(lengths, setup.micro_batch, setup.attn, budget, shuffles=0)  # the micro-batches trained
    cost = row_cost(shape, setup, mean, rates, constants)
    prediction = predict_packing(sums, setup.attn, budget, cost)
    assert prediction.speed_up is not None  # a cost was given
    measured = float(result["speed_up"])
    return {
        "file": str(path),
        "case": f"{work['model_config']} {work['method']} {work['attention']} c{work['num_crops']} mb{setup.micro_batch}, "
        f"{len(lengths)} samples of {min(lengths)}-{max(lengths)} tokens",
        "predicted_speed_up": prediction.speed_up,
        "measured_speed_up": measured,
        "error_pct": 100 * (prediction.speed_up / measured - 1),
        "predicted_padding": {"padded": prediction.padding_padded, "packed": prediction.padding_packed},
        "measured_padding": {k: result[k]["padding_fraction"] for k in ("padded", "packed")},
    }


def packing_lines(cases: list[dict[str, Any]]) -> list[str]:
    """``--validate``'s packing lines, one per bench file."""
    if not cases:
        return ["packing: no results/validation/packing-*.json yet (python -m bench.packing_measure --save)"]
    return [
        f"packing ({line['case']}): predicted speed-up {line['predicted_speed_up']:.2f}x, measured "
        f"{line['measured_speed_up']:.2f}x ({line['error_pct']:+.0f} %); padding predicted "
        f"{line['predicted_padding']['padded']:.0%} → {line['predicted_padding']['packed']:.0%}, measured "
        f"{line['measured_padding']['padded']:.0%} → {line['measured_padding']['packed']:.0%} ({line['file']})"
        for line in cases
    ]

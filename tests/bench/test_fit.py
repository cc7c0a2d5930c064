"""Refuse what cannot fit before building it (issue #24 §2): host RAM from psutil, device memory from NVML, both
numbers and the nearest layout that fits in the refusal, ``--force`` to run anyway, matrix cells left out."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest

import bench.fit
import bench.runner
from bench.cli import main
from bench.config import BenchConfig
from bench.fit import Memory, available, fit_problem, nearest_fit, predict
from tests.bench.conftest import REAL_HOST_AVAILABLE
from tests.bench.factories import make_result
from tests.bench.test_bench_safety import never_measure
from tests.planner.conftest import FakeDevice, FakeNVML

GIB = 1 << 30


#: This project's CPU machine (issue #24 §2): 24 GB of RAM, 22.3 GiB of it available when the full-size run was killed.
HOST_TOTAL = 25276182528
HOST_AVAILABLE_GIB = 22.34


def _host_ram(monkeypatch: pytest.MonkeyPatch, gib: float, total: float | None = None) -> None:
    """psutil reports ``gib`` available of ``total`` bytes (``gib`` when omitted); bench.fit reads it through its real
    reader."""
    memory = SimpleNamespace(available=int(gib * GIB), total=int(total or gib * GIB))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(bench.fit, "host_available_bytes", REAL_HOST_AVAILABLE)  # undo the suite's 1 TiB


def test_the_issues_cpu_run_is_refused_with_both_numbers_before_anything_runs(tmp_path, monkeypatch, capsys) -> None:
    """`run --method lora --model phi-3.5-vision` on this 24 GB CPU host: refused at once, not by the OOM killer."""
    _host_ram(monkeypatch, HOST_AVAILABLE_GIB, HOST_TOTAL)
    monkeypatch.setattr(bench.runner, "run_config", never_measure)
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        main(["run", "--method", "lora", "--model", "phi-3.5-vision", "--out", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    # the planner's tensors at micro-batch 1 + the runtime measured beside them (planner/host_memory.py)
    assert "needs 21.4 GiB of host RAM (1 process on the CPU), 22.3 GiB available" in err
    assert "(21.2 GiB usable, 1.2 GiB left to the system)" in err
    assert "nearest layout that fits: --precision bf16 (predicted 12.4 GiB)" in err  # the fp32 base in bf16
    assert err.rstrip().endswith("pass --force to run it anyway")
    assert not out.exists()


def test_finetune_and_matrix_get_the_same_verdict(tmp_path, monkeypatch, capsys) -> None:
    """The same layout through `phi3v-finetune`'s plugin and a `matrix` cell: the same numbers, the same advice."""
    import planner.fit_check
    from phi3v_core.training import TrainConfig

    _host_ram(monkeypatch, HOST_AVAILABLE_GIB, HOST_TOTAL)
    train = TrainConfig(model="phi-3.5-vision", method="lora", precision="fp32", output_dir="unused", num_crops=16,
                        micro_batch=1, global_batch=8, gradient_checkpointing=True)
    finetune = planner.fit_check.finetune_fit_problem(train, "docvqa", None, 1, 1, False)
    numbers = "21.4 GiB of host RAM, 22.3 GiB available (21.2 GiB usable, 1.2 GiB left to the system)"
    assert finetune is not None and numbers in finetune
    assert "bf16 (--precision bf16) is predicted at 12.4 GiB" in finetune and "--force" in finetune
    argv = ["matrix", "--grid", "method=lora", "--set", "model=phi-3.5-vision", "precision=fp32", "num_crops=16",
            "global_batch=8", "micro_batch=1", "gradient_checkpointing=on", "--out", str(tmp_path), "--dry-run"]
    assert main(argv) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and numbers.replace("host RAM", "host RAM (1 process on the CPU)") in skipped[0]
    assert "nearest layout that fits: --set precision=bf16 (predicted 12.4 GiB)" in skipped[0]


def test_fourteen_gib_refuses_and_offers_bf16(monkeypatch) -> None:
    """A 16 GB host (14 GiB available): fp32 LoRA does not fit, the bf16 base does."""
    cfg = BenchConfig(method="lora", model="phi-3.5-vision", precision="fp32", release="t", global_batch=8,
                      micro_batch=1, gradient_checkpointing=True)
    message = fit_problem(cfg, False, Memory(None, 14 * GIB, 16 * GIB))
    assert message is not None and "14.0 GiB available (13.2 GiB usable, 0.8 GiB left to the system)" in message
    assert "nearest layout that fits: --precision bf16" in message


def test_force_runs_it_anyway(tmp_path, monkeypatch) -> None:
    _host_ram(monkeypatch, 4.0)
    ran = []
    monkeypatch.setattr(bench.runner, "run_config", lambda cfg, **_: ran.append(cfg) or make_result(cfg))
    argv = ["run", "--method", "lora", "--model", "phi-3.5-vision", "--out", str(tmp_path), "--json"]
    assert main([*argv, "--force"]) == 0
    assert ran and ran[0].model == "phi-3.5-vision"


def test_nearest_layout_on_a_cpu_changes_the_fewest_flags(monkeypatch) -> None:
    cfg = BenchConfig(method="lora", model="phi-3.5-vision", precision="fp32", release="t", global_batch=8,
                      micro_batch=2, gradient_checkpointing=True)
    one = predict(BenchConfig(**{**cfg.to_dict(), "micro_batch": 1}), gpu=False)
    changes, fits = nearest_fit(cfg, Memory(None, one.host_bytes + GIB / 10), gpu=False)  # no total: no reserve
    assert changes == {"micro_batch": 1} and fits.host_bytes == one.host_bytes
    message = fit_problem(cfg, False, Memory(None, one.host_bytes + GIB / 10))
    assert "nearest layout that fits: --per_device_train_batch_size 1 (predicted" in message


def test_device_memory_comes_from_nvml_and_an_rtx4090_refuses_full_fine_tuning(monkeypatch) -> None:
    """Full fine-tuning of Phi-3.5-vision on one RTX 4090 (24 GiB, fake NVML): the card's number, not a table's."""
    _host_ram(monkeypatch, 128.0)
    nvml = FakeNVML([FakeDevice("NVIDIA GeForce RTX 4090", 24564 * 2**20, (8, 9))])
    have = available(True, nvml)
    assert have.device_bytes == 24564 * 2**20 and have.host_bytes == 128 * GIB
    cfg = BenchConfig(method="full", model="phi-3.5-vision", precision="bf16", attn="sdpa", release="t",
                      global_batch=64, micro_batch=1)
    message = fit_problem(cfg, True, have)
    assert message is not None
    assert "per GPU (predicted reserved peak), 24.0 GiB on the card" in message
    assert "nearest layout that fits: " in message
    # With little host RAM the offloaded optimizer (16 bytes per parameter in host RAM) is not offered.
    small = fit_problem(cfg, True, Memory(have.device_bytes, 32 * GIB))
    assert "--offload optimizer" not in small


def test_a_layout_that_fits_is_not_refused() -> None:
    cfg = BenchConfig(method="lora", model="tiny", precision="fp32", num_crops=1, global_batch=2, micro_batch=2,
                      release="t")
    assert fit_problem(cfg, False, Memory(None, 64 * GIB)) is None
    assert fit_problem(cfg, False, Memory(None, None)) is None  # nothing known: nothing refused


def test_matrix_leaves_out_cells_that_cannot_fit_and_says_so(tmp_path, monkeypatch, capsys) -> None:
    _host_ram(monkeypatch, 30.0)
    argv = ["matrix", "--grid", "method=lora,full", "--set", "model=phi-3.5-vision", "precision=fp32",
            "global_batch=8", "micro_batch=1", "--out", str(tmp_path), "--dry-run"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert any(line.startswith("skipped full-") for line in skipped), captured.err
    assert all("--force" in line and "GiB available" in line for line in skipped)
    listed = [line for line in captured.out.splitlines() if "  ->  " in line]
    assert listed and not any(line.startswith("full-") for line in listed)  # only the cells it will run
    assert main([*argv, "--force"]) == 0
    assert any(line.startswith("full-") for line in capsys.readouterr().out.splitlines())


def test_refusal_names_matrix_assignments_for_a_cell() -> None:
    cfg = BenchConfig(method="lora", model="phi-3.5-vision", precision="fp32", release="t", global_batch=8,
                      micro_batch=2)
    one = predict(BenchConfig(**{**cfg.to_dict(), "micro_batch": 1}), gpu=False)
    message = fit_problem(cfg, False, Memory(None, one.host_bytes + GIB / 10), matrix=True)
    assert "nearest layout that fits: --set micro_batch=1" in message

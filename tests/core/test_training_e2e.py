"""End-to-end training on the tiny model: every method × precision, saving/reloading, kill/resume, torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phi3v_core.config import tiny_config
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.training import TrainConfig, train
from phi3v_core.training.synthetic import SyntheticDataset
from tests.safety_helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, method: str, precision: str = "fp32", **overrides) -> TrainConfig:
    values = dict(
        model="tiny", method=method, precision=precision, num_crops=1, micro_batch=1, global_batch=1,
        max_steps=3, warmup_steps=0, learning_rate=1e-3, lora_rank=8, output_dir=str(tmp_path / "run"),
        dataloader_num_workers=0, disable_tqdm=True, save_final=False, seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def dataset() -> SyntheticDataset:
    return SyntheticDataset(num_examples=8, num_crops=1, seed=0)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("method", ["full", "frozen_vision", "lora", "qlora"])
def test_each_method_trains_three_steps(method: str, precision: str, dataset: SyntheticDataset, tmp_path: Path) -> None:
    result = train(_config(tmp_path, method, precision), dataset)
    assert result.global_step == 3
    assert sorted(result.losses) == [1, 2, 3]
    assert all(0 < loss < 100 and loss == loss for loss in result.losses.values())
    names = set(result.report.trainable_names)
    assert result.report.trainable_parameters > 0
    dead = Phi3VForCausalLM(tiny_config()).dead_parameter_names()
    if method == "full":
        all_names = {n for n, _ in Phi3VForCausalLM(tiny_config()).named_parameters()}
        assert names == all_names - dead
    elif method == "frozen_vision":
        assert "model.embed_tokens.weight" in names
        assert not any(".vision_embed_tokens." in n for n in names)
        assert "lm_head.weight" in names
    else:
        assert names and all("lora_" in n for n in names)
        assert any("img_processor" in n for n in names) and any("qkv_proj" in n for n in names)
        assert not any(n.split(".lora_")[0].replace("base_model.model.", "") in dead for n in names)
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())


def test_lora_adapter_is_standard_peft_and_reloads(dataset: SyntheticDataset, tmp_path: Path) -> None:
    from peft import PeftModel

    result = train(_config(tmp_path, "lora", save_final=True), dataset)
    saved = Path(result.saved_to)
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8
    base = Phi3VForCausalLM(tiny_config())
    reloaded = PeftModel.from_pretrained(base, saved)
    trained = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            match = next(v for k, v in trained.items() if k.replace(".default", "") == key)
            assert torch.equal(param.detach().float(), match.detach().float())


def test_full_finetune_saves_a_folder_from_pretrained_loads(dataset: SyntheticDataset, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = train(_config(tmp_path, "full", save_final=True), dataset)
    loaded = AutoModelForCausalLM.from_pretrained(result.saved_to)
    assert isinstance(loaded, Phi3VForCausalLM)
    trained = dict(result.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name].detach()), name


def _launch_spec(path: Path, output_dir: Path, **train_overrides) -> Path:
    train_cfg = {
        "model": "tiny", "method": "lora", "precision": "fp32", "num_crops": 1, "micro_batch": 1,
        "global_batch": 2, "max_steps": 4, "warmup_steps": 0, "learning_rate": 1e-3, "lora_rank": 8,
        "output_dir": str(output_dir), "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 0,
        "deterministic": True,
    }
    train_cfg.update(train_overrides)
    spec = {"train": train_cfg, "data": {"factory": "phi3v_core.training.synthetic:synthetic_dataset",
                                         "kwargs": {"num_examples": 16, "num_crops": 1, "seed": 0}}}
    path.write_text(json.dumps(spec))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {int(e["step"]): float(e["loss"]) for e in state["log_history"] if "loss" in e}


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    launch = [sys.executable, "-m", "phi3v_core.training.launch", "--config"]
    reference_dir = tmp_path / "reference"
    spec = _launch_spec(tmp_path / "ref.json", reference_dir, save_steps=1)
    subprocess.run([*launch, str(spec)], check=True, env=_env(), capture_output=True, timeout=HANG_GUARD_S)

    killed_dir = tmp_path / "killed"
    spec = _launch_spec(tmp_path / "kill.json", killed_dir, save_steps=1)
    proc = subprocess.Popen([*launch, str(spec)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    # Kill as soon as step 2's checkpoint is complete (its trainer_state.json is written last).
    while not (killed_dir / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "checkpoint-4").exists()

    spec = _launch_spec(tmp_path / "resume.json", killed_dir, save_steps=1, resume="latest")
    subprocess.run([*launch, str(spec)], check=True, env=_env(), capture_output=True, timeout=HANG_GUARD_S)
    reference, resumed = _losses(reference_dir), _losses(killed_dir)
    assert sorted(reference) == sorted(resumed) == [1, 2, 3, 4]
    for step in reference:
        assert abs(reference[step] - resumed[step]) <= 1e-6, (step, reference[step], resumed[step])
    from safetensors.torch import load_file

    ref_weights = load_file(reference_dir / "adapter_model.safetensors")
    new_weights = load_file(killed_dir / "adapter_model.safetensors")
    assert ref_weights.keys() == new_weights.keys()
    for key in ref_weights:
        assert torch.allclose(ref_weights[key], new_weights[key], atol=1e-6), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(nnodes: int, node_rank: int, nproc: int, port: int, spec: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
            "-m", "phi3v_core.training.launch", "--config", str(spec)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_torchrun_two_processes(method: str, tmp_path: Path) -> None:
    """full → DeepSpeed ZeRO-2 over gloo; lora → DDP."""
    out = tmp_path / "run"
    spec = _launch_spec(tmp_path / "spec.json", out, method=method, max_steps=2, deterministic=False)
    done = subprocess.run(_torchrun(1, 0, 2, _free_port(), spec), env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert (result["zero_stage"] == 2) is (method == "full")


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = _launch_spec(tmp_path / "spec.json", out, max_steps=2, deterministic=False)
    port = _free_port()
    agents = [subprocess.Popen(_torchrun(2, rank, 1, port, spec), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [agent.communicate(timeout=HANG_GUARD_S)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-2000:] for o in outputs)
    result = json.loads((out / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2

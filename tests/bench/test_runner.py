"""The real runner: `phi3v-bench run` end to end on CPU, multi-process and multi-node runs, failure classification,
timeouts that take every started process with them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench.runner
from bench.config import BenchConfig
from bench.runner import (
    ClusterLaunch,
    first_slurm_host,
    launch_commands,
    run_config,
)
from bench.status import RepeatOutcome
from bench.store import load_result
from bench.worker import plan_steps, workload_samples
from phi3v_core.errors import ConfigError
from tests.safety_helpers import HANG_GUARD_S, process_running, wait_until

TINY = ["--model", "tiny", "--precision", "fp32", "--num-crops", "1", "--steps", "2", "--warmup", "1", "--repeats", "1"]


def test_step_plan_puts_instrumented_steps_after_the_timed_window() -> None:
    cfg = BenchConfig(warmup=2, steps=3, release="t")
    assert plan_steps(cfg, cuda=False) == {"first_timed": 3, "last_timed": 5, "memory_step": 6, "total": 6}
    assert plan_steps(cfg, cuda=True) == {"first_timed": 3, "last_timed": 5, "memory_step": None, "total": 5}


def test_workload_is_the_global_batch_for_every_step() -> None:
    # The Trainer's sampler shards the dataset over ranks: the job-wide count, not a per-rank one.
    cfg = BenchConfig(gpus=4, global_batch=8, micro_batch=1, release="t")
    assert workload_samples(cfg, total_steps=7) == 8 * 7


def test_loopback_launch_uses_torchrun_per_node_on_127_0_0_1(tmp_path: Path) -> None:
    cfg = BenchConfig(gpus=2, nodes=2, global_batch=4, release="t")
    commands = launch_commands(cfg, tmp_path / "c.json", tmp_path)
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        assert "torch.distributed.run" in command
        assert f"--node_rank={rank}" in command and "--nnodes=2" in command and "--nproc_per_node=2" in command
        assert "--master_addr=127.0.0.1" in command
    single = launch_commands(BenchConfig(release="t"), tmp_path / "c.json", tmp_path)
    assert single[0][1:3] == ["-m", "bench.worker"]


def test_cluster_launch_starts_only_this_node_with_a_port_per_repeat(tmp_path: Path) -> None:
    cfg = BenchConfig(gpus=8, nodes=2, global_batch=16, repeats=3, release="t")
    cluster = ClusterLaunch(nnodes=2, node_rank=1, master_addr="gpu01", master_port=29600)
    commands = launch_commands(cfg, tmp_path / "c.json", tmp_path, cluster=cluster, repeat=2)
    assert len(commands) == 1
    command = commands[0]
    assert "--node_rank=1" in command and "--nnodes=2" in command and "--nproc_per_node=8" in command
    assert "--master_addr=gpu01" in command and "--master_port=29602" in command
    assert not cluster.is_main and cluster.problems(cfg) == []
    assert "--nodes 2 but the cluster has 3" in ClusterLaunch(3, 0, "h").problems(cfg)[0]
    assert "outside 0..1" in ClusterLaunch(2, 2, "h").problems(cfg)[0]


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu01", "gpu01"), ("gpu[03-05,07]", "gpu03"), ("node[7,9-10],login1", "node7"), ("a-b-1,c", "a-b-1"), ("", "")],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_cluster_placement_from_flags_and_from_srun() -> None:
    flags = ClusterLaunch.from_args(2, 1, "10.0.0.1", None, environ={})
    assert flags == ClusterLaunch(2, 1, "10.0.0.1", 29500)
    with pytest.raises(ConfigError, match="--master_addr missing"):
        ClusterLaunch.from_args(2, 1, None, None, environ={})
    slurm = {"SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1",
             "SLURM_JOB_NODELIST": "dgx[012-013]", "SLURM_JOB_ID": "4242"}
    placed = ClusterLaunch.from_args(2, None, None, None, environ=slurm)
    assert placed is not None
    assert (placed.nnodes, placed.node_rank, placed.master_addr) == (2, 1, "dgx012")
    assert placed.master_port == 29500 + 242 * 10  # per job, the same on every node
    assert ClusterLaunch.from_args(2, None, None, 29501, environ=slurm).master_port == 29501
    with pytest.raises(ConfigError, match="one phi3v-bench per node"):
        ClusterLaunch.from_args(2, None, None, None, environ={**slurm, "SLURM_NTASKS": "16"})
    assert ClusterLaunch.from_args(1, None, None, None, environ=slurm) is None  # one node: nothing to place
    assert ClusterLaunch.from_args(2, None, None, None, environ={}) is None  # loopback


def test_loopback_nodes_are_refused_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.runner, "_run_repeat", lambda *a, **k: pytest.fail("must refuse before launching"))
    with pytest.raises(ConfigError, match="same GPUs"):
        run_config(BenchConfig(gpus=1, nodes=2, global_batch=2, release="t"))


def test_timeout_kills_the_whole_process_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung repeat becomes a ``timeout`` row; the worker torchrun-style started in its own session dies too."""
    pid_file = tmp_path / "grandchild.pid"
    # The launched command starts a grandchild in a new session (as torchrun starts its workers) and hangs.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(bench.runner, "launch_commands", lambda *a, **k: [[sys.executable, "-c", script]])
    monkeypatch.setattr(bench.runner, "_GRACE_S", 2.0)
    real_kill_tree = bench.runner._kill_tree

    def kill_tree_once_the_grandchild_runs(proc: subprocess.Popen, grace_s: float | None = None) -> None:
        # A short timeout, whatever the load: the kill waits until the tree it must take down has been started.
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the fake worker never started its child")
        real_kill_tree(proc, grace_s=grace_s)

    monkeypatch.setattr(bench.runner, "_kill_tree", kill_tree_once_the_grandchild_runs)
    result = run_config(BenchConfig(release="t"), timeout_s=0.5)
    assert result.status == "timeout" and "timeout" in result.message
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process_running(grandchild):
        time.sleep(0.2)
    assert not process_running(grandchild)


def test_a_terminated_runner_takes_its_workers_and_folders_with_it(tmp_path: Path) -> None:
    """SIGTERM to the runner (a cancelled job): the workers it started die and its temporary folder is removed."""
    pid_file = tmp_path / "grandchild.pid"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    runner = (
        "import sys, bench.runner as r\n"
        "from bench.config import BenchConfig\n"
        "from phi3v_core.entrypoint import handle_errors\n"
        f"r.launch_commands = lambda *a, **k: [[sys.executable, '-c', {hang!r}]]\n"
        "r._GRACE_S = 2.0\n"
        "handle_errors(lambda: r.run_config(BenchConfig(release='t'), timeout_s=600))()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", runner], env={**os.environ, "TMPDIR": str(scratch)})
    try:
        deadline = time.monotonic() + 300
        while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pid_file.exists(), "the fake worker never started"
        time.sleep(0.5)  # the pid is written; let the write finish
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process_running(grandchild):
        time.sleep(0.2)
    assert not process_running(grandchild)
    assert not any(scratch.iterdir())  # phi3v-bench-* removed


def test_cli_run_lora_end_to_end_on_cpu(tmp_path: Path) -> None:
    """`phi3v-bench run --method lora` with a short protocol: real training, timing, memory and FLOPs."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--method", "lora", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--out", str(tmp_path), "--release", "test", "--json"],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == "ok", doc.get("message")
    assert Path(doc["path"]).exists()
    rep = doc["metrics"]["repeats"][0]
    assert len(rep["step_times_s"]) == 2 and all(t > 0 for t in rep["step_times_s"])
    assert rep["step_samples"] == [2, 2]
    mem = rep["memory"][0]
    assert mem["cpu_rss_bytes"] > 100 * 2**20
    assert 0 < mem["cpu_tensor_peak_bytes"] < mem["cpu_rss_bytes"]
    metrics = doc["metrics"]
    assert metrics["images_per_step"] == 2  # tiny default: batch 2, one image per DocVQA-profile sample
    assert metrics["model_flops_per_step"] > 1e9
    assert 0 < metrics["trainable_params"] < metrics["total_params"]


@pytest.mark.slow
def test_two_gpus_every_timed_step_is_a_full_global_batch(tmp_path: Path) -> None:
    """`phi3v-bench run --method lora --gpus 2` (two gloo processes) with 2 accumulation steps per optimizer step:
    every timed step carries the whole global batch, and memory is the maximum over the ranks."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--method", "lora", "--gpus", "2", "--batch-size", "4",
         "--micro-batch", "1", *TINY, "--out", str(tmp_path), "--release", "test", "--json"],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = load_result(json.loads(out.stdout.strip().splitlines()[-1])["path"])
    assert result.status == "ok", result.message
    repeat = result.metrics.repeats[0]
    assert repeat.step_samples == [4, 4]  # 2 ranks × 2 micro-batches of 1, on every timed step
    assert result.metrics.images_per_step == 4
    assert sorted(m.rank for m in repeat.memory) == [0, 1]
    assert result.summary.peak_cpu_rss_bytes == max(m.cpu_rss_bytes for m in repeat.memory)


@pytest.mark.slow
def test_two_node_cluster_run_writes_one_result_from_node_0(tmp_path: Path) -> None:
    """Two `phi3v-bench run --nodes 2 --node-rank R --master-addr 127.0.0.1` invocations, as two cluster nodes run
    them: only node 0 writes a result, and it holds both nodes' ranks (memory = max over all of them)."""
    port = bench.runner._free_port()
    common = [sys.executable, "-m", "bench.cli", "run", "--method", "lora", "--nodes", "2", "--gpus", "1",
              "--batch-size", "2", "--micro-batch", "1", *TINY, "--release", "test", "--json",
              "--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [
        subprocess.Popen([*common, "--node-rank", str(rank), "--out", str(tmp_path / f"node{rank}")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=HANG_GUARD_S) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert not list((tmp_path / "node1").rglob("*.json"))  # node 1 writes nothing
    written = list((tmp_path / "node0").rglob("*.json"))
    assert len(written) == 1
    result = load_result(written[0])
    assert result.status == "ok", result.message
    repeat = result.metrics.repeats[0]
    assert sorted(m.rank for m in repeat.memory) == [0, 1]  # rank 1 ran on "node 1" and reported to rank 0
    assert result.summary.peak_cpu_rss_bytes == max(m.cpu_rss_bytes for m in repeat.memory)
    assert repeat.step_samples == [2, 2]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "2", "--node-rank", "1"], "--master_addr missing"),
        (["--timeout", "0"], "--timeout 0 must be > 0 seconds"),
    ],
)
def test_cluster_flag_errors_are_one_line(flags: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    from bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--batch-size", "4", "--micro-batch", "1", *flags])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_only_node_0_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from bench.cli import main
    from tests.bench.factories import make_result

    calls = []

    def fake_run_config(cfg: BenchConfig, **options: object) -> object:
        calls.append(options)
        return make_result(cfg)

    monkeypatch.setattr(bench.runner, "run_config", fake_run_config)
    base = ["run", "--nodes", "2", "--gpus", "8", "--batch-size", "64", "--master-addr", "gpu01", "--timeout", "99",
            "--json"]
    assert main([*base, "--node-rank", "1", "--out", str(tmp_path / "n1")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["path"] is None
    assert not (tmp_path / "n1").exists()
    assert main([*base, "--node-rank", "0", "--out", str(tmp_path / "n0")]) == 0
    assert Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["path"]).is_file()
    assert calls[0] == {"timeout_s": 99.0, "cluster": ClusterLaunch(2, 1, "gpu01", 29500)}


@pytest.mark.gpu(seconds=20)  # a fresh `phi3v-bench run` of the tiny model
def test_one_gpu_run_maps_nvml_through_a_uuid_cuda_visible_devices(tmp_path: Path) -> None:
    """On a GPU: full steps, allocator peaks, and NVML per-process memory found via a UUID in CUDA_VISIBLE_DEVICES.

    The tiny model in fp32 with LoRA at one crop (tens of MiB by phi3v-plan): passes on an H100, an A100 and a V100.
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": uuid}
    out = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--method", "lora", "--gpus", "1", "--batch-size", "2",
         "--micro-batch", "1", *TINY, "--out", str(tmp_path), "--release", "test", "--json"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = load_result(json.loads(out.stdout.strip().splitlines()[-1])["path"])
    assert result.status == "ok", result.message
    repeat = result.metrics.repeats[0]
    assert repeat.step_samples == [2, 2]
    memory = repeat.memory[0]
    assert memory.gpu_allocated_bytes and memory.gpu_allocated_bytes > 0
    assert memory.nvml_process_bytes is None or memory.nvml_process_bytes >= memory.gpu_reserved_bytes


@pytest.mark.gpu(seconds=2)
def test_loopback_nodes_are_refused_on_a_real_gpu() -> None:
    """Refused before anything starts (no GPU memory used): passes on any card."""
    with pytest.raises(ConfigError, match="same GPUs"):
        run_config(BenchConfig(gpus=1, nodes=2, global_batch=2, release="t"))


def test_worker_nvml_reading_maps_uuid_and_index_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's NVML memory maps CUDA_VISIBLE_DEVICES through ``phi3v_core.nvml`` (UUIDs included)."""
    import types

    import torch

    from bench.measure import nvml_process_reader

    class Proc:
        def __init__(self, pid: int, used: int) -> None:
            self.pid, self.usedGpuMemory = pid, used

    # Physical GPU 1 (UUID GPU-bbb) runs this process with 123 bytes; GPU 0 runs it with 999 (wrong if chosen).
    usage = {0: [Proc(os.getpid(), 999)], 1: [Proc(os.getpid(), 123)]}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: ["GPU-aaa", "GPU-bbb"][h],
        nvmlDeviceGetComputeRunningProcesses=lambda h: usage[h],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    for visible in ("GPU-bbb", "1", "1,0", "GPU-bb"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        reader = nvml_process_reader(torch.device("cuda", 0))
        assert reader.read() == 123, visible
        assert reader.source() == "process"
        reader.close()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0f3c")  # matches no device here: no guess
    assert nvml_process_reader(torch.device("cuda", 0)).read() is None


def test_srun_placement_prefers_scontrols_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho expanded-by-slurm\necho other\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "odd-syntax{1,2}"}
    assert ClusterLaunch.from_slurm(slurm).master_addr == "expanded-by-slurm"


def test_a_partial_optimizer_step_in_the_timed_window_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def payload(rank: int, samples: list[int]) -> dict:
        return {"rank": rank, "status": "ok", "step_times_s": [1.0, 1.0], "warmup_times_s": [1.0], "final_loss": 1.0,
                "step_samples": samples, "images_per_step": 2, "tokens_per_step": 10, "image_tokens_per_step": 4,
                "memory": {"rank": rank, "device": "cpu", "cpu_rss_bytes": 1}}

    def fake_repeat(*args: object) -> RepeatOutcome:
        return RepeatOutcome([payload(0, [2, 2]), payload(1, [2, 1])], "", False, [0])

    monkeypatch.setattr(bench.runner, "_run_repeat", fake_repeat)
    result = run_config(BenchConfig(gpus=2, global_batch=4, micro_batch=1, steps=2, warmup=1, repeats=1, release="t"))
    assert result.status == "error" and "timed step 2 carried 3 of 4 samples" in result.message
    assert result.metrics.repeats[0].step_samples == [4, 3]

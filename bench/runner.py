"""Run one :class:`~bench.config.BenchConfig`: every repeat in fresh processes, aggregated into a ``BenchResult``.

One GPU (or CPU process) runs ``python -m bench.worker``; several GPUs run it under ``torchrun`` (on CPU, ``--gpus 2``
means two gloo processes). Several nodes run in one of two ways:

* **cluster** (:class:`ClusterLaunch`): every node runs ``phi3v-bench run ... --nodes N --node_rank R --master_addr
  HOST``, or one ``phi3v-bench`` per node under SLURM's ``srun`` (read from its variables). Each node starts one
  torchrun agent for its own GPUs with a static rendezvous at ``HOST``; the ranks gather their measurements to rank 0,
  and node 0 writes the one result.
* **loopback**: one command starts every "node" on this machine at 127.0.0.1 — a CPU stand-in for tests. It is
  refused on CUDA, where two agents would map ``LOCAL_RANK`` 0..g−1 onto the same GPUs.

Ranks report separately and are combined honestly: memory is the **maximum over ranks** (what must fit on each GPU),
throughput comes from the **slowest rank's** step time (ranks wait for each other at every step), and workload
counts are **summed** over ranks. Each repeat has a timeout; a timed-out or killed runner takes its workers with it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.pinning import single_process_env
from bench.progress import read_progress
from bench.results import BenchResult, Metrics, RankMemory, RepeatSample, capture_environment, utc_now
from bench.scratch import clean_stale, die_with_parent, owned_tempdir
from bench.status import OOM_MARKERS, RepeatOutcome, classify_repeat, kernel_log_lines, looks_like_oom
from phi3v_core.errors import ConfigError
from phi3v_core.fs import held_lock_fds

__all__ = [
    "DEFAULT_MASTER_PORT",
    "DEFAULT_TIMEOUT_S",
    "FLOP_CACHE_ENV",
    "OOM_MARKERS",
    "ClusterLaunch",
    "first_slurm_host",
    "launch_commands",
    "looks_like_oom",
    "measure_with_progress",
    "run_config",
    "terminate_on_signals",
]

#: Seconds one repeat may run before its processes are killed and the row is recorded as ``timeout``.
DEFAULT_TIMEOUT_S = 3600.0
#: torchrun's own default rendezvous port.
DEFAULT_MASTER_PORT = 29500
# Seconds torchrun gets to stop its workers after SIGTERM before everything is SIGKILLed.
_GRACE_S = 30.0
#: Environment variable naming the folder where a configuration's repeats share their FLOP count
#: (:class:`bench.flop_count.FlopCache`): the first repeat traces, the others read it.
FLOP_CACHE_ENV = "PHI3V_BENCH_FLOP_CACHE"
#: ``progress(repeat, state)``: what :func:`run_config` reports while a repeat runs (see :mod:`bench.progress`).
Progress = Callable[[int, "dict[str, Any] | None"], None]
#: The reporter of the measurement in progress (:func:`measure_with_progress`), for a ``run_config`` without one.
_REPORTER: ContextVar[Progress | None] = ContextVar("phi3v_bench_progress", default=None)


@dataclass(frozen=True)
class ClusterLaunch:
    """Where this node sits in a real multi-node run (one ``phi3v-bench`` per node).

    Attributes:
        nnodes: Nodes in the job (must equal the configuration's ``nodes``).
        node_rank: This node's index, 0..nnodes−1; node 0 writes the result.
        master_addr: Host name or address of node 0, reachable from every node.
        master_port: TCP port of the rendezvous on node 0 (repeat ``i`` uses ``master_port + i``).
    """

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int = DEFAULT_MASTER_PORT

    def problems(self, cfg: BenchConfig) -> list[str]:
        """Every inconsistency with ``cfg`` (empty when fine)."""
        problems = []
        if self.nnodes != cfg.nodes:
            problems.append(f"--nodes {cfg.nodes} but the cluster has {self.nnodes} node(s); pass --nodes {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            problems.append(f"--node_rank {self.node_rank} is outside 0..{self.nnodes - 1}")
        if not self.master_addr:
            problems.append("--master_addr is empty; give node 0's host name or address")
        if not 1 <= self.master_port <= 65535 - max(0, cfg.repeats - 1):
            problems.append(f"--master_port {self.master_port} must be 1..{65535 - max(0, cfg.repeats - 1)}")
        return problems

    @property
    def is_main(self) -> bool:
        """Whether this node collects the result (node 0)."""
        return self.node_rank == 0

    @classmethod
    def from_args(
        cls,
        nodes: int,
        node_rank: int | None,
        master_addr: str | None,
        master_port: int | None,
        environ: Mapping[str, str] | None = None,
    ) -> ClusterLaunch | None:
        """The cluster placement from the command line, else from SLURM (``srun``), else ``None`` (one machine).

        Raises:
            ConfigError: Half-given flags, or a SLURM step that runs more than one ``phi3v-bench`` per node.
        """
        environ = os.environ if environ is None else environ
        if node_rank is not None or master_addr is not None:
            missing = [flag for flag, v in (("--node_rank", node_rank), ("--master_addr", master_addr)) if v is None]
            if missing:
                raise ConfigError(f"{' and '.join(missing)} missing: a cluster node needs both --node_rank and --master_addr")
            return cls(nodes, int(node_rank), str(master_addr), master_port or DEFAULT_MASTER_PORT)  # type: ignore[arg-type]
        if nodes > 1 and "SLURM_NNODES" in environ and "SLURM_NODEID" in environ:
            return cls.from_slurm(environ, master_port)
        return None

    @classmethod
    def from_slurm(cls, environ: Mapping[str, str], master_port: int | None = None) -> ClusterLaunch:
        """Read the placement of an ``srun`` step: one ``phi3v-bench`` task per node.

        Raises:
            ConfigError: More tasks than nodes, or an unreadable node list.
        """
        nnodes = int(environ["SLURM_NNODES"])
        tasks = int(environ.get("SLURM_NTASKS", nnodes))
        if tasks != nnodes:
            raise ConfigError(
                f"SLURM step has {tasks} tasks on {nnodes} nodes; run one phi3v-bench per node "
                "(srun --ntasks-per-node=1), it starts the GPU processes itself"
            )
        node_rank = int(environ["SLURM_NODEID"])
        if "SLURM_PROCID" in environ and int(environ["SLURM_PROCID"]) != node_rank:
            raise ConfigError("SLURM_PROCID differs from SLURM_NODEID; run one phi3v-bench per node (--ntasks-per-node=1)")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
        host = _scontrol_first_host(nodelist) or first_slurm_host(nodelist)
        if not host:
            raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; pass --master_addr")
        if master_port is None:
            # One port per job, so two jobs sharing a node do not collide; the same on every node of the job.
            master_port = DEFAULT_MASTER_PORT + int(environ.get("SLURM_JOB_ID", "0")) % 1000 * 10
        return cls(nnodes, node_rank, host, master_port)


def _scontrol_first_host(nodelist: str) -> str:
    """SLURM's own expansion of the node list (``scontrol show hostnames``), or ``""`` where it cannot run."""
    if not nodelist or shutil.which("scontrol") is None:
        return ""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.strip() for line in out.splitlines() if line.strip()), "")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` → ``gpu03`` (used where ``scontrol`` is absent)."""
    nodelist = nodelist.strip()
    if not nodelist:
        return ""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return ""
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: [03-05] starts at 03
    return prefix + first


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_commands(
    cfg: BenchConfig,
    config_file: Path,
    out_dir: Path,
    python: str = sys.executable,
    cluster: ClusterLaunch | None = None,
    repeat: int = 0,
) -> list[list[str]]:
    """The command line(s) one repeat runs on this machine.

    One process: the worker itself. One node: one torchrun. A cluster node: one torchrun for this node with a static
    rendezvous at ``cluster.master_addr`` (port ``master_port + repeat``, so a node that finishes a repeat early can
    never join the previous repeat's rendezvous). Loopback (no cluster, several nodes): one torchrun per node on
    127.0.0.1.
    """
    worker = ["-m", "bench.worker", "--config", str(config_file), "--out", str(out_dir)]
    if cfg.world_size == 1:
        return [[python, *worker]]

    def torchrun(node_rank: int, addr: str, port: int) -> list[str]:
        return [
            python, "-m", "torch.distributed.run",
            f"--nnodes={cfg.nodes}",
            f"--node_rank={node_rank}",
            f"--nproc_per_node={cfg.gpus}",
            f"--master_addr={addr}",
            f"--master_port={port}",
            *worker,
        ]

    if cluster is not None:
        return [torchrun(cluster.node_rank, cluster.master_addr, cluster.master_port + repeat)]
    port = _free_port()
    return [torchrun(node_rank, "127.0.0.1", port) for node_rank in range(cfg.nodes)]


# -- process lifetime ---------------------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen] = set()


def _kill_tree(proc: subprocess.Popen, grace_s: float | None = None) -> None:
    """Stop a launched command and everything it started.

    SIGTERM first (torchrun then stops its workers, which it runs in sessions of their own), then SIGKILL to the
    process group and to every descendant found before the kill, so that no worker outlives its repeat. ``grace_s``
    (default :data:`_GRACE_S`, read at the call) is the wait between the two.
    """
    grace_s = _GRACE_S if grace_s is None else grace_s
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone: the group kill still runs
        descendants = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None and not any(_alive(p) for p in descendants):
            break
        with _suppress_lookup():
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            for child in descendants:
                with _suppress_lookup():
                    child.kill()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (proc.poll() is None or any(_alive(p) for p in descendants)):
            time.sleep(0.2)
    with _suppress_lookup():
        proc.wait(timeout=5)


def _alive(process: Any) -> bool:
    try:
        return bool(process.is_running()) and process.status() != "zombie"
    except Exception:  # noqa: BLE001 - gone
        return False


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
        pass
    except Exception as exc:  # noqa: BLE001 - psutil.NoSuchProcess and friends
        if type(exc).__name__ not in ("NoSuchProcess", "AccessDenied", "ZombieProcess"):
            raise


def _kill_all_live() -> None:
    for proc in list(_LIVE):
        _kill_tree(proc, grace_s=5.0)
        _LIVE.discard(proc)


atexit.register(_kill_all_live)


def terminate_on_signals() -> Any:
    """The one stop policy of every command (:func:`phi3v_core.signals.stop_on_signals`): SIGTERM/SIGHUP/SIGINT
    raise ``Stopped`` so ``finally`` blocks kill the workers and remove temporary folders."""
    from phi3v_core.signals import stop_on_signals

    return stop_on_signals()


# -- one repeat ---------------------------------------------------------------------------------------------------


def _run_repeat(
    cfg: BenchConfig, timeout_s: float | None, cluster: ClusterLaunch | None, repeat: int, flop_cache: Path | None = None,
    progress: Progress | None = None,
) -> RepeatOutcome:
    """Launch one repeat on this machine; return the rank payloads (all ranks' on node 0 of a cluster).

    ``flop_cache`` is the folder the configuration's repeats share, so the FLOPs are traced by the first only.
    """
    with owned_tempdir("phi3v-bench-") as (tmp_dir, owner):
        return _run_repeat_in(cfg, timeout_s, cluster, repeat, flop_cache, tmp_dir, owner, progress)


def _run_repeat_in(
    cfg: BenchConfig, timeout_s: float | None, cluster: ClusterLaunch | None, repeat: int, flop_cache: Path | None,
    tmp_dir: Path, owner: int, progress: Progress | None = None,
) -> RepeatOutcome:
    """:func:`_run_repeat` in its scratch folder ``tmp_dir``; ``owner`` (its lock) is inherited by the workers."""
    procs: list[subprocess.Popen] = []
    logs = []
    timed_out = False
    launched = time.monotonic()
    config_file = tmp_dir / "config.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    # One process, one GPU: a single process that sees several GPUs is refused by TrainConfig.
    env = single_process_env() if cfg.world_size == 1 else dict(os.environ)
    local_processes = cfg.gpus if cluster is not None else cfg.world_size
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_processes)))
    env["PYTHONUNBUFFERED"] = "1"
    if flop_cache is not None:
        env[FLOP_CACHE_ENV] = str(flop_cache)
    try:
        for i, command in enumerate(launch_commands(cfg, config_file, tmp_dir, cluster=cluster, repeat=repeat)):
            log = open(tmp_dir / f"node{i}.log", "w")  # noqa: SIM115 - closed in finally
            logs.append(log)
            # A session of its own: the whole group can be killed without touching this process.
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    pass_fds=(*held_lock_fds(), owner), preexec_fn=die_with_parent())
            procs.append(proc)
            _LIVE.add(proc)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        _wait_all(procs, deadline, None if progress is None else lambda: progress(repeat, read_progress(tmp_dir)))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for proc in procs:
            if proc.poll() is None or timed_out:
                _kill_tree(proc)  # also on SystemExit/KeyboardInterrupt: no worker outlives the runner
            _LIVE.discard(proc)
        for log in logs:
            log.close()
    wall_s = time.monotonic() - launched
    payloads = _read_payloads(tmp_dir)
    tail = "\n".join((tmp_dir / f"node{i}.log").read_text(errors="replace")[-4000:] for i in range(len(logs)))
    codes = [proc.returncode for proc in procs]
    signalled = [proc.pid for proc in procs if proc.returncode is not None and proc.returncode < 0]
    pids = [int(p) for p in re.findall(r"received by PID (\d+)", tail, re.IGNORECASE)] + signalled
    return RepeatOutcome(payloads, tail, timed_out, codes, wall_s, kernel_log_lines(pids) if not timed_out else "")


def _wait_all(procs: list[subprocess.Popen], deadline: float | None, tick: Callable[[], None] | None) -> None:
    """Wait for every process until ``deadline`` (``TimeoutExpired`` after it), calling ``tick`` twice a second."""
    while any(proc.poll() is None for proc in procs):
        if deadline is not None and time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(procs[0].args, 0)
        if tick is not None:
            tick()
        wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            next(p for p in procs if p.poll() is None).wait(timeout=wait)


def _read_payloads(tmp_dir: Path) -> list[dict[str, Any]]:
    """All ranks' payloads: rank 0's gathered file when present (the only complete one on a cluster), merged with
    the per-rank files of this machine (which also cover ranks that failed before the gather)."""
    by_rank: dict[int, dict[str, Any]] = {}
    gathered = tmp_dir / "gathered.json"
    if gathered.is_file():
        for payload in json.loads(gathered.read_text()):
            by_rank[int(payload["rank"])] = payload
    for path in sorted(tmp_dir.glob("rank*.json")):
        payload = json.loads(path.read_text())
        if payload.get("status") != "ok" or int(payload["rank"]) not in by_rank:
            by_rank[int(payload["rank"])] = payload
    return [by_rank[rank] for rank in sorted(by_rank)]


def _refuse_loopback_on_cuda(cfg: BenchConfig, cluster: ClusterLaunch | None) -> None:
    if cluster is not None or cfg.nodes == 1:
        return
    import torch

    if torch.cuda.is_available():
        raise ConfigError(
            f"--nodes {cfg.nodes} on one machine would map every node's ranks onto the same GPUs; on a cluster run "
            "`phi3v-bench run ... --nodes N --node_rank R --master_addr HOST` on each node, or one task per node "
            "under srun (see README: Benchmarking on a cluster)"
        )


def run_config(
    cfg: BenchConfig,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    cluster: ClusterLaunch | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Measure one configuration (``cfg.repeats`` fresh launches) and return the result; failures become rows.

    On a cluster every node calls this with its own :class:`ClusterLaunch`; only node 0's result holds the
    measurements (the other nodes return a result whose message says so, and should not save it).

    Args:
        cfg: A validated configuration.
        timeout_s: Kill a repeat (every process it started) that runs longer than this; ``None`` waits forever.
        cluster: This node's place in a multi-node job; ``None`` runs everything on this machine.
        progress: Called as ``progress(repeat, state)`` while a repeat runs (state: the worker's
            :func:`~bench.progress.read_progress`, ``{"phase": "done"}`` when it ended).

    Raises:
        ConfigError: The cluster placement does not fit ``cfg``, or loopback nodes were asked for on CUDA.
    """
    cfg.validate()
    if cluster is not None and (problems := cluster.problems(cfg)):
        raise ConfigError("; ".join(problems))
    _refuse_loopback_on_cuda(cfg, cluster)
    started = utc_now()
    clock = time.monotonic()
    environment = capture_environment()
    metrics = Metrics()
    clean_stale()  # what earlier SIGKILLed measurements left in the temp folder (said on stderr)
    with owned_tempdir("phi3v-bench-flops-") as (flop_cache, _), terminate_on_signals():
        progress = progress or _REPORTER.get()
        result = _run_repeats(cfg, timeout_s, cluster, environment, metrics, started, flop_cache, progress)
    result.metrics.wall_s = time.monotonic() - clock
    return result


def measure_with_progress(cfg: BenchConfig, cluster: ClusterLaunch | None, timeout_s: float | None,
                          live: bool = False) -> BenchResult:
    """:func:`run_config` with repeat i/N, step j/M and an ETA on stderr (a bar when ``live`` on a terminal, plain
    lines otherwise); ``timeout_s``/``cluster`` None keep run_config's defaults."""
    from bench.progress import RunProgress

    options = {name: value for name, value in (("timeout_s", timeout_s), ("cluster", cluster)) if value is not None}
    with RunProgress(cfg.repeats, live=live) as progress:
        token = _REPORTER.set(progress.update)  # not an argument: callers that stand in for run_config take cfg only
        try:
            return run_config(cfg, **options)
        finally:
            _REPORTER.reset(token)


def _run_repeats(
    cfg: BenchConfig,
    timeout_s: float | None,
    cluster: ClusterLaunch | None,
    environment: Any,
    metrics: Metrics,
    started: str,
    flop_cache: Path,
    progress: Progress | None = None,
) -> BenchResult:
    """Every repeat of :func:`run_config`, one after another; the first failure ends the run as a result row."""
    for index in range(cfg.repeats):
        repeat = _run_repeat(cfg, timeout_s, cluster, index, flop_cache, progress)
        if progress is not None:
            progress(index, {"phase": "done"})
        failure = classify_repeat(repeat, timeout_s)
        if failure is not None:
            status, message, step = failure
            result = BenchResult.failure(cfg, status, message, environment, failed_at_step=step, started_at=started)
            result.metrics = metrics  # keep the repeats that did finish
            return result
        if cluster is not None and not cluster.is_main:
            continue  # this node's ranks reported to rank 0, on node 0
        ranks = sorted(repeat.payloads, key=lambda p: p["rank"])
        if len(ranks) != cfg.world_size:
            return BenchResult.failure(
                cfg, "error", f"{len(ranks)} of {cfg.world_size} ranks reported", environment, started_at=started
            )
        _add_repeat(metrics, ranks, repeat.wall_s)
        partial = [(i, n) for i, n in enumerate(metrics.repeats[-1].step_samples, 1) if n != cfg.global_batch]
        if partial:
            # A timed step must be a whole optimizer step; anything else would inflate or deflate img/s.
            step, samples = partial[0]
            message = f"timed step {step} carried {samples} of {cfg.global_batch} samples (a partial optimizer step)"
            result = BenchResult.failure(cfg, "error", message, environment, started_at=started)
            result.metrics = metrics
            return result
    if cluster is not None and not cluster.is_main:
        # Nothing to save here: this node's ranks reported to rank 0 (see ``ClusterLaunch.is_main``).
        return BenchResult(
            config=cfg,
            environment=environment,
            message=f"node {cluster.node_rank} done; node 0 ({cluster.master_addr}) writes the result",
            started_at=started,
            finished_at=utc_now(),
        )
    return BenchResult(config=cfg, environment=environment, metrics=metrics, started_at=started, finished_at=utc_now())


def _add_repeat(metrics: Metrics, ranks: list[dict[str, Any]], wall_s: float | None = None) -> None:
    """Combine the ranks of one repeat into ``metrics``."""
    # Ranks synchronise every step, so the step took as long as its slowest rank.
    step_times = [max(times) for times in zip(*(p["step_times_s"] for p in ranks))]
    warmup = [max(times) for times in zip(*(p["warmup_times_s"] for p in ranks))]
    memory = [RankMemory(**p["memory"]) for p in ranks]
    # Samples each timed optimizer step consumed over all ranks (the global batch when the workload is right).
    step_samples = [sum(counts) for counts in zip(*(p.get("step_samples") or [] for p in ranks))]
    metrics.repeats.append(
        RepeatSample(
            step_times_s=step_times,
            warmup_times_s=warmup,
            memory=memory,
            final_loss=ranks[0]["final_loss"],
            step_samples=step_samples,
            wall_s=wall_s,
            # Every rank sees the same overflow (the scaler checks the all-reduced gradients): the maximum is exact.
            skipped_steps=max((p.get("skipped_steps") or 0) for p in ranks),
            skipped_timed_steps=sorted({i for p in ranks for i in p.get("skipped_timed_steps") or []}),
            # every rank holds the same weights after a step (DDP, ZeRO-2 all-gathers): rank 0's sample stands
            weight_change=ranks[0].get("weight_change"),
            learning_rate=ranks[0].get("learning_rate"),
            data_wait_s=[max(waits) for waits in zip(*(p.get("data_wait_s") or [] for p in ranks))],
            # the slowest rank's compile held every rank back
            compile_s=max((p["compile_s"] for p in ranks if p.get("compile_s") is not None), default=None),
        )
    )
    rates = [p["processor_samples_per_s"] for p in ranks if p.get("processor_samples_per_s")]
    if rates and metrics.processor_samples_per_s is None:
        metrics.processor_samples_per_s = rates[0]
    metrics.images_per_step = sum(p["images_per_step"] or 0 for p in ranks)
    metrics.tokens_per_step = sum(p["tokens_per_step"] or 0 for p in ranks)
    computed = [p.get("computed_tokens_per_step") for p in ranks]
    if all(c is not None for c in computed):
        metrics.computed_tokens_per_step = sum(computed)
        metrics.real_tokens_per_step = sum(p.get("real_tokens_per_step") or 0 for p in ranks)
    metrics.image_tokens_per_step = sum(p["image_tokens_per_step"] or 0 for p in ranks)
    # Counted on rank 0 only: every rank runs the same micro-batch shapes (one sequence length per profile), so the
    # step's FLOPs over all ranks are rank 0's times the world size.
    flops, hw_flops = ranks[0].get("flops_per_step"), ranks[0].get("hardware_flops_per_step")
    metrics.model_flops_per_step = float(flops) * len(ranks) if flops is not None else None
    metrics.hardware_flops_per_step = float(hw_flops) * len(ranks) if hw_flops is not None else None
    attention = ranks[0].get("attention_flops_per_step")
    metrics.attention_flops_per_step = float(attention) * len(ranks) if attention is not None else None
    metrics.peak_flops_per_gpu = ranks[0].get("peak_flops_per_gpu")
    metrics.total_params = ranks[0].get("total_params")
    metrics.trainable_params = ranks[0].get("trainable_params")

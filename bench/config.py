"""What one benchmark run measures: the typed ``BenchConfig`` every ``phi3v-bench`` command maps onto.

A config has two kinds of fields:

* **identity fields** (method, attention, precision, model, crops, sequence profile, batch layout, GPUs, nodes,
  gradient checkpointing) decide *what* is measured. Two results with the same identity are the same experiment,
  so ``compare`` matches on them and the sweep names result files after them (:meth:`BenchConfig.cell_id`);
* **protocol fields** (steps, warmup, repeats, seed) and **output fields** (release, out) decide *how long / where*
  and never split a comparison.

``validate()`` reports every problem at once, before anything touches a GPU or writes a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.lever_args import lever_suffixes
from phi3v_core.constants import (
    MAX_NUM_CROPS,
    SeqProfile,
    load_recipe,
    supports_bf16,
    supports_flash_attention,
)
from phi3v_core.errors import ConfigError, raise_all
from phi3v_core.workload import Workload

__all__ = [
    "FLOPS_MODES",
    "IDENTITY_FIELDS",
    "MAX_NUM_CROPS",
    "SEQ_PROFILES",
    "FIELD_ALIASES",
    "BenchConfig",
    "SeqProfile",
    "canonical_field",
    "default_release",
    "parse_field_value",
]

_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: Synthetic sample shapes by task (the recipe data file's sequence profiles; :class:`SeqProfile` says what a field
#: means and where each number comes from).
SEQ_PROFILES: dict[str, SeqProfile] = load_recipe().profiles

#: Fields that decide what is measured; used for matching results and naming result files.
IDENTITY_FIELDS: tuple[str, ...] = (
    "method",
    "attn",
    "precision",
    "model",
    "num_crops",
    "seq_profile",
    "global_batch",
    "micro_batch",
    "gpus",
    "nodes",
    "gradient_checkpointing",
    "optim",
    "offload",
    "packing",
    "pack_tokens",
    "checkpoint_towers",
    "freeze_llm",
    "kernels",
    "compile",
)

#: Field names of older releases (result files, ``--set``/``--grid`` keys) and the names they now have.
FIELD_ALIASES: dict[str, str] = {"batch_size": "global_batch", "attention": "attn"}


def canonical_field(name: str) -> str:
    """The current name of BenchConfig field ``name`` (old names such as ``batch_size`` map to ``global_batch``)."""
    return FIELD_ALIASES.get(name, name)

#: How ``phi3v-bench run`` counts FLOPs (``--flops``).
FLOPS_MODES: tuple[str, ...] = ("analytic", "trace")

_ATTN_SHORT = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "fa2"}


def default_release() -> str:
    """Return the default release label, ``v<installed phi3v-bench version>``."""
    try:
        return "v" + metadata.version("phi3v-bench")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "dev"


#: Folder names under a results root that hold the planner's data, not results: never a release.
RESERVED_RELEASES = ("reference", "validation")


@dataclass(frozen=True)
class BenchConfig(Workload):
    """One benchmark configuration (the flags of ``phi3v-bench run``): the :class:`Workload` it trains (method,
    attention, precision, model, crops, profile, batch layout, levers, packing; their meaning is documented there)
    plus where and how long it runs.

    ``global_batch`` was ``batch_size`` in results written before v0.2 (still read); ``learning_rate``,
    ``vision_lr`` and ``projector_lr`` are protocol fields (not in the identity): they do not change the step time,
    but decide how many weights a step changes (reported).

    Attributes:
        gpus: GPUs per node.
        nodes: Number of nodes.
        steps: Timed optimizer steps per repeat (after the warmup).
        warmup: Untimed optimizer steps before the timed ones (compilation, allocator growth, Adam state creation).
        repeats: Fresh processes per configuration; ``compare`` needs at least 3 on each side to call a change.
        layout: Where micro-batch, checkpointing, optimizer and offload came from: ``plan`` (phi3v-plan's layout
            for the card and method, the default on a GPU) or ``recipe`` (the seed's; results written before the
            choice existed measured it). Not an identity field: the layout's fields are.
        release: Release label of the results folder (``results/<release>/<hardware>/``).
        out: Root folder for result files.
        flops: How MFU's FLOPs are counted: ``analytic`` (:mod:`phi3v_core.flops`, from the shapes, milliseconds)
            or ``trace`` (the step replayed on fake tensors under ``FlopCounterMode``, 1.5-3 CPU-minutes for the
            full-size model; kept to check the analytic count). Both give the same numbers (a test pins them); not
            part of the identity. ``compile`` runs also report the first warmup step as ``compile_s``.
    """

    gpus: int = 1
    nodes: int = 1
    steps: int = 10
    warmup: int = 3
    repeats: int = 3
    layout: str = "recipe"
    release: str = field(default_factory=default_release)
    out: str = "results"
    flops: str = "analytic"

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Old name of :attr:`global_batch` (read-only; kept for callers written before the rename)."""
        return self.global_batch

    @property
    def world_size(self) -> int:
        """Total number of GPUs (ranks)."""
        return self.gpus * self.nodes

    @property
    def grad_accum(self) -> int:
        """Micro-steps per optimizer step on each rank."""
        return self.global_batch // (self.world_size * self.micro_batch)

    @property
    def images_per_step(self) -> int:
        """Images processed per optimizer step, over all ranks."""
        return self.global_batch * self.profile.images_per_sample

    def identity(self) -> dict[str, Any]:
        """Return the identity fields (what is measured) as a dict; equal identities are comparable results."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def cell_id(self) -> str:
        """Return a stable, readable file stem naming this configuration's identity.

        Example: ``lora-sdpa-bf16-tiny-c16-docvqa-b8-mb1-1n1g-gc``. A model given as a path is named after its folder
        plus a short hash of the full path, so two folders with the same name do not overwrite each other.
        """
        model = self.model
        if "/" in model or "\\" in model or model.startswith("."):
            digest = hashlib.sha1(model.encode()).hexdigest()[:6]
            model = f"{Path(model).name or 'model'}-{digest}"
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", model)
        return "-".join(
            [
                self.method,
                _ATTN_SHORT.get(self.attn, self.attn),
                self.precision,
                model,
                f"c{self.num_crops}",
                self.seq_profile,
                f"b{self.global_batch}",
                f"mb{self.micro_batch}",
                f"{self.nodes}n{self.gpus}g",
                "gc" if self.gradient_checkpointing else "nogc",
                # only when not the defaults, so the names of earlier results stay
                *([self.optim] if self.optim != "adamw" else []),
                *([f"offload-{self.offload}"] if self.offload != "none" else []),
                *([f"pack{self.pack_tokens or ''}"] if self.packing else []),
                *lever_suffixes(self),
            ]
        )

    def replace(self, **changes: Any) -> BenchConfig:
        """Return a copy with ``changes`` applied (no validation)."""
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Return every problem with this config (empty when valid), each naming the field and the fix."""
        problems: list[str] = []

        def choice(name: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
            if value not in allowed:
                problems.append(f"{name} {value!r} is not one of {', '.join(allowed)}")

        problems.extend(Workload.problems(self))
        choice("flops", self.flops, FLOPS_MODES)
        choice("layout", self.layout, ("plan", "recipe"))
        for name in ("gpus", "nodes", "steps", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            problems.append(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if isinstance(self.steps, int) and 1 <= self.steps < 2:
            problems.append("steps must be >= 2 so that a step-time spread exists; use --steps 10")
        if self.compile is True and isinstance(self.warmup, int) and self.warmup < 1:
            problems.append("compile needs warmup >= 1: the first step compiles and must not be timed; use --warmup 2")

        ints_ok = all(
            isinstance(getattr(self, n), int) and getattr(self, n) >= 1 for n in ("global_batch", "micro_batch", "gpus", "nodes")
        )
        if ints_ok and self.global_batch % (self.world_size * self.micro_batch):
            problems.append(
                f"global_batch {self.global_batch} is not a multiple of gpus*nodes*micro_batch = "
                f"{self.gpus}*{self.nodes}*{self.micro_batch} = {self.world_size * self.micro_batch}; "
                "pick a batch size that divides evenly"
            )
        if not isinstance(self.release, str) or not _SLUG_RE.match(self.release):
            problems.append(f"release {self.release!r} must be letters, digits, '.', '_' or '-' (e.g. v0.2.0)")
        elif self.release in RESERVED_RELEASES:
            problems.append(
                f"release {self.release!r} is reserved (report and compare read <out>/{self.release}/ as the "
                "planner's own data, not results); choose another name, e.g. v0.2.0"
            )
        if not isinstance(self.out, str) or not self.out:
            problems.append("out must be a folder path (e.g. results)")
        return problems

    def training_problems(self) -> list[str]:
        """What the worker's whole-config check (``TrainConfig.problems``) refuses in this cell's settings, on a
        machine that has every GPU and package the cell asks for: one rule for ``run`` and each ``matrix`` cell,
        applied before any measurement (offload with LoRA, offload with 8-bit AdamW, ...). Imports torch."""
        if self.problems():
            return []  # the field problems are reported first
        from phi3v_core.fs import model_folder_problems

        if Path(self.model).is_dir() and model_folder_problems(Path(self.model), "--model"):
            return []  # the preflight names what is wrong with the folder itself (model type, weight headers)
        from phi3v_core.training.machine import Machine
        from phi3v_core.training.workload import to_train_config

        ideal = Machine(cuda=True, capability=(9, 0), device_count=self.gpus, world_size=self.world_size, flash_attn=True)
        return to_train_config(self, "unused", self.steps + self.warmup).problems(ideal)

    def validate(self) -> BenchConfig:
        """Raise one :class:`ConfigError` listing every problem; return ``self`` when valid."""
        raise_all(self.problems())
        return self

    # ---- (de)serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return all fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchConfig:
        """Build a config from a dict; unknown keys are an error (missing keys take their defaults).

        Old field names (:data:`FIELD_ALIASES`, e.g. ``batch_size`` in results of v0.1) are read as their new names.

        Raises:
            ConfigError: A key is not a BenchConfig field, or a field is given under both its old and new name.
        """
        clashes = [old for old, new in FIELD_ALIASES.items() if old in values and new in values]
        if clashes:
            raise ConfigError(f"config gives both {', '.join(clashes)} and its new name; keep only the new one")
        values = {canonical_field(k): v for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def parse_field_value(name: str, text: str) -> Any:
    """Convert the command-line text ``text`` for BenchConfig field ``name`` to the field's type.

    Args:
        name: A BenchConfig field name.
        text: The value as typed (``"4"``, ``"true"``, ``"lora"``).

    Returns:
        The converted value.

    Raises:
        ConfigError: Unknown field name (with a close match when there is one) or a value of the wrong type.
    """
    import difflib

    name = canonical_field(name)
    types = {f.name: f.type for f in dataclasses.fields(BenchConfig)}
    if name not in types:
        close = difflib.get_close_matches(name, list(types), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(types)}"
        raise ConfigError(f"unknown config field {name!r}{hint}")
    kind = types[name]
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected an integer") from None
    if kind == "int | None":
        if text.strip().lower() in ("", "none", "default"):
            return None
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected an integer or none") from None
    if kind == "float | None":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected a number such as 5e-6") from None
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={text!r}: expected true or false")
    return text


# ---------------------------------------------------------------------------------------------------------------
# defaults that fit the machine
# ---------------------------------------------------------------------------------------------------------------
#: The tiny model on a 2-core CPU: the DocVQA profile scaled down (1 crop instead of 16: 379 tokens) and a short
#: protocol, so that `phi3v-bench run --method lora` finishes in well under a minute. Explicit flags always win.
TINY_DEFAULTS: dict[str, Any] = {"num_crops": 1, "global_batch": 2, "micro_batch": 2, "steps": 3, "warmup": 1,
                                 "repeats": 3}


@dataclass(frozen=True)
class DeviceDescription:
    """What the defaults depend on, read without initialising CUDA in the parent process.

    Attributes:
        gpu_name: Name of the first GPU, ``None`` on a CPU-only machine.
        compute_capability: ``(major, minor)`` of that GPU.
        flash_attn_installed: Whether the flash-attn package can be imported.
    """

    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    flash_attn_installed: bool = False

    @classmethod
    def detect(cls, environment: Any = None) -> DeviceDescription:
        """Describe this machine from :func:`phi3v_core.environment.capture_environment` (NVML; no CUDA context)."""
        if environment is None:
            from phi3v_core.environment import capture_environment

            environment = capture_environment()
        if not environment.gpus:
            return cls()
        major, minor = (int(x) for x in environment.gpus[0].compute_capability.split("."))
        return cls(environment.gpus[0].name, (major, minor), _flash_attn_importable())


    @classmethod
    def from_nvml(cls) -> DeviceDescription:
        """This machine from NVML alone (no torch import, flash-attn only looked up): for checking flags at once."""
        from phi3v_core.nvml import visible_devices

        report = visible_devices()
        devices = report.devices if report.error is None else []
        if not devices:
            return cls()
        flash = importlib.util.find_spec("flash_attn") is not None
        return cls(devices[0].name, tuple(devices[0].compute_capability or (0, 0)), flash)  # type: ignore[arg-type]


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build (ABI mismatch) is as good as absent
        return False
    return True


def choose_defaults(device: DeviceDescription, model: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Defaults for the flags a user did not pass, and one reason per choice.

    With a GPU: the full-size ``phi-3.5-vision`` (random weights unless ``model`` is given), the DocVQA profile at
    16 crops, bf16 on compute capability >= 8.0 else fp16, flash_attention_2 when flash-attn imports on >= 8.0 else
    sdpa. On a CPU: the tiny model with :data:`TINY_DEFAULTS` and fp32. ``model="tiny"`` always gets the tiny
    protocol.

    Args:
        device: The machine.
        model: The ``--model`` the user passed, if any.

    Returns:
        ``(values, reasons)``: BenchConfig field values and human-readable reasons, in card order.
    """
    values: dict[str, Any] = {}
    reasons: list[str] = []
    if device.gpu_name is None:
        values["model"] = model or "tiny"
        if model is None:
            reasons.append("model tiny: no CUDA GPU here, and the full-size model would take hours on a CPU")
        values["precision"] = "fp32"
        values["attn"] = "sdpa"
        reasons.append("precision fp32, attn sdpa: CPU")
    else:
        cc = device.compute_capability or (0, 0)
        bf16 = supports_bf16(cc)
        flash_capable = supports_flash_attention(cc)
        values["model"] = model or "phi-3.5-vision"
        if model is None:
            reasons.append(f"model phi-3.5-vision (random weights; --model PATH for real ones): a CUDA GPU "
                           f"({device.gpu_name}) is here, and only the full-size model tells what it can do")
        values["seq_profile"] = "docvqa"
        values["num_crops"] = 16
        reasons.append("profile docvqa at 16 crops: the seed recipe's benchmark setting")
        values["precision"] = "bf16" if bf16 else "fp16"
        reasons.append(f"precision {values['precision']}: compute capability {cc[0]}.{cc[1]} "
                       f"{'>= 8.0 has' if bf16 else '< 8.0 lacks'} bf16 tensor cores")
        if flash_capable and device.flash_attn_installed:
            values["attn"] = "flash_attention_2"
            reasons.append("attn flash_attention_2: flash-attn imports and the GPU is >= 8.0")
        else:
            values["attn"] = "sdpa"
            why = "flash-attn is not installed" if flash_capable else "flash-attn 2 needs compute capability >= 8.0"
            reasons.append(f"attn sdpa: {why}")
    if values["model"] == "tiny":
        values.update(TINY_DEFAULTS)
        reasons.append("tiny protocol: " + ", ".join(f"{k} {v}" for k, v in TINY_DEFAULTS.items()))
    return values, reasons

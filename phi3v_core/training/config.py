"""``TrainConfig``: every knob of a fine-tuning run, with up-front validation of the whole combination.

Defaults follow the recipe (the Phi-3CookBook vision fine-tuning scripts (microsoft/Phi-3CookBook, code/03.Finetuning/vision_finetuning/): argparse defaults and TrainingArguments) unless noted: lr 4e-5, weight decay 0.01, AdamW β=(0.9, 0.95),
ε=1e-7, clip 1.0, linear schedule with 50 warmup steps, global batch 16, LoRA r=64 / α-ratio 2 / dropout 0,
gradient checkpointing with ``use_reentrant=False``. Deviations are documented on the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3v_core.constants import (
    ATTN_NAMES,
    DEFAULT_ATTN,
    EIGHT_BIT_OPTIMS,
    MAX_NUM_CROPS,
    MODEL_PRESET_NAMES,
    OFFLOAD_NAMES,
    OPTIM_NAMES,
    PRECISION_NAMES,
    ZERO_BUCKET_ELEMENTS,
    is_model_preset,
    supports_bf16,
    supports_flash_attention,
)
from phi3v_core.errors import ConfigError, did_you_mean, raise_all
from phi3v_core.fs import model_folder_problems
from phi3v_core.methods import METHODS, get_method
from phi3v_core.software import qlora_unsupported_reason
from phi3v_core.training.distributed_env import distributed_env_problems
from phi3v_core.training.machine import Machine

if TYPE_CHECKING:
    import torch

    from phi3v_core.methods import MethodOptions

__all__ = [
    "DEPRECATED_FIELDS",
    "DTYPES",  # noqa: F822 - built on first use by __getattr__ below (PEP 562)
    "TrainConfig",
]


@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    import torch  # on first use: this module is imported before torch by the commands' first validation

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # precision name -> torch dtype, built when first asked (PEP 562)
        return _dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Old field name → current one. Accepted by :meth:`TrainConfig.from_dict` only (not the constructor), so
#: ``train_config.json`` / ``run.json`` files written before the rename keep loading.
DEPRECATED_FIELDS: dict[str, str] = {"per_device_batch": "micro_batch"}


@dataclass
class TrainConfig:
    """One fine-tuning run.

    Attributes:
        model: Preset name (``tiny``, ``phi-3.5-vision``, ``phi-3-vision``: random init, for benchmarks and tests) or
            a local checkpoint folder with weights (loaded with ``from_pretrained``).
        method: ``full``, ``frozen_vision``, ``lora`` or ``qlora``.
        precision: ``bf16`` / ``fp16`` (mixed precision: fp32 master weights for everything that trains, autocast,
            dynamic loss scaling for fp16) or ``fp32``. Frozen LoRA/QLoRA bases are stored in the 16-bit dtype.
        attn: ``eager``, ``sdpa`` or ``flash_attention_2`` (the recipe uses eager or FA2, never sdpa).
        num_crops: HD crops per image for the processor (1–16; recipe default 16). Used where the run builds its
            own data (launch entry point); ``train()`` takes already-encoded datasets.
        micro_batch: Examples per forward/backward on each process (the recipe's ``--batch_size_per_gpu``;
            ``per_device_batch`` in configs saved before the rename, which still load).
        global_batch: Effective batch per optimizer step = micro-batch × processes × accumulation (the recipe's
            ``--batch_size``); must divide evenly.
        max_steps: Optimizer steps; ``-1`` trains ``num_train_epochs`` epochs instead.
        num_train_epochs: Epochs when ``max_steps == -1``.
        learning_rate: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (the recipe's ``--wd``).
        warmup_steps: Linear warmup steps (fixed count, like the recipe).
        lr_scheduler: transformers scheduler name (recipe: ``linear``).
        adam_beta1: AdamW β1.
        adam_beta2: AdamW β2 (recipe: 0.95).
        adam_epsilon: AdamW ε (recipe: 1e-7).
        max_grad_norm: Gradient clipping norm (0 disables).
        lora_rank: LoRA rank (``lora``/``qlora``).
        lora_alpha_ratio: ``lora_alpha = round(rank * ratio)``.
        lora_dropout: LoRA dropout.
        lora_lm_head: Adapt ``lm_head`` too (the recipe does).
        freeze_vision: ``lora``/``qlora``: no adapters on CLIP and the projector. For full fine-tuning with a
            frozen image path use ``method="frozen_vision"``.
        gradient_checkpointing: Non-reentrant activation checkpointing (recipe: on).
        checkpoint_towers: Where checkpointing applies when on: ``both`` (decoder and CLIP layers), ``llm`` or
            ``vision`` (:mod:`phi3v_core.towers`).
        vision_lr: Learning rate of the CLIP tower (None: ``learning_rate``); its own optimizer parameter group.
        projector_lr: Learning rate of the image projector and separators (None: ``learning_rate``).
        freeze_llm: Freeze the language model after the method (train the image path with the LM frozen).
        kernels: ``none`` or ``liger`` (Liger's Triton kernels in the decoder, :mod:`phi3v_core.kernels`; GPU only).
        compile: ``torch.compile`` the model (the Trainer's ``torch_compile``).
        output_dir: Checkpoints, trainer state and the final model/adapter go here.
        save_steps: Save a resumable checkpoint every N optimizer steps (0 = only the final save; the recipe
            cannot checkpoint at all).
        save_total_limit: Keep at most this many checkpoints (``None`` keeps all).
        save_final: Write the final model (full) or adapter (LoRA) to ``output_dir``.
        resume: ``None`` (fresh run), ``"latest"`` (newest complete ``checkpoint-N`` in ``output_dir``, or a fresh
            start when there is none, so a restarted job just works) or a checkpoint folder.
        seed: Seed for weights init (presets), data order and dropout.
        deterministic: Use deterministic algorithms (``torch.use_deterministic_algorithms``); slower on GPU.
        deepspeed: ZeRO-2 via DeepSpeed: ``None`` = on for full/frozen_vision with more than one process (as the
            recipe), ``True``/``False`` to force. Not available for lora/qlora (the recipe uses DDP there).
        zero_reduce_bucket_size: ZeRO-2 ``reduce_bucket_size`` in elements. Default 5e7, not the recipe's 5e8
            (:data:`phi3v_core.constants.ZERO_BUCKET_ELEMENTS` says why).
        zero_allgather_bucket_size: ZeRO-2 ``allgather_bucket_size`` in elements (default 5e7, see above).
        zero_overlap_comm: Overlap gradient reduction with backward (recipe: on).
        logging_steps: Log every N steps (1 gives exact per-step losses to callbacks and ``TrainResult``).
        report_to: ``none``, ``tensorboard`` (event files in ``output_dir/runs``) or ``wandb``, as TrainingArguments.
        deepspeed_config_file: A user's DeepSpeed JSON config passed to the Trainer instead of the built-in ZeRO-2.
        dataloader_num_workers: DataLoader worker processes (recipe: 4; use 0 for tiny CPU runs).
        ddp_find_unused_parameters: Let DDP search for parameters without gradient each step. Off, like the recipe
            (dead CLIP weights are frozen); turn on for data with text-only batches while vision weights train.
        ddp_timeout: Seconds before a collective times out.
        disable_tqdm: Hide the progress bar.
        supervised_logits_only: Compute ``lm_head`` logits only from the first supervised position of each
            micro-batch on (``logits_to_keep``). Same loss and gradients; skips the fp32 vocabulary projection over
            the prompt and image placeholders, which dominates compute on small models and costs
            ~4 B × 32064 per prompt token of memory on the real one. Off by default: the recipe pays that cost.
        optim: ``adamw`` (torch AdamW, the recipe's), ``adamw_8bit`` (bitsandbytes 8-bit AdamW: m and v in one byte
            each, blockwise-quantised; full/frozen_vision then store the weights in the 16-bit ``precision`` when it
            is bf16, with no fp32 master copy), ``paged_adamw_8bit`` (the same with states in CUDA unified memory
            that pages to the host under memory pressure; CUDA only) or ``adamw_8bit_fp32_master`` (bitsandbytes
            8-bit AdamW on fp32 weights: 10 bytes per parameter instead of 16, and small steps are kept — bf16
            weights lose most steps at full fine-tuning rates, see :attr:`update_retention`).
        offload: ``none`` or ``optimizer``: DeepSpeed ZeRO-2 keeps the fp32 master weights and AdamW states in host
            memory and steps them with DeepSpeed's CPU Adam (full/frozen_vision; DeepSpeed turns on even for one
            process). The GPU keeps the 16-bit weights and gradients; every step moves gradients and weights over PCIe.
        packing: Pack each micro-batch's samples, with their images, into rows of ``pack_tokens``
            (:mod:`phi3v_core.processing.packing`): the same losses and gradients as padding, fewer padded tokens.
        pack_tokens: Tokens per packed row; ``None`` = the micro-batch's longest sample.
    """

    model: str = "tiny"
    method: str = "lora"
    precision: str = "bf16"
    attn: str = DEFAULT_ATTN
    num_crops: int = MAX_NUM_CROPS
    micro_batch: int = 1
    global_batch: int = 16
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 4e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    lr_scheduler: str = "linear"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-7
    max_grad_norm: float = 1.0
    lora_rank: int = 64
    lora_alpha_ratio: float = 2.0
    lora_dropout: float = 0.0
    lora_lm_head: bool = True
    freeze_vision: bool = False
    gradient_checkpointing: bool = True
    checkpoint_towers: str = "both"
    vision_lr: float | None = None
    projector_lr: float | None = None
    freeze_llm: bool = False
    kernels: str = "none"
    compile: bool = False
    output_dir: str = "output"
    save_steps: int = 0
    save_total_limit: int | None = None
    save_final: bool = True
    resume: str | None = None
    seed: int = 42
    deterministic: bool = False
    deepspeed: bool | None = None
    zero_reduce_bucket_size: int = ZERO_BUCKET_ELEMENTS
    zero_allgather_bucket_size: int = ZERO_BUCKET_ELEMENTS
    zero_overlap_comm: bool = True
    logging_steps: int = 1
    report_to: str = "none"
    deepspeed_config_file: str | None = None
    dataloader_num_workers: int = 4
    ddp_find_unused_parameters: bool = False
    ddp_timeout: int = 1800
    disable_tqdm: bool = False
    supervised_logits_only: bool = False
    optim: str = "adamw"
    offload: str = "none"
    packing: bool = False
    pack_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried into ``train_config.json`` (e.g. the data source); not read by training."""

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        """Build from a plain dict, rejecting unknown keys (all of them at once).

        Deprecated field names (:data:`DEPRECATED_FIELDS`) are accepted, so older JSON configs load.

        Raises:
            ConfigError: Unknown keys, or an old and a new name for the same field.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(DEPRECATED_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown TrainConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**_renamed_fields(values, where))

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Read a JSON object of TrainConfig fields.

        Raises:
            ConfigError: Unreadable JSON, not an object, or unknown keys.
        """
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields")
        return cls.from_dict(values, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    # -- derived values ----------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """Autocast / QLoRA matmul dtype."""
        return _dtypes()[self.precision]

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process: global / (micro-batch × world size)."""
        return max(1, self.global_batch // (self.micro_batch * world_size))

    def uses_deepspeed(self, world_size: int) -> bool:
        """Resolve ``deepspeed=None`` (auto): on for full/frozen_vision when more than one process trains."""
        if self.deepspeed is not None:
            return self.deepspeed
        if self.offload == "optimizer":
            return True  # the offload is DeepSpeed's
        return get_method(self.method).supports_deepspeed and world_size > 1

    def method_options(self, device: str | torch.device = "cpu") -> MethodOptions:
        """The options the method's ``prepare`` reads.

        Frozen LoRA/QLoRA bases are stored in the compute dtype (memory), while full/frozen_vision keep fp32
        weights as the AMP master copy (DeepSpeed casts its own copy when enabled).
        """
        from phi3v_core.methods import MethodOptions  # its module imports torch

        uses_lora = get_method(self.method).uses_lora
        return MethodOptions(
            lora_rank=self.lora_rank,
            lora_alpha_ratio=self.lora_alpha_ratio,
            lora_dropout=self.lora_dropout,
            lora_lm_head=self.lora_lm_head,
            freeze_vision=self.freeze_vision,
            freeze_llm=self.freeze_llm,
            base_dtype=self.compute_dtype if (uses_lora or self.sixteen_bit_weights) else None,
            compute_dtype=self.compute_dtype,
            device=str(device),
        )

    @property
    def hf_optim(self) -> str:
        """The ``TrainingArguments.optim`` name of :attr:`optim`."""
        names = {
            "adamw": "adamw_torch",
            "adamw_8bit": "adamw_bnb_8bit",
            "paged_adamw_8bit": "paged_adamw_8bit",
            "adamw_8bit_fp32_master": "adamw_bnb_8bit",  # the same optimizer; the weights stay fp32
        }
        return names.get(self.optim, "adamw_torch")

    @property
    def sixteen_bit_weights(self) -> bool:
        """Full/frozen_vision with ``adamw_8bit``/``paged_adamw_8bit`` store all weights in bf16 (no fp32 master copy;
        ``adamw_8bit_fp32_master`` keeps them fp32).

        fp16 keeps fp32 weights: the Trainer's loss scaler cannot unscale fp16 gradients.
        """
        return (
            self.optim in ("adamw_8bit", "paged_adamw_8bit")
            and self.precision == "bf16"
            and self.method in METHODS
            and not get_method(self.method).uses_lora
        )

    def update_retention(self, world_size: int = 1) -> float:
        """Predicted share of trained weights one step changes (:func:`phi3v_core.retention.update_retention`).

        The optimizer writes fp32 wherever there is an fp32 copy: the AMP master weights, DeepSpeed's fp32
        partitions (multi-process full fine-tuning, offload) and LoRA's fp32 adapters; only
        :attr:`sixteen_bit_weights` without DeepSpeed stores each step straight into bf16.
        """
        from phi3v_core.retention import update_retention

        bf16 = self.sixteen_bit_weights and not self.uses_deepspeed(world_size)
        return update_retention(self.learning_rate, "bf16" if bf16 else "fp32")

    # -- validation --------------------------------------------------------------------------------------------
    def problems(self, env: Machine | None = None, names: Mapping[str, str] | None = None) -> list[str]:
        """Every problem with this configuration on this machine (empty when it can run).

        Args:
            env: The machine (detected when omitted). :meth:`Machine.unprobed` judges everything but what depends
                on the GPU (CUDA, capability, device count), without importing torch: a command's first answer.
            names: What to call a field inside a message (``phi3v-finetune`` passes its flags; default: the field
                names). The one place these values are judged, so the API and the command refuse alike.
        """
        env = env or Machine.detect()
        name = functools.partial(_field_name, names or {})
        out: list[str] = []
        out += self._model_problems(name)
        out += self._choice_problems()
        out += self._precision_problems(env, name)
        out += self._batch_problems(env, name)
        out += self._number_problems()
        out += self._checkpoint_problems()
        out += distributed_env_problems()
        out += self._optimizer_problems(env)
        from phi3v_core.training.lever_checks import lever_problems
        from phi3v_core.training.trainer_checks import trainer_problems

        out += lever_problems(self, env)
        out += trainer_problems(self, name)
        return out

    def dataset_problems(self, records: int, env: Machine) -> list[str]:
        """Problems of this configuration with a training set of ``records`` samples (known once the data is read):
        every process needs at least one sample per step."""
        if 0 < records < env.world_size:
            return [
                f"the training set has {records} record(s), fewer than the {env.world_size} processes (WORLD_SIZE): "
                "every process needs at least one; use fewer processes or more data"
            ]
        return []

    def validate(self, env: Machine | None = None) -> None:
        """Raise one :class:`~phi3v_core.errors.ConfigError` listing every problem (no-op when valid)."""
        raise_all(self.problems(env))

    def _model_problems(self, name: Callable[[str], str]) -> list[str]:
        if is_model_preset(self.model):
            return []
        folder = Path(self.model)
        if not (folder / "config.json").is_file():
            return [f"model {self.model!r} is neither a preset ({', '.join(MODEL_PRESET_NAMES)}) nor a folder with config.json"]
        # the config's model type and every weight file's header, read without loading the model
        folder_problems = model_folder_problems(folder, f"{name('model')} {self.model}")
        if folder_problems:
            return folder_problems
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        if not has_weights:
            return [
                f"model folder {folder} has no weight files (*.safetensors); use a preset name for a randomly "
                "initialised model of that shape"
            ]
        return []

    def _choice_problems(self) -> list[str]:
        out = []
        if self.method not in METHODS:
            out.append(
                f"unknown method {self.method!r}{did_you_mean(self.method, list(METHODS))}; "
                f"choose one of {', '.join(METHODS)}"
            )
        if self.precision not in PRECISION_NAMES:
            out.append(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISION_NAMES)}")
        if self.attn not in ATTN_NAMES:
            out.append(f"unknown attn {self.attn!r}; choose one of {', '.join(ATTN_NAMES)}")
        if self.method == "full" and self.freeze_vision:
            out.append("freeze_vision with method 'full' is method 'frozen_vision'; pass method='frozen_vision'")
        if self.method in METHODS and self.deepspeed and not get_method(self.method).supports_deepspeed:
            out.append(
                f"deepspeed is for full/frozen_vision; method {self.method!r} trains adapters with DDP "
                "(as the recipe); drop deepspeed=True"
            )
        return out

    def _precision_problems(self, env: Machine, name: Callable[[str], str]) -> list[str]:
        out = []
        flash = self.attn == "flash_attention_2"
        if flash and self.precision == "fp32":
            out.append("attn flash_attention_2 needs bf16 or fp16 activations; use precision bf16/fp16 or attn sdpa")
        if flash and env.probed and not env.cuda:
            out.append("attn flash_attention_2 needs a CUDA GPU; use attn sdpa or eager on this machine")
        elif flash and env.capability is not None and not supports_flash_attention(env.capability):
            out.append(
                f"attn flash_attention_2 needs compute capability >= 8.0 (Ampere); this GPU is "
                f"{env.capability[0]}.{env.capability[1]}: use attn sdpa"
            )
        # asked with the probed machine: where there is no CUDA the fix is the GPU, not the package
        if flash and env.probed and not env.flash_attn:
            out.append("attn flash_attention_2 needs the flash-attn package (pip install flash-attn); or use attn sdpa")
        if self.precision == "bf16" and env.cuda and env.capability is not None and not supports_bf16(env.capability):
            out.append(
                f"precision bf16 needs compute capability >= 8.0 (Ampere); this GPU is "
                f"{env.capability[0]}.{env.capability[1]}: use precision fp16"
            )
        if self.precision == "fp16" and env.probed and not env.cuda:
            # accelerate turns fp16 off on CPU without a word (no autocast, no loss scaling): the run would be fp32.
            out.append(
                f"{name('precision')} fp16 needs a CUDA GPU (fp16 mixed precision with loss scaling does not run on "
                f"CPU); use {name('precision')} fp32 or {name('precision')} bf16"
            )
        quantized = self.method in METHODS and get_method(self.method).quantized
        if quantized and not env.bitsandbytes:
            out.append(f"method {self.method} needs bitsandbytes (pip install bitsandbytes)")
        elif quantized and env.cuda:
            # the planner's rule: the bitsandbytes library that loads with this torch must hold this GPU
            unsupported = qlora_unsupported_reason(env.capability, env.bnb)
            if unsupported:
                out.append(unsupported)
        if self.method in METHODS and self.uses_deepspeed(env.world_size) and not env.deepspeed:
            out.append("deepspeed is enabled but not installed (pip install deepspeed); or set deepspeed=False")
        return out

    def _batch_problems(self, env: Machine, name: Callable[[str], str]) -> list[str]:
        out = []
        if self.micro_batch < 1:
            out.append(f"{name('micro_batch')} must be >= 1 (got {self.micro_batch})")
        if self.global_batch < 1:
            out.append(f"{name('global_batch')} must be >= 1 (got {self.global_batch})")
        if self.micro_batch >= 1 and self.global_batch >= 1:
            per_step = self.micro_batch * env.world_size
            if self.global_batch % per_step:
                # the recipe asserts batch_size % (num_gpus * batch_size_per_gpu) == 0: global_batch is the global batch
                out.append(
                    f"{name('global_batch')} {self.global_batch} is not divisible by {name('micro_batch')} "
                    f"{self.micro_batch} × {env.world_size} process(es) = {per_step}; pass a multiple of {per_step}"
                )
        if env.world_size == 1 and env.device_count > 1:
            out.append(
                f"{env.device_count} GPUs are visible to a single process (the Trainer would fall back to DataParallel); "
                f"launch with torchrun --nproc_per_node={env.device_count} or set CUDA_VISIBLE_DEVICES=0"
            )
        return out

    def _number_problems(self) -> list[str]:
        checks = [
            (
                self.max_steps == -1 or self.max_steps >= 1,
                f"max_steps must be -1 (epochs) or >= 1 (got {self.max_steps})",
            ),
            (
                self.max_steps != -1 or self.num_train_epochs > 0,
                f"num_train_epochs must be > 0 when max_steps is -1 (got {self.num_train_epochs})",
            ),
            (self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate})"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam betas must be in [0, 1)"),
            (self.adam_epsilon > 0, f"adam_epsilon must be > 0 (got {self.adam_epsilon})"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm})"),
            (self.lora_rank >= 1, f"lora_rank must be >= 1 (got {self.lora_rank})"),
            (self.lora_alpha_ratio > 0, f"lora_alpha_ratio must be > 0 (got {self.lora_alpha_ratio})"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1) (got {self.lora_dropout})"),
            (
                1 <= self.num_crops <= MAX_NUM_CROPS,
                f"num_crops {self.num_crops} is out of range: the recipe asserts num_crops <= {MAX_NUM_CROPS}; "
                f"pass 1..{MAX_NUM_CROPS} (16 for single images, 4 for video frames)",
            ),
            (self.save_steps >= 0, f"save_steps must be >= 0 (got {self.save_steps})"),
            (
                self.save_total_limit is None or self.save_total_limit >= 1,
                f"save_total_limit must be >= 1 or None (got {self.save_total_limit})",
            ),
            (self.logging_steps >= 1, f"logging_steps must be >= 1 (got {self.logging_steps})"),
            (
                self.pack_tokens is None or self.pack_tokens >= 1,
                f"pack_tokens must be >= 1 (got {self.pack_tokens}); pass --pack_tokens N or leave it out",
            ),
            (
                self.dataloader_num_workers >= 0,
                f"dataloader_num_workers must be >= 0 (got {self.dataloader_num_workers})",
            ),
            (self.zero_reduce_bucket_size >= 1, "zero_reduce_bucket_size must be >= 1"),
            (self.zero_allgather_bucket_size >= 1, "zero_allgather_bucket_size must be >= 1"),
            (self.ddp_timeout >= 1, "ddp_timeout must be >= 1 second"),
            (bool(str(self.output_dir).strip()), "output_dir must not be empty"),
        ]
        return [message for ok, message in checks if not ok]

    def _optimizer_problems(self, env: Machine) -> list[str]:
        out = []
        if self.optim not in OPTIM_NAMES:
            out.append(f"optim {self.optim!r} is unknown; choose one of {', '.join(OPTIM_NAMES)}")
        if self.offload not in OFFLOAD_NAMES:
            out.append(f"offload {self.offload!r} is unknown; choose one of {', '.join(OFFLOAD_NAMES)}")
        if self.optim in EIGHT_BIT_OPTIMS and not env.bitsandbytes:
            out.append(f"optim {self.optim} needs bitsandbytes (pip install bitsandbytes); or use optim adamw")
        if self.optim == "paged_adamw_8bit" and env.probed and not env.cuda:
            out.append("optim paged_adamw_8bit pages to CUDA unified memory and needs a GPU; use optim adamw_8bit")
        if self.offload == "optimizer":
            if self.method in METHODS and not get_method(self.method).supports_deepspeed:
                out.append(f"offload optimizer is DeepSpeed ZeRO-2's, for full/frozen_vision, not {self.method}")
            if self.deepspeed is False:
                out.append("offload optimizer runs through DeepSpeed; drop deepspeed=False")
            if self.optim != "adamw":
                out.append(f"offload optimizer steps with DeepSpeed's CPU Adam; drop optim {self.optim} (use adamw)")
            if not env.deepspeed:
                out.append("offload optimizer needs deepspeed (pip install deepspeed)")
            elif env.offload_problem:
                out.append(env.offload_problem)
        return out

    def _checkpoint_problems(self) -> list[str]:
        out = []
        output_dir = Path(self.output_dir)
        if self.resume not in (None, "latest"):
            from phi3v_core.training.checkpoints import checkpoint_problem  # the one completeness rule of resuming

            ckpt = Path(self.resume)
            reason = checkpoint_problem(ckpt, self.max_steps)
            if reason is not None:
                out.append(f"resume checkpoint {ckpt} does not exist or is incomplete ({reason})")
        if self.resume is None and output_dir.is_dir() and any(output_dir.glob("checkpoint-*")):
            out.append(
                f"output_dir {output_dir} already holds checkpoints; pass resume='latest' to continue that run "
                "or choose an empty output_dir"
            )
        return out


def _field_name(names: Mapping[str, str], field_name: str) -> str:
    """How a message calls ``field_name``: its entry in ``names`` (a flag, for the command line), else itself."""
    return names.get(field_name, field_name)


def _renamed_fields(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with deprecated field names (:data:`DEPRECATED_FIELDS`) replaced by the current ones.

    Raises:
        ConfigError: Both the old and the new name of one field are given.
    """
    values = dict(values)
    for old, new in DEPRECATED_FIELDS.items():
        if old in values:
            if new in values:
                raise ConfigError(f"{where}: both {old!r} (deprecated) and {new!r} are given; keep only {new!r}")
            values[new] = values.pop(old)
    return values


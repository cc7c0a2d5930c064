"""The DeepSpeed ZeRO-2 config of full fine-tuning, generated from :class:`~phi3v_core.training.TrainConfig`.

Same shape as the recipe's ``DS_CONFIG_DICT`` (in each script of the Phi-3CookBook vision fine-tuning scripts (microsoft/Phi-3CookBook, code/03.Finetuning/vision_finetuning/)): stage 2, partitioned all-gather, reduce-scatter,
contiguous and round-robin gradients, dynamic fp16 loss scaling, precision and batch sizes left ``"auto"`` so the
HF Trainer fills them from its own arguments. No optimizer/scheduler section: the Trainer's AdamW and schedule are
used. The only change is the bucket sizes (see ``TrainConfig.zero_reduce_bucket_size``). With
``TrainConfig.offload == "optimizer"`` the optimizer moves to the CPU (ZeRO-Offload, Ren et al. 2021): an
``offload_optimizer`` section and an AdamW ``optimizer`` section, which DeepSpeed runs as ``DeepSpeedCPUAdam``.
"""

from __future__ import annotations

from typing import Any

from phi3v_core.constants import zero2_buffer_bytes as buffer_bytes
from phi3v_core.training.config import TrainConfig

__all__ = ["deepspeed_config", "zero2_buffer_bytes"]


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """Return the ZeRO-2 config dict for ``TrainingArguments(deepspeed=...)``.

    Args:
        cfg: The run configuration (bucket sizes and ``overlap_comm`` come from it).
    """
    config: dict[str, Any] = {
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": True,
            "allgather_bucket_size": int(cfg.zero_allgather_bucket_size),
            "overlap_comm": bool(cfg.zero_overlap_comm),
            "reduce_scatter": True,
            "reduce_bucket_size": int(cfg.zero_reduce_bucket_size),
            "contiguous_gradients": True,
            "round_robin_gradients": True,
        },
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    if cfg.offload == "optimizer":
        # ZeRO-Offload: fp32 master weights and Adam states live in host memory and DeepSpeed's CPU Adam steps them
        # (an "optimizer" section makes DeepSpeed build DeepSpeedCPUAdam; the Trainer fills the "auto" values).
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    elif cfg.optim != "adamw":
        config["zero_allow_untested_optimizer"] = True  # bitsandbytes' 8-bit AdamW as the client optimizer
    return config


def zero2_buffer_bytes(cfg: TrainConfig, bytes_per_element: int = 2) -> int:
    """Rough extra GPU memory of the run's ZeRO-2 communication buffers (:func:`phi3v_core.constants.zero2_buffer_bytes`).

    Args:
        cfg: The run configuration (bucket sizes and ``overlap_comm``).
        bytes_per_element: Gradient element size.
    """
    return int(
        buffer_bytes(
            cfg.zero_reduce_bucket_size, cfg.zero_allgather_bucket_size, cfg.zero_overlap_comm, bytes_per_element
        )
    )

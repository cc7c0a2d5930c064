"""Drift: what makes two matched results' numbers mean different things, said before any speed verdict.

``compare`` matches results on the config identity (:data:`bench.config.IDENTITY_FIELDS`: method, attention
kernel, precision, crops, micro-batch and global batch, optimizer - whose name carries the optimizer-state dtype
and the master weights -, offload ...), so two results that differ there are never compared: they are listed as
"only in A/B", and :func:`unmatched_notes` says which field set a near pair apart. What can still differ inside a
match, and changes what a number means, is :func:`drift`:

* any other config field that is not protocol or output (a field added in a later release, e.g. packing or a
  kernel switch, is drift until it joins the identity; a result that predates a field reads as its default);
* what a step is: samples, images or tokens per optimizer step, and gradient accumulation;
* the versions of the libraries that do the work (torch, transformers, peft, accelerate, DeepSpeed, bitsandbytes,
  flash-attn); phi3v-bench's own version is what a comparison of releases compares, so it is not drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from bench.config import IDENTITY_FIELDS, BenchConfig
from bench.results import BenchResult

__all__ = ["NOT_MEANING", "drift", "unmatched_notes"]

#: Config fields that decide how long or where a run measured, never what a number means.
NOT_MEANING: frozenset[str] = frozenset(
    {"steps", "warmup", "repeats", "seed", "release", "out", "layout", "learning_rate", "flops"}
)

#: Packages whose version changes what a step computes or how fast (phi3v-bench itself is what is compared).
_WORK_PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash-attn")


def drift(a: BenchResult, b: BenchResult) -> list[str]:
    """What differs between matched results ``a`` and ``b`` beyond the identity and changes a number's meaning."""
    notes: list[str] = []
    for f in dataclasses.fields(BenchConfig):
        if f.name in IDENTITY_FIELDS or f.name in NOT_MEANING:
            continue
        va, vb = getattr(a.config, f.name), getattr(b.config, f.name)
        if va != vb:
            notes.append(f"{f.name} {va} vs {vb}")
    if a.config.grad_accum != b.config.grad_accum:
        notes.append(f"accumulation {a.config.grad_accum} vs {b.config.grad_accum} micro-steps per step")
    for name, label in (("images_per_step", "images"), ("tokens_per_step", "tokens")):
        va, vb = getattr(a.metrics, name), getattr(b.metrics, name)
        if va and vb and va != vb:
            notes.append(f"{label} per step {va} vs {vb}")
    for package in _WORK_PACKAGES:
        va, vb = a.environment.packages.get(package), b.environment.packages.get(package)
        if va != vb and (va or vb):
            notes.append(f"{package} {va or 'absent'} vs {vb or 'absent'}")
    return notes


def unmatched_notes(only_a: Sequence[dict[str, Any]], only_b: Sequence[dict[str, Any]]) -> list[str]:
    """For results on one side only: the pairs that differ in exactly one identity field, and which."""
    notes = []
    for ia in only_a:
        for ib in only_b:
            differing = [k for k in ia if ia.get(k) != ib.get(k)]
            if len(differing) == 1:
                k = differing[0]
                notes.append(f"not compared: A and B differ in {k} ({ia[k]} vs {ib[k]}), which changes what is measured")
    return notes

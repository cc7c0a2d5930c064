"""``phi3v-bench run``'s packing flags (``bench/cli.py`` is at its size limit; ``matrix`` sweeps them as fields:
``--grid packing=off,on``)."""

from __future__ import annotations

import argparse

from phi3v_core.cli.common import bounded_int

__all__ = ["add_packing_arguments"]


def add_packing_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--packing`` and ``--pack_tokens`` (alias ``--pack-tokens``) to ``p``; both fill BenchConfig fields."""
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack each micro-batch's samples, with their images, into rows (same losses and gradients "
                        "as padding; the result stores the padding fraction and real tokens/s) (default: off)")
    p.add_argument("--pack_tokens", "--pack-tokens", dest="pack_tokens", type=bounded_int(1, 10**7), default=None,
                   metavar="N", help="tokens per packed row, with --packing (default: the micro-batch's longest sample)")

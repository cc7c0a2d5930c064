"""Packing in the bench: config fields and matrix axis, the result's padding fraction and real tokens/s."""

from __future__ import annotations

import dataclasses

import pytest

from bench.cli import build_parser, config_from_args
from bench.config import BenchConfig, DeviceDescription
from bench.matrix import build_cells, parse_grid
from bench.results import BenchResult
from phi3v_core.errors import ConfigError
from tests.bench.factories import make_result


def test_packing_is_identity_and_named_only_when_on() -> None:
    plain = BenchConfig()
    packed = plain.replace(packing=True)
    assert "pack" not in plain.cell_id() and packed.cell_id() == plain.cell_id() + "-pack"
    assert plain.replace(packing=True, pack_tokens=4096).cell_id().endswith("-pack4096")
    assert packed.identity() != plain.identity()
    # Results written before packing existed read as unpacked.
    assert BenchConfig.from_dict({k: v for k, v in plain.to_dict().items() if "pack" not in k}) == plain


def test_bad_packing_values_are_reported() -> None:
    with pytest.raises(ConfigError, match="add --packing"):
        BenchConfig(pack_tokens=4096).validate()
    with pytest.raises(ConfigError, match="pack_tokens must be a positive integer"):
        BenchConfig(packing=True, pack_tokens=0).validate()


def test_matrix_sweeps_packing_as_an_axis() -> None:
    cells = build_cells(None, parse_grid(["packing=off,on", "pack_tokens=none,4096"]))
    pairs = [(c.packing, c.pack_tokens) for c in cells]
    # A budget names no different cell while packing is off: that cell is the unpacked one, measured once.
    assert pairs == [(False, None), (True, None), (True, 4096)]
    assert all(c.problems() == [] for c in cells)


def test_run_flags_fill_the_packing_fields() -> None:
    args = build_parser().parse_args(["run", "--packing", "--pack_tokens", "2048"])
    cfg, _ = config_from_args(args, DeviceDescription(gpu_name=None))
    assert (cfg.packing, cfg.pack_tokens) == (True, 2048)
    args = build_parser().parse_args(["run", "--pack-tokens", "512", "--packing"])
    assert config_from_args(args, DeviceDescription(gpu_name=None))[0].pack_tokens == 512


def test_summary_stores_padding_fraction_and_real_tokens_per_second() -> None:
    result = make_result(step_time=0.5, jitter=0.0)
    assert result.summary.padding_fraction is None  # not counted: older results
    result.metrics.computed_tokens_per_step = 4000.0
    result.metrics.real_tokens_per_step = 3000.0
    summary = BenchResult.from_dict(result.to_dict()).summary
    assert summary.padding_fraction == pytest.approx(0.25)
    assert summary.real_tokens_per_s == pytest.approx(6000.0)
    assert dataclasses.asdict(summary)["padding_fraction"] == pytest.approx(0.25)

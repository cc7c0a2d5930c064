"""phi3v-bench compare from the user's side: results match on hardware too, nothing matched is an error that says
why (exit 1), results from different machines are compared with a note."""

from __future__ import annotations

import dataclasses
import json

from bench.cli import main
from bench.config import BenchConfig
from bench.store import save_result
from tests.bench.factories import gpu_env, make_result
from tests.safety_helpers import expect_user_error

LORA = BenchConfig(method="lora", gpus=8, global_batch=64, release="v1")


def _save(tmp_path, side: str, *results) -> str:
    root = tmp_path / side
    for result in results:
        save_result(result, root)
    return str(root)


def test_the_same_config_on_another_gpu_model_does_not_match(tmp_path, capsys):
    a = _save(tmp_path, "a", make_result(LORA, env=gpu_env("NVIDIA A100-SXM4-80GB")))
    b = _save(tmp_path, "b", make_result(LORA, env=gpu_env("NVIDIA H100 80GB HBM3")))
    expect_user_error(
        main,
        ["compare", a, b],
        "nothing matched: the same configurations were measured on different hardware (A: 8xA100-SXM4-80GB; "
        "B: 8xH100-80GB-HBM3)",
        tmp_path,
        capsys,
    )


def test_unrelated_results_say_nothing_matched(tmp_path, capsys):
    a = _save(tmp_path, "a", make_result(LORA))
    b = _save(tmp_path, "b", make_result(LORA.replace(method="full")))
    expect_user_error(main, ["compare", a, b], "nothing matched: none of the 1 configuration of A", tmp_path, capsys)


def test_same_gpu_on_another_machine_is_compared_with_a_note(tmp_path, capsys):
    other = dataclasses.replace(gpu_env(), driver_version="550.9", cpu="Other CPU")
    a = _save(tmp_path, "a", make_result(LORA, seed=1))
    b = _save(tmp_path, "b", make_result(LORA.replace(release="v2"), seed=2, env=other))
    assert main(["compare", a, b, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["matches"]) == 1
    assert report["notes"] == [
        "A and B were measured on different machines (driver version 570.1 vs 550.9, cpu Test CPU vs Other CPU): "
        "differences may come from the machine"
    ]
    assert main(["compare", a, b, "--markdown"]) == 0
    assert "measured on different machines" in capsys.readouterr().out


def test_same_machine_has_no_note(tmp_path, capsys):
    a = _save(tmp_path, "a", make_result(LORA, seed=1))
    b = _save(tmp_path, "b", make_result(LORA.replace(release="v2"), seed=2))
    assert main(["compare", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []

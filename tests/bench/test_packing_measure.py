"""``python -m bench.packing_measure``: the stored result's schema (the planner's packing validation reads it) and its
one-line refusals. One tiny step per mode; nothing here depends on timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.packing_measure import default_output, main

PROVENANCE = {"command", "date", "machine", "git_sha", "git_dirty", "environment", "result"}
WORKLOAD = {
    "model_config", "method", "attention", "precision", "num_crops", "micro_batch", "pack_tokens", "tasks",
    "sample_tokens", "images_per_sample",
}
MODE = {"step_s_median", "padding_fraction", "real_tokens_per_s", "losses"}


def test_stored_result_has_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "packing.json"
    argv = ["--num_crops", "1", "--micro_batch", "3", "--global_batch", "3", "--steps", "1", "--warmup", "0",
            "--pack_tokens", "900", "--no-prime", "--output", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert set(record) == PROVENANCE
    assert record["command"].endswith("python -m bench.packing_measure " + " ".join(argv))
    result = record["result"]
    assert set(result) == {"workload", "padded", "packed", "speed_up"}
    workload = result["workload"]
    assert set(workload) == WORKLOAD
    assert workload["model_config"] == "tiny" and workload["tasks"] == ["docvqa", "hateful_memes", "nlvr2"]
    assert workload["pack_tokens"] == 900
    # in the order trained (the Trainer shuffles): one page, one meme and the photo pair, the longest sample
    tokens, images = workload["sample_tokens"], workload["images_per_sample"]
    assert sorted(images) == [1, 1, 2] and len(tokens) == 3 and tokens[images.index(2)] == max(tokens)
    padded, packed = result["padded"], result["packed"]
    assert set(padded) == set(packed) == MODE
    # padded: three rows of the longest sample; packed: the page and the meme share a row of at most 900
    assert padded["padding_fraction"] == pytest.approx(1 - sum(tokens) / (3 * max(tokens)))
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert len(padded["losses"]) == len(packed["losses"]) == 1
    assert packed["losses"][0] == pytest.approx(padded["losses"][0], abs=1e-5)
    assert result["speed_up"] == pytest.approx(packed["real_tokens_per_s"] / padded["real_tokens_per_s"])
    assert "speed-up packed/padded" in capsys.readouterr().out


def test_default_output_names_machine_date_and_a_non_default_mix() -> None:
    from phi3v_core.environment import capture_environment

    machine = capture_environment().hardware
    mixed, pair = default_output(("docvqa", "hateful_memes", "nlvr2")), default_output(("nlvr2", "hateful_memes"))
    assert mixed.parent == Path("results/validation") and mixed.name.startswith(f"packing-{machine}-")
    assert pair.name.startswith(f"packing-nlvr2-hateful-memes-{machine}-")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tasks", "docvqa,chess"], "--tasks"),
        (["--model_config", "no/such.json"], "--model_config"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err

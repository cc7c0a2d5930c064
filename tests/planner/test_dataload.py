"""phi3v-plan's data loading: cores per GPU from the processor rate, workers in the command, the starvation warning."""

from __future__ import annotations

import json
import math

import pytest

from planner.cli import main
from planner.dataload import WORKER_HEADROOM, plan_data_loading, stored_rate


def test_cores_workers_and_free_cores() -> None:
    fed = plan_data_loading(6.0, 8, (2.0, "measured"), (64, "this machine"))
    assert fed.cores_per_gpu == pytest.approx(3.0)
    assert fed.free_cores_per_gpu == pytest.approx(7.0)  # 64 / 8 minus the training process's own core
    assert fed.workers == math.ceil(3.0 * WORKER_HEADROOM) == 4
    assert fed.warning is None
    assert "3.0 CPU cores per GPU for 6.00 img/s at 2.00 img/s per core" in fed.line()
    assert "--dataloader_num_workers 4" in fed.line()


def test_a_node_with_too_few_cores_is_warned_about() -> None:
    starved = plan_data_loading(6.0, 8, (1.0, "measured"), (32, "--cpus_per_node"))
    assert starved.cores_per_gpu == pytest.approx(6.0) and starved.free_cores_per_gpu == pytest.approx(3.0)
    assert starved.workers == 3  # no more workers than free cores: more would only contend
    assert starved.warning is not None
    assert starved.warning.startswith("the node's 32 cores cannot feed its 8 GPU(s): the processor needs 6.0 cores")
    assert "about 3.00 img/s per GPU" in starved.warning


def test_sentences_say_img_per_s_and_the_json_keeps_samples() -> None:
    # Two images per sample: the sentences double (img/s, every command's unit), the JSON rates stay samples/s.
    fed = plan_data_loading(6.0, 8, (2.0, "measured"), (16, "this machine"), images=2)
    assert fed.cores_per_gpu == pytest.approx(3.0)
    assert "for 12.00 img/s at 4.00 img/s per core" in fed.line()
    assert fed.warning is not None and "about 4.00 img/s per GPU" in fed.warning  # 1 free core x 2 samples/s x 2 images
    data = fed.to_dict()
    assert data["samples_per_s_per_gpu"] == 6.0 and data["rate_per_core"] == 2.0 and "images" not in data


def test_unknown_cores_state_the_need_only() -> None:
    what_if = plan_data_loading(6.0, 8, (2.0, "measured"), (None, "unknown"))
    assert what_if.warning is None and what_if.free_cores_per_gpu is None
    assert "node cores unknown (pass --cpus_per_node)" in what_if.line()


def test_stored_rate_nearest_crops_and_images() -> None:
    rate16, source = stored_rate("docvqa", 16)
    assert rate16 > 0 and "planner/data/processor_rate.json" in source and "num_crops 16" in source
    rate12, source12 = stored_rate("docvqa", 12)
    assert "nearest measured to 12" in source12
    double, _ = stored_rate("docvqa", 16, images_per_sample=2)
    assert double == pytest.approx(rate16 / 2)
    assert stored_rate("no-such-task", 16) is None


def test_plan_prints_workers_and_cores(capsys) -> None:
    main(["--gpu", "H100-80GB", "--count", "8", "--cpus_per_node", "32", "--processor_rate", "1.5", "--json"])
    plan = json.loads(capsys.readouterr().out)
    best = next(m for m in plan["methods"] if m["method"] == plan["recommended"])
    loading = best["data_loading"]
    assert loading["rate_source"] == "--processor_rate" and loading["node_cpus"] == 32
    assert loading["cores_per_gpu"] == pytest.approx(best["speed"]["per_gpu"] / 1.5)
    assert f"--dataloader_num_workers {loading['workers']}" in best["command"]
    assert (loading["warning"] is not None) == (loading["cores_per_gpu"] > 32 / 8 - 1)


def test_plan_text_shows_the_line_and_the_warning(capsys) -> None:
    main(["--gpu", "H100-80GB", "--count", "8", "--cpus_per_node", "8", "--processor_rate", "0.5"])
    out = " ".join(capsys.readouterr().out.split())
    assert "data loading:" in out and "CPU cores per GPU" in out
    assert "cannot feed its 8 GPU(s)" in out

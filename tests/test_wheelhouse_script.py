"""scripts/wheelhouse.sh (README "Offline GPU node"): valid bash, and it leaves out exactly torch's CUDA stack.

Building a real wheelhouse needs a package index, so tests check the script's parts; the README records a full run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wheelhouse.sh"


def _torch_stack() -> re.Pattern[str]:
    match = re.search(r'^TORCH_STACK = re\.compile\(r"(.+?)"\)', SCRIPT.read_text(), flags=re.MULTILINE)
    assert match, "wheelhouse.sh lost its TORCH_STACK pattern"
    return re.compile(match.group(1))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize(
    "name", ["torch", "triton", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "cuda-bindings", "cuda-toolkit"]
)
def test_the_images_torch_stack_is_left_out(name: str) -> None:
    assert _torch_stack().match(name)


@pytest.mark.parametrize("name", ["nvidia-ml-py", "bitsandbytes", "torchvision-extra", "transformers", "accelerate"])
def test_everything_else_is_downloaded(name: str) -> None:
    assert not _torch_stack().match(name)


def test_the_project_is_installed_without_its_dependencies() -> None:
    text = SCRIPT.read_text()
    assert "--no-deps phi3v-bench" in text and '"torch"' in text  # requirements.txt drops torch

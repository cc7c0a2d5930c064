"""The full-size presets are the published checkpoints' configuration, from package data alone.

``phi3v_core/configs/*.json`` hold the values of the official ``config.json`` and ``preprocessor_config.json`` of
microsoft/Phi-3.5-vision-instruct and microsoft/Phi-3-vision-128k-instruct. These tests compare them with the copies in
``../shared/checkpoints`` field by field (skipped when that folder is absent), and check that a wheel installed into a
fresh virtual environment, far from this repository and from ``../shared``, builds the identical config.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v_core.config import get_config
from phi3v_core.preset_files import PRESET_FILES, official_preset
from tests.conftest import REPO_ROOT
from tests.safety_helpers import HANG_GUARD_S

#: What the shipped records leave out of the official files: the pointer to the repositories' remote code.
DROPPED = {"auto_map"}
#: Preset name → the fixture giving its official checkpoint folder.
FOLDER_FIXTURE = {"phi-3.5-vision": "ckpt35", "phi-3-vision": "ckpt_v1"}


def _official(folder: Path, file: str) -> dict:
    values = json.loads((folder / file).read_text())
    return {key: value for key, value in values.items() if key not in DROPPED}


@pytest.mark.parametrize("preset", list(PRESET_FILES))
def test_shipped_record_equals_official_files(preset: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(FOLDER_FIXTURE[preset])
    record = official_preset(preset)
    for section, file in (("config", "config.json"), ("preprocessor", "preprocessor_config.json")):
        official = _official(folder, file)
        assert set(record[section]) == set(official), (section, set(record[section]) ^ set(official))
        for key, value in official.items():
            assert record[section][key] == value, (section, key)  # exact: floats are stored as published
    assert record["source"] == f"https://huggingface.co/microsoft/{folder.name.replace('phi', 'Phi', 1)}"


@pytest.mark.parametrize("preset", list(PRESET_FILES))
def test_preset_config_equals_config_read_from_official_folder(preset: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(FOLDER_FIXTURE[preset])
    official = json.loads((folder / "config.json").read_text())
    from_preset = get_config(preset).to_dict()
    from_folder = get_config(folder).to_dict()
    assert from_preset.keys() == from_folder.keys()
    for key in from_folder:
        assert from_preset[key] == from_folder[key], key
    rope = get_config(preset).rope_parameters
    assert rope["long_factor"] == official["rope_scaling"]["long_factor"]  # all 48, exactly
    assert rope["short_factor"] == official["rope_scaling"]["short_factor"]
    assert len(rope["long_factor"]) == len(rope["short_factor"]) == 48
    for key in ("bos_token_id", "eos_token_id", "sliding_window", "vocab_size", "max_position_embeddings"):
        assert from_preset[key] == official[key], key


def test_presets_differ_where_the_checkpoints_differ() -> None:
    v35, v1 = official_preset("phi-3.5-vision"), official_preset("phi-3-vision")
    assert v35["config"]["sliding_window"] == 262144 and v1["config"]["sliding_window"] == 131072
    assert v35["config"]["rope_scaling"]["long_factor"] != v1["config"]["rope_scaling"]["long_factor"]
    assert v35["preprocessor"]["num_crops"] == 4 and v1["preprocessor"]["num_crops"] == 16
    assert "microsoft/Phi-3.5-vision-instruct" in v35["provenance"]


def test_library_code_never_reads_the_shared_folder() -> None:
    """Presets come from package data only: no library module refers to ``../shared`` or rebuilds factor lists."""
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for package in ("phi3v_core", "bench", "planner")
        for path in (REPO_ROOT / package).rglob("*.py")
        if '"shared"' in (text := path.read_text()) or "interpolated between" in text
    ]
    assert offenders == []


_CHILD = """
import json, sys
import phi3v_core
from phi3v_core.config import get_config
print(json.dumps({"file": phi3v_core.__file__,
                  "configs": {name: get_config(name).to_dict() for name in ("phi-3.5-vision", "phi-3-vision")}}))
"""


@pytest.mark.slow
def test_wheel_in_fresh_venv_builds_identical_presets(tmp_path: Path) -> None:
    """Build a wheel from a copy of the sources, install it into a new venv outside the repo, compare the presets.

    The venv reuses the installed dependencies (a ``.pth`` pointing at this interpreter's site-packages, so nothing is
    downloaded); its own site-packages come first, so ``phi3v_core`` is imported from the wheel.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for package in ("phi3v_core", "bench", "planner"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PHI3V_SHARED")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)],
        **run,
    )  # fmt: skip
    wheels = list((tmp_path / "dist").glob("phi3v_bench-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run)
    python = venv / "bin" / "python"
    venv_site = Path(
        subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], **run).stdout.strip()
    )
    (venv_site / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], **run)
    shutil.rmtree(source)  # nothing of the sources is left to import from

    out = json.loads(subprocess.run([python, "-c", _CHILD], **run).stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(venv), out["file"]
    assert not (Path(out["file"]).parents[2] / "shared").exists()
    for name, installed in out["configs"].items():
        here = json.loads(json.dumps(get_config(name).to_dict()))
        assert installed == here, name
        published = official_preset(name)["config"]["rope_scaling"]
        assert installed["rope_parameters"]["long_factor"] == published["long_factor"]


@pytest.mark.parametrize("preset", ["tiny", *PRESET_FILES])
def test_preset_dims_read_without_transformers_match_the_built_config(preset: str) -> None:
    """A first answer's sizes (``preset_dims``, no transformers) are the sizes of the config the preset builds."""
    from phi3v_core.preset_files import preset_dims

    config = get_config(preset)
    assert preset_dims(preset) == (config.hidden_size, config.max_position_embeddings)

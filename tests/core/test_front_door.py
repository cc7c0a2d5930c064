"""The front door: ``import phi3v_core`` is light, registers the Auto classes, and official folders load anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.models.phi3.modeling_phi3 as phi3_modeling
from transformers import AutoConfig

from phi3v_core.config import tiny_config
from phi3v_core.device import flash_attention_usable
from phi3v_core.model import Phi3VForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
# Hang guard only (a loaded CI machine may be slow to import torch); never a speed target.
SUBPROCESS_TIMEOUT_S = 900
#: config.json keys that size the model: taken from the tiny preset, everything else stays official.
SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vision_config",
    "img_processor",
)


def _run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_import_is_light() -> None:
    """Light commands import the package, its constants and helpers, and the planner's shapes without torch."""
    out = _run_fresh(
        """
        import json, sys
        import phi3v_core, phi3v_core.constants, phi3v_core.errors, phi3v_core.io, phi3v_core.device
        import planner.shapes
        phi3v_core.constants.load_recipe()
        print(json.dumps(sorted(m for m in ("torch", "transformers", "PIL") if m in sys.modules)))
        """
    )
    assert json.loads(out) == []


def _official_tiny_folder(official: Path, folder: Path) -> Path:
    """A tiny random model saved under the official config.json (flash_attention_2, auto_map, model_type phi3_v)."""
    model = Phi3VForCausalLM(tiny_config())
    model.save_pretrained(folder)
    values = json.loads((official / "config.json").read_text())
    assert values["_attn_implementation"] == "flash_attention_2" and values["model_type"] == "phi3_v"
    tiny = tiny_config().to_dict()
    values.update({key: tiny[key] for key in SIZE_KEYS})
    rope = tiny["rope_parameters"]
    values["rope_scaling"] = {"type": "su", "long_factor": rope["long_factor"], "short_factor": rope["short_factor"]}
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    torch.save({"lm_head": model.lm_head.weight.detach()[:8, :8].clone()}, folder / "expected.pt")
    return folder


def test_official_folder_loads_with_automodel_after_import_phi3v_core(ckpt35: Path, tmp_path: Path) -> None:
    folder = _official_tiny_folder(ckpt35, tmp_path / "official-tiny")
    out = _run_fresh(
        f"""
        import json, warnings
        import phi3v_core
        import torch
        from transformers import AutoModelForCausalLM
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        expected = torch.load({str(folder / "expected.pt")!r})["lm_head"]
        logits = model(input_ids=torch.tensor([[1, 32010, 450, 29871, 32007]])).logits
        print(json.dumps({{
            "class": type(model).__name__,
            "attn": model.config._attn_implementation,
            # config.json says torch_dtype bfloat16, so the weights load in bf16: compare in that dtype.
            "same_weights": torch.equal(model.lm_head.weight[:8, :8], expected.to(model.dtype)),
            "logits": list(logits.shape),
            "flash_warnings": sum("flash_attention_2" in str(w.message) for w in caught),
        }}))
        """
    )
    result = json.loads(out)
    assert result["class"] == "Phi3VForCausalLM"
    assert result["same_weights"] and result["logits"] == [1, 5, 32064]
    if flash_attention_usable():
        assert (result["attn"], result["flash_warnings"]) == ("flash_attention_2", 0)
    else:
        assert (result["attn"], result["flash_warnings"]) == ("sdpa", 1)


def test_explicit_attention_choice_wins_over_the_file(ckpt35: Path) -> None:
    assert AutoConfig.from_pretrained(ckpt35, attn_implementation="eager")._attn_implementation == "eager"


def test_model_is_built_and_initialised_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    original = phi3_modeling.Phi3Model.__init__

    def counting_init(self: torch.nn.Module, config: object) -> None:
        built.append(type(self).__name__)
        original(self, config)

    monkeypatch.setattr(phi3_modeling.Phi3Model, "__init__", counting_init)
    model = Phi3VForCausalLM(tiny_config())
    assert built == ["Phi3VModel"]  # no throw-away plain Phi3Model
    embedding = model.model.vision_embed_tokens
    # The separators' random init (model/modeling.py) really runs; it used to be skipped.
    assert float(embedding.glb_GN.abs().sum()) > 0 and float(embedding.sub_GN.abs().sum()) > 0
    assert abs(float(model.lm_head.weight.std()) - model.config.initializer_range) < 0.005

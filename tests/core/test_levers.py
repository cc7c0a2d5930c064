"""Per-tower training (learning rates, --freeze_llm, checkpointing per tower) and the --kernels liger patch on CPU.

Liger's numerics and speed need Triton on a GPU: ``test_levers_gpu.py``. Here: which modules the patch replaces on a
tiny model (Liger's modules import without a GPU), and that the supervised loss hands the fused loss the same
hidden states, targets and normalisation as its own path (with a pure-torch stand-in for the Triton kernel).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers.models.phi3 import modeling_phi3

from phi3v_core.errors import ConfigError
from phi3v_core.kernels import apply_kernels
from phi3v_core.methods import METHODS, get_method
from phi3v_core.towers import TOWERS, checkpointing_fields, tower_of
from phi3v_core.training import TrainConfig, build_model, train
from phi3v_core.training.levers import restrict_checkpointing, tower_param_groups
from phi3v_core.training.machine import Machine
from phi3v_core.training.model_setup import prepare_model
from phi3v_core.training.synthetic import SyntheticDataset

CPU = Machine()


def _cfg(tmp_path: Path, **overrides: object) -> TrainConfig:
    values: dict = dict(model="tiny", method="full", precision="fp32", num_crops=1, micro_batch=2, global_batch=2,
                        max_steps=1, warmup_steps=0, learning_rate=1e-3, lora_rank=4, output_dir=str(tmp_path / "run"),
                        dataloader_num_workers=0, disable_tqdm=True, save_final=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_every_parameter_belongs_to_the_tower_the_spec_names(tmp_path: Path) -> None:
    model = build_model(_cfg(tmp_path), CPU)
    towers = {name: tower_of(name) for name, _ in model.named_parameters()}
    assert set(towers.values()) == set(TOWERS)
    for name, tower in towers.items():
        if ".img_processor." in name:
            assert tower == "vision", name
        elif "vision_embed_tokens." in name:  # img_projection.*, glb_GN, sub_GN: "Projector + separators"
            assert tower == "projector", name
        else:
            assert tower == "llm", name
    assert towers["model.vision_embed_tokens.glb_GN"] == "projector"
    assert tower_of("base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.default.weight") == "llm"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_freeze_llm_trains_only_the_image_path(tmp_path: Path, method: str) -> None:
    cfg = _cfg(tmp_path, method=method, freeze_llm=True)
    model, report = prepare_model(cfg, CPU)
    trained = {tower_of(name) for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"vision", "projector"} == set(get_method(method).trained_towers(freeze_llm=True))
    assert report.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any("llm tower frozen" in note for note in report.notes)


def test_the_registry_says_what_trains_per_method_and_refuses_training_nothing(tmp_path: Path) -> None:
    assert METHODS["frozen_vision"].trained_towers() == {"llm"}
    assert METHODS["lora"].trained_towers(freeze_vision=True) == {"llm"}
    assert METHODS["full"].trained_towers() == set(TOWERS)
    problems = _cfg(tmp_path, method="frozen_vision", freeze_llm=True, vision_lr=1e-5).problems(CPU)
    assert any("freeze_llm with method 'frozen_vision' trains nothing" in p for p in problems)
    assert any("vision_lr is set but method 'frozen_vision' does not train the vision tower" in p for p in problems)


def test_a_run_with_tower_rates_and_the_llm_frozen_trains_the_image_path(tmp_path: Path) -> None:
    dataset = SyntheticDataset(num_examples=2, num_crops=1, prompt_words=4, answer_words=3, seed=0)
    cfg = _cfg(tmp_path, vision_lr=2e-4, projector_lr=5e-4, freeze_llm=True, checkpoint_towers="vision")
    before = {n: p.detach().clone() for n, p in build_model(cfg, CPU).named_parameters()}
    result = train(cfg, dataset)
    changed = {tower_of(n) for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {"vision", "projector"} and result.global_step == 1
    groups = tower_param_groups(result.model, {"vision": 2e-4, "projector": 5e-4, "llm": 1e-3}, 0.01, [])
    assert {g["tower"]: g["lr"] for g in groups} == {"vision": 2e-4, "projector": 5e-4}


def test_the_trainer_steps_each_tower_at_its_own_rate(tmp_path: Path) -> None:
    from phi3v_core.training.trainer import Phi3VTrainer, build_training_arguments

    cfg = _cfg(tmp_path, vision_lr=2e-4, projector_lr=5e-4)
    model, _ = prepare_model(cfg, CPU)
    trainer = Phi3VTrainer(model=model, args=build_training_arguments(cfg, CPU),
                           tower_rates={"vision": 2e-4, "projector": 5e-4, "llm": 1e-3})
    optimizer = trainer.create_optimizer()
    by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert by_param[id(param)] == {"vision": 2e-4, "projector": 5e-4, "llm": 1e-3}[tower_of(name)], name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("choice", "off_tower"), [("llm", "vision"), ("vision", "llm"), ("both", None)])
def test_checkpointing_per_tower_switches_the_other_tower_off(tmp_path: Path, choice: str, off_tower: str | None) -> None:
    model = build_model(_cfg(tmp_path), CPU)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enabled, towers = checkpointing_fields(choice)
    switched = restrict_checkpointing(model, towers)
    on = {tower_of(n + ".") for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True}
    assert enabled and on == ({"vision", "llm"} - {off_tower})
    assert bool(switched) == (off_tower is not None)
    assert checkpointing_fields("on") == (True, "both") and checkpointing_fields("off") == (False, "both")


def test_liger_patch_replaces_the_decoder_norms_and_mlps_and_keeps_other_models_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("liger_kernel")
    # Liger's RoPE patch is process-wide by design; put it back after the test.
    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", modeling_phi3.apply_rotary_pos_emb)
    model = build_model(_cfg(tmp_path), CPU)
    layers = model.config.num_hidden_layers
    patch = apply_kernels(model, "liger")
    expected = {"model.norm": "LigerRMSNorm"}
    for i in range(layers):
        expected |= {f"model.layers.{i}.input_layernorm": "LigerRMSNorm",
                     f"model.layers.{i}.post_attention_layernorm": "LigerRMSNorm",
                     f"model.layers.{i}.mlp": "LigerPhi3SwiGLUMLP"}
    assert patch.replaced == expected  # the CLIP tower and the projector are not touched
    assert patch.rope and modeling_phi3.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert patch.fused_loss and model.fused_linear_loss is not None
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, torch.nn.Linear)  # LoRA can still wrap it
    # the module-level classes are the originals again: a model built later is plain
    later = build_model(_cfg(tmp_path), CPU)
    assert type(later.model.norm).__name__ == "Phi3RMSNorm" and later.fused_linear_loss is None
    assert apply_kernels(later, "none").replaced == {}


def test_the_fused_loss_gets_the_supervised_positions_and_the_same_normalisation(tmp_path: Path) -> None:
    model = build_model(_cfg(tmp_path), CPU).train()
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    labels = torch.full((2, 9), -100)
    labels[0, 4:7] = torch.tensor([5, 6, 7])
    labels[1, 2:4] = torch.tensor([8, 9])
    seen: list[tuple[int, ...]] = []

    def stand_in(weight: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(h.shape))  # a pure-torch stand-in for the Triton kernel: same math, summed
        return torch.nn.functional.cross_entropy(h @ weight.T, targets, reduction="sum")

    reference = model.supervised_loss(hidden, labels, num_items_in_batch=7)
    grad_ref = torch.autograd.grad(reference, hidden)[0]
    model.fused_linear_loss = stand_in
    fused = model.supervised_loss(hidden, labels, num_items_in_batch=7)
    grad = torch.autograd.grad(fused, hidden)[0]
    assert seen == [(5, model.config.hidden_size)]  # the 5 positions that predict a label, nothing else
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grad, grad_ref)


def test_kernels_liger_is_refused_on_a_cpu_in_one_line_before_any_model_is_built(tmp_path: Path) -> None:
    from phi3v_core.cli.finetune import build_parser
    from phi3v_core.cli.finetune_config import build_config

    args = build_parser().parse_args(["--synthetic", "4", "--kernels", "liger", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError) as info:
        build_config(args, env=CPU)
    assert str(info.value).count("\n") == 0
    assert "--kernels liger needs a CUDA GPU (Liger's kernels are Triton" in str(info.value)


def test_finetune_flags_map_onto_the_tower_fields(tmp_path: Path) -> None:
    from phi3v_core.cli.finetune import build_parser
    from phi3v_core.cli.finetune_config import build_config

    argv = ["--synthetic", "4", "--method", "full", "--vision_lr", "1e-5", "--projector-lr", "2e-5", "--freeze_llm",
            "--gradient_checkpointing", "vision", "--compile", "--output_dir", str(tmp_path / "o")]
    train_cfg = build_config(build_parser().parse_args(argv), env=CPU).train
    assert (train_cfg.vision_lr, train_cfg.projector_lr, train_cfg.freeze_llm, train_cfg.compile) == (1e-5, 2e-5, True, True)
    assert (train_cfg.gradient_checkpointing, train_cfg.checkpoint_towers) == (True, "vision")
    old = build_config(build_parser().parse_args(["--synthetic", "4", "--gradient_checkpointing", "off",
                                                  "--output_dir", str(tmp_path / "p")]), env=CPU).train
    assert old.gradient_checkpointing is False
    assert isinstance(build_parser().parse_args([]), argparse.Namespace)


def test_a_compiled_step_gives_the_same_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` goes through the Trainer's ``torch.compile``; the test uses the ``aot_eager`` backend (the
    same Dynamo capture and AOTAutograd forward/backward graphs, without inductor's C++ code generation, which takes
    minutes on a busy CPU), so it stays cheap while checking that the compiled model trains to the same loss."""
    import phi3v_core.training.api as api

    build = api.build_training_arguments

    def with_cheap_backend(cfg: TrainConfig, env: Machine) -> object:
        args = build(cfg, env)
        if cfg.compile:
            args.torch_compile_backend = "aot_eager"
        return args

    monkeypatch.setattr(api, "build_training_arguments", with_cheap_backend)
    dataset = SyntheticDataset(num_examples=2, num_crops=1, prompt_words=4, answer_words=3, seed=0)
    from torch._dynamo.utils import counters

    eager = train(_cfg(tmp_path, output_dir=str(tmp_path / "eager")), dataset)
    torch._dynamo.reset()
    counters.clear()
    compiled = train(_cfg(tmp_path, output_dir=str(tmp_path / "compiled"), compile=True), dataset)
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo captured and compiled the model's graphs
    assert compiled.losses[1] == pytest.approx(eager.losses[1], rel=1e-4)

"""Model tests: checkpoint compatibility, parity with transformers' Phi3/CLIP, traceability, image layout maths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

import phi3v_core.model  # noqa: F401  (registers phi3_v with the Auto classes)
from phi3v_core.config import get_config, phi35_vision_config, tiny_config
from phi3v_core.model import Phi3VForCausalLM, dead_parameter_names, image_token_count

FULL_SIZE_PARAMETERS = 4_146_621_440


def make_batch(sizes_per_sample: list[list[tuple[int, int]]], num_crops: int = 6, text_len: int = 12) -> dict:
    """Right-padded batch with placeholder runs (-k) for each image, like the processor + collator produce."""
    rows, flat_sizes = [], []
    for sample in sizes_per_sample:
        ids: list[int] = [1, 32010, 29871, 13]
        for k, (h, w) in enumerate(sample, start=1):
            ids += [-k] * image_token_count(h // 336, w // 336)
            ids += [1, 29871, 13]
            flat_sizes.append((h, w))
        ids += list(range(100, 100 + text_len)) + [32007, 32000]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), 32000, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    labels = input_ids.clone()
    labels[(input_ids < 0) | (attention_mask == 0)] = -100
    pixel_values = torch.randn(len(flat_sizes), num_crops + 1, 3, 336, 336)
    for i, (h, w) in enumerate(flat_sizes):
        pixel_values[i, 1 + (h // 336) * (w // 336) :] = 0  # zero padding, as the processor does
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": flat_sizes,
    }


@pytest.fixture(scope="module")
def tiny_model() -> Phi3VForCausalLM:
    torch.manual_seed(0)
    return Phi3VForCausalLM(tiny_config(attn_implementation="eager")).eval()


# -- checkpoint compatibility -------------------------------------------------------------------------------------


def test_full_size_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = Phi3VForCausalLM(phi35_vision_config())
    assert sum(p.numel() for p in model.parameters()) == FULL_SIZE_PARAMETERS


@pytest.mark.parametrize("fixture", ["ckpt35", "ckpt_v1"])
def test_state_dict_keys_match_official_index(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    official = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    with torch.device("meta"):
        model = Phi3VForCausalLM(get_config(folder))
    ours = set(model.state_dict())
    assert len(official) == 592
    assert ours == official, sorted(ours ^ official)[:10]


@pytest.mark.parametrize("fixture", ["ckpt35", "ckpt_v1"])
def test_official_config_loads_without_remote_code(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    config = AutoConfig.from_pretrained(folder)
    assert type(config).__name__ == "Phi3VConfig"
    assert config.rope_parameters["rope_type"] == "longrope"
    assert len(config.rope_parameters["long_factor"]) == 48
    assert config.embd_layer["hd_transform_order"] == "sub_glb"
    assert config.img_processor["num_img_tokens"] == 144


def test_presets_match_official_files(ckpt35: Path, ckpt_v1: Path) -> None:
    for folder, preset in ((ckpt35, "phi-3.5-vision"), (ckpt_v1, "phi-3-vision")):
        official = json.loads((folder / "config.json").read_text())
        cfg = get_config(preset)
        assert cfg.rope_parameters["long_factor"] == official["rope_scaling"]["long_factor"]
        assert cfg.sliding_window == official["sliding_window"]


def test_save_load_round_trip_gives_identical_logits(tiny_model: Phi3VForCausalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path, max_shard_size="4MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "phi3_v"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(loaded, Phi3VForCausalLM)
    batch = make_batch([[(336, 672)]], num_crops=2)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(tiny_model(**batch).logits, loaded(**batch).logits)


# -- parity with transformers' own models -------------------------------------------------------------------------


def test_text_path_equals_transformers_phi3(tiny_model: Phi3VForCausalLM) -> None:
    text_config = Phi3Config(**{k: v for k, v in tiny_model.config.to_dict().items() if k in Phi3Config.__dataclass_fields__})
    text_config._attn_implementation = "eager"
    reference = Phi3ForCausalLM(text_config).eval()
    missing, unexpected = reference.load_state_dict(tiny_model.state_dict(), strict=False)
    assert not missing
    assert all(k.startswith("model.vision_embed_tokens.") for k in unexpected)
    input_ids = torch.randint(0, 32000, (2, 37))
    with torch.no_grad():
        ours = tiny_model(input_ids=input_ids).logits
        theirs = reference(input_ids=input_ids).logits.float()
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_long_rope_switches_factors_like_transformers(tiny_model: Phi3VForCausalLM) -> None:
    """Past 4096 positions the long factors apply (same rule as the reference)."""
    rotary = tiny_model.model.rotary_emb
    x = torch.zeros(1, 1, 4)
    short = rotary(x, torch.tensor([[1, 4095]]))[0].clone()
    long = rotary(x, torch.tensor([[1, 4096]]))[0].clone()
    assert not torch.allclose(short[0, 0], long[0, 0]), "position 1 must use different factors once the sequence passes 4096"
    assert abs(rotary.attention_scaling - (1 + torch.log(torch.tensor(32.0)) / torch.log(torch.tensor(4096.0))).sqrt()) < 1e-6


def test_vision_features_equal_clip_hidden_state_minus_two(tiny_model: Phi3VForCausalLM) -> None:
    embed = tiny_model.model.vision_embed_tokens
    clip = embed.img_processor.vision_model
    assert isinstance(clip, CLIPVisionModel)
    crops = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        reference = clip(pixel_values=crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = embed.clip_features(crops)
    assert ours.shape == (3, 576, clip.config.hidden_size)
    assert torch.allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["frozen", "training"])
def test_clip_quick_gelu_is_bit_identical_to_transformers(tiny_model: Phi3VForCausalLM, grad: bool) -> None:
    """Our in-place QuickGELU (no gradient) and its plain form (gradient) give transformers' CLIP bit for bit."""
    from phi3v_core.model.image_embedding import QuickGELU

    ours = tiny_model.model.vision_embed_tokens.img_processor.vision_model
    assert sum(isinstance(m, QuickGELU) for m in ours.modules()) == ours.config.num_hidden_layers
    plain = CLIPVisionModel(ours.config)
    plain.load_state_dict(ours.state_dict())
    assert not any(isinstance(m, QuickGELU) for m in plain.modules())
    crops = torch.randn(2, 3, 336, 336)
    outputs, grads = [], []
    for model in (ours, plain):
        x = crops.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
            if grad:
                hidden.square().sum().backward()
                grads.append(x.grad)
        outputs.append(hidden.detach())
    assert torch.equal(outputs[0], outputs[1])
    if grad:
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("mode", ["no_grad", "frozen"])
def test_clip_layers_without_graph_are_bit_identical(tiny_model: Phi3VForCausalLM, mode: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path without a graph (per-crop MLP, in-place residuals, contiguous heads) gives transformers' features."""
    from phi3v_core.model import clip_layers

    embed = tiny_model.model.vision_embed_tokens
    clip = embed.img_processor.vision_model
    plain = CLIPVisionModel(clip.config)
    plain.load_state_dict(clip.state_dict())
    crops = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        reference = plain(pixel_values=crops, output_hidden_states=True).hidden_states[-2][:, 1:]
    monkeypatch.setattr(clip_layers, "MMAP_CEILING_BYTES", 0)  # the tiny tower's activations are far below it
    seen = []
    original = clip_layers.clip_layer_without_graph
    monkeypatch.setattr("phi3v_core.model.image_embedding.clip_layer_without_graph",
                        lambda layer, hidden: seen.append(1) or original(layer, hidden))
    frozen = [p.requires_grad_(False) for p in clip.parameters()] if mode == "frozen" else []
    try:
        with torch.set_grad_enabled(mode == "frozen"):
            ours = embed.clip_features(crops)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    assert len(seen) == embed.num_used_layers, "the path without a graph was not taken"
    assert not ours.requires_grad
    assert torch.equal(ours, reference)


def test_clip_layers_keep_transformers_layers_unless_a_large_batch_runs_without_a_graph(
    tiny_model: Phi3VForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trainable CLIP weights (gradients must reach them), fake tensors (the planner's trace stands for a GPU run) and
    small batches (the split only adds calls) keep transformers' layers."""
    from phi3v_core.model import clip_layers

    clip = tiny_model.model.vision_embed_tokens.img_processor.vision_model
    width, inner = clip.config.hidden_size, clip.config.intermediate_size
    hidden = torch.zeros(1, 2, width)
    with torch.no_grad():
        assert not clip_layers.uses_graph_free_layers(clip, hidden), "2 tokens are far below the mmap ceiling"
    monkeypatch.setattr(clip_layers, "MMAP_CEILING_BYTES", 2 * 2 * inner * 4 - 1)  # (2 crops, 2 tokens) just above
    assert not clip_layers.uses_graph_free_layers(clip, torch.zeros(1, 2, width))
    with torch.no_grad():
        assert not clip_layers.uses_graph_free_layers(clip, torch.zeros(1, 2, width))
        assert clip_layers.uses_graph_free_layers(clip, torch.zeros(2, 2, width))
    assert not clip_layers.uses_graph_free_layers(clip, torch.zeros(2, 2, width)), "trainable CLIP weights"
    assert not clip_layers.uses_graph_free_layers(clip, torch.zeros(2, 2, width, device="meta"))
    with torch.no_grad(), FakeTensorMode():
        assert not clip_layers.uses_graph_free_layers(clip, torch.zeros(2, 2, width))


def _reference_layout(embed, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Loop-by-loop re-statement of modeling_phi3_v.py's image embedding (CLIP on all crops, like the reference)."""
    n_img, n_slots = pixel_values.shape[:2]
    feats = embed.clip_features(pixel_values.flatten(0, 1)).reshape(n_img, n_slots, 24, 24, -1)
    out = []
    for i, (h, w) in enumerate(sizes):
        def merged(crop: int, image: int = i) -> list[list[torch.Tensor]]:
            f = feats[image, crop]
            return [
                [torch.cat([f[2 * y, 2 * x], f[2 * y, 2 * x + 1], f[2 * y + 1, 2 * x], f[2 * y + 1, 2 * x + 1]]) for x in range(12)]
                for y in range(12)
            ]

        hc, wc = h // 336, w // 336
        rows: list[torch.Tensor] = []
        grids = {(r, c): merged(1 + r * wc + c) for r in range(hc) for c in range(wc)}
        for r in range(hc):
            for y in range(12):
                for c in range(wc):
                    rows.extend(grids[(r, c)][y])
                rows.append(embed.sub_GN.reshape(-1))
        rows.append(embed.glb_GN.reshape(-1))
        glob = merged(0)
        for y in range(12):
            rows.extend(glob[y])
            rows.append(embed.sub_GN.reshape(-1))
        out.append(torch.stack(rows))
    return embed.img_projection(torch.cat(out))


def test_image_layout_matches_loop_reference(tiny_model: Phi3VForCausalLM) -> None:
    embed = tiny_model.model.vision_embed_tokens
    sizes = [(672, 1008), (1008, 336)]
    pixel_values = torch.randn(2, 7, 3, 336, 336)
    with torch.no_grad():
        ours = embed.image_features(pixel_values, sizes)
        reference = _reference_layout(embed, pixel_values, sizes)
    assert ours.shape[0] == image_token_count(2, 3) + image_token_count(3, 1)
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize(("rows", "cols", "expected"), [(1, 1, 313), (2, 2, 757), (3, 3, 1489), (4, 4, 2509), (3, 4, 1921), (1, 4, 745)])
def test_token_count_formula(rows: int, cols: int, expected: int) -> None:
    assert image_token_count(rows, cols) == expected == 144 * rows * cols + 12 * rows + 157


# -- training-shaped use ------------------------------------------------------------------------------------------


def test_tiny_forward_backward_batch_two_with_two_images_each() -> None:
    model = Phi3VForCausalLM(tiny_config())
    batch = make_batch([[(672, 672), (336, 1008)], [(336, 336), (1008, 672)]])
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 32064)
    assert logits.dtype == torch.float32
    out = model.train()(**batch)
    assert out.logits is None  # training computes logits inside the loss, at supervised positions only
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    dead = model.dead_parameter_names()
    assert all(grads[n] is None for n in dead)
    assert all(grads[n] is not None for n in grads if n not in dead)
    assert grads["model.vision_embed_tokens.sub_GN"].abs().sum() > 0


def test_image_sizes_tensor_and_list_agree(tiny_model: Phi3VForCausalLM) -> None:
    batch = make_batch([[(336, 672)]], num_crops=2)
    with torch.no_grad():
        as_list = tiny_model(**batch).logits
        batch["image_sizes"] = torch.tensor(batch["image_sizes"])
        as_tensor = tiny_model(**batch).logits
    assert torch.equal(as_list, as_tensor)


def test_skipping_padded_crops_changes_no_output(tiny_model: Phi3VForCausalLM) -> None:
    batch = make_batch([[(336, 672)], [(672, 672)]], num_crops=8)
    embed = tiny_model.model.vision_embed_tokens
    with torch.no_grad():
        skipped = tiny_model(**batch).logits
        embed.skip_padded_crops = False
        try:
            full = tiny_model(**batch).logits
        finally:
            embed.skip_padded_crops = True
    assert torch.allclose(skipped, full, atol=1e-6)


def test_eager_and_sdpa_agree_fp32() -> None:
    torch.manual_seed(1)
    eager = Phi3VForCausalLM(tiny_config(attn_implementation="eager")).eval()
    sdpa = Phi3VForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation == "sdpa"
    batch = make_batch([[(336, 672)], [(336, 336)]], num_crops=2)
    with torch.no_grad():
        diff = (eager(**batch).logits - sdpa(**batch).logits).abs().max().item()
    assert diff <= 1e-5


def test_placeholder_feature_mismatch_is_a_clear_error(tiny_model: Phi3VForCausalLM) -> None:
    batch = make_batch([[(336, 672)]], num_crops=2)
    batch["input_ids"][0, 10] = 5  # one placeholder fewer than the image needs
    with pytest.raises(ValueError, match="image placeholder tokens but the images produce"):
        tiny_model(**batch)


def test_dead_parameters_are_last_clip_layer_and_post_layernorm(tiny_model: Phi3VForCausalLM) -> None:
    dead = dead_parameter_names(tiny_model)
    assert dead == tiny_model.dead_parameter_names()
    assert all(".encoder.layers.2." in n or ".post_layernorm." in n for n in dead)
    assert len(dead) == 16 + 2  # one CLIP layer (16 tensors) + post_layernorm weight/bias


# -- traceability -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "phi-3.5-vision"])
def test_forward_backward_under_fake_tensor_mode(preset: str) -> None:
    with FakeTensorMode():
        model = Phi3VForCausalLM(get_config(preset))
        batch = make_batch([[(672, 1344)]], num_crops=16)
        out = model(**batch)
        out.loss.backward()
        assert out.logits.shape[-1] == 32064
        assert model.lm_head.weight.grad is not None


def test_forward_on_meta_device() -> None:
    with torch.device("meta"):
        model = Phi3VForCausalLM(phi35_vision_config())
    batch = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in make_batch([[(336, 672)]], num_crops=4).items()}
    out = model(**batch)
    out.loss.backward()
    assert out.logits.device.type == "meta"


# -- generation ---------------------------------------------------------------------------------------------------


def test_generate_with_kv_cache_matches_greedy_without_cache(tiny_model: Phi3VForCausalLM) -> None:
    batch = make_batch([[(336, 672)]], num_crops=2)
    batch.pop("labels")
    with torch.no_grad():
        cached = tiny_model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=[], min_new_tokens=6)
        ids = batch["input_ids"]
        for _ in range(6):
            logits = tiny_model(
                input_ids=ids,
                pixel_values=batch["pixel_values"],
                image_sizes=batch["image_sizes"],
                use_cache=False,
            ).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)


def test_generate_stops_on_end_tokens(tiny_model: Phi3VForCausalLM) -> None:
    batch = make_batch([[(336, 336)]], num_crops=1)
    batch.pop("labels")
    # Force the model to emit <|end|> first by biasing lm_head towards it.
    model = Phi3VForCausalLM(tiny_model.config).eval()
    model.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        model.lm_head.weight[32007] = model.model.norm.weight.sign() * 50
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 1
    assert out[0, -1].item() == 32007

"""Processor: reference placeholder layout, chat template, training labels, generation prompts, batching, errors."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from PIL import Image

from phi3v_core.errors import ConfigError, DataError
from phi3v_core.processing import Phi3VDataCollator, Phi3VProcessor, image_tags

SECTION12_PROMPT = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is the total?<|end|>\n<|assistant|>\n"
FIX = "use one tag per image, numbered <|image_1|>..<|image_n|> in order"


def runs(ids: list[int]) -> list:
    """Collapse placeholder runs into (id, count) pairs for readable comparisons."""
    out: list = []
    for key, group in itertools.groupby(ids):
        count = len(list(group))
        out.extend([(key, count)] if key < 0 else [key] * count)
    return out


@pytest.fixture(scope="module")
def tiny() -> Phi3VProcessor:
    return Phi3VProcessor.tiny(num_crops=4)


@pytest.fixture(scope="module")
def section12_images() -> list[Image.Image]:
    return [Image.new("RGB", (500, 333), (250, 10, 10)), Image.new("RGB", (300, 710), (10, 250, 10))]


def small(colour: int = 0) -> Image.Image:
    return Image.new("RGB", (20, 20), (colour, colour, colour))


# ---------------------------------------------------------------- reference layout with the real tokenizer
@pytest.mark.parametrize(
    ("num_crops", "tokens", "sizes"),
    [(4, (757, 469), [[672, 672], [672, 336]]), (16, (1921, 2377), [[1008, 1344], [1680, 1008]])],
)
def test_section12_exact_ids(ckpt35, section12_images, num_crops, tokens, sizes) -> None:
    processor = Phi3VProcessor.from_pretrained(ckpt35, num_crops=num_crops)
    out = processor(SECTION12_PROMPT, section12_images, return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert runs(out["input_ids"][0].tolist()) == [
        1, 32010, 29871, 13, (-1, tokens[0]),
        1, 29871, 13, (-2, tokens[1]),
        1, 29871, 13, 5618, 338, 278, 3001, 29973, 32007, 29871, 13, 32001,
    ]  # fmt: skip
    assert out["input_ids"].shape == out["attention_mask"].shape == (1, 4 + tokens[0] + 3 + tokens[1] + 12)
    assert bool(out["attention_mask"].all())
    assert out["image_sizes"].tolist() == sizes
    assert tuple(out["pixel_values"].shape) == (2, num_crops + 1, 3, 336, 336)


def test_default_num_crops_from_checkpoint(ckpt35, ckpt_v1) -> None:
    assert Phi3VProcessor.from_pretrained(ckpt35).num_crops == 4
    assert Phi3VProcessor.from_pretrained(ckpt_v1).num_crops == 16


def test_real_training_example_layout(ckpt35) -> None:
    processor = Phi3VProcessor.from_pretrained(ckpt35, num_crops=1)
    example = processor.encode_conversation([{"user": "What is the total?", "assistant": "42", "images": [small()]}])
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    prompt = [1, 32010, 29871, 13, (-1, 313), 1, 29871, 13, 5618, 338, 278, 3001, 29973, 32007, 29871, 13, 32001]
    answer = [29871, 29946, 29906, 32007, 29871, 13, 32000]  # "42<|end|>\n<|endoftext|>", no BOS
    assert runs(ids) == prompt + answer
    assert labels == [-100] * (len(ids) - len(answer)) + answer


# ---------------------------------------------------------------- tiny tokenizer: same structure
def test_tiny_layout_and_bos_option(section12_images) -> None:
    with_bos = Phi3VProcessor.tiny(num_crops=4)
    ids = runs(with_bos(SECTION12_PROMPT, section12_images)["input_ids"][0].tolist())
    assert ids[:5] == [1, 32010, 259, 13, (-1, 757)]
    assert ids[5:9] == [1, 259, 13, (-2, 469)]
    assert ids[9] == 1 and ids[-1] == 32001 and ids.count(1) == 3
    without = Phi3VProcessor.tiny(num_crops=4, bos_after_image=False)
    ids = runs(without(SECTION12_PROMPT, section12_images)["input_ids"][0].tolist())
    assert ids[:5] == [1, 32010, 259, 13, (-1, 757)]
    assert ids[5:8] == [259, 13, (-2, 469)]
    assert ids.count(1) == 1


def test_concatenated_tags_get_bos_between_images(tiny) -> None:
    ids = runs(tiny("<|image_1|><|image_2|>\nx", [small(), small(9)])["input_ids"][0].tolist())
    assert ids[:4] == [1, (-1, 757), 1, (-2, 757)]


def test_text_only_call(tiny) -> None:
    out = tiny("<|user|>\nhi<|end|>\n<|assistant|>\n")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    h, i = tiny.tokenizer.convert_tokens_to_ids(["h", "i"])
    assert out["input_ids"][0].tolist() == [1, 32010, 259, 13, h, i, 32007, 259, 13, 32001]


def test_apply_chat_template(tiny) -> None:
    messages = [{"role": "user", "content": f"{image_tags(2)}Q"}]
    assert tiny.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|user|>\n<|image_1|><|image_2|>\nQ<|end|>\n<|assistant|>\n"
    )


# ---------------------------------------------------------------- training examples
def test_encode_conversation_labels_and_auto_tags(tiny) -> None:
    example = tiny.encode_conversation([{"user": "Q?", "assistant": "yes", "images": [small(), small(5)]}])
    ids, labels = example["input_ids"], example["labels"]
    answer = tiny.tokenizer("yes<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids[-len(answer) :].tolist() == answer and labels[-len(answer) :].tolist() == answer
    assert bool((labels[: -len(answer)] == -100).all())
    explicit = tiny(
        tiny.apply_chat_template([{"role": "user", "content": "<|image_1|><|image_2|>\nQ?"}], True), [small(), small(5)]
    )
    assert ids[: -len(answer)].tolist() == explicit["input_ids"][0].tolist()
    assert example["image_sizes"] == [(672, 672), (672, 672)]
    assert tuple(example["pixel_values"].shape) == (2, 5, 3, 336, 336)
    assert tiny.decode(labels[labels >= 0], skip_special_tokens=False) == "yes<|end|> \n<|endoftext|>"


def test_multi_turn_per_turn_processing(tiny) -> None:
    turns = [
        {"user": "<|image_1|><|image_2|>\nfirst?", "assistant": "a", "images": [small(), small(1)]},
        {"user": "second?", "assistant": "b"},
    ]
    example = tiny.encode_conversation(turns)
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    assert ids.count(1) == 4  # BOS per turn and after each image (reference per-turn processor calls)
    supervised = tiny.decode([t for t in labels if t >= 0], skip_special_tokens=False)
    assert supervised == "a<|end|> \n<|endoftext|> b<|end|> \n<|endoftext|>"
    eot = [i for i, t in enumerate(ids) if t == 32000]
    assert len(eot) == 2 and all(labels[i] == 32000 for i in eot)
    assert example["pixel_values"].shape[0] == 2 and len(example["image_sizes"]) == 2


def test_images_in_later_turns_numbering(tiny) -> None:
    first = {"user": "one", "assistant": "a", "images": [small()]}
    per_turn = tiny.encode_conversation([first, {"user": "<|image_1|>\ntwo", "assistant": "b", "images": [small(7)]}])
    global_numbers = tiny.encode_conversation(
        [first, {"user": "<|image_2|>\ntwo", "assistant": "b", "images": [small(7)]}]
    )
    auto = tiny.encode_conversation([first, {"user": "two", "assistant": "b", "images": [small(7)]}])
    assert per_turn["input_ids"].tolist() == global_numbers["input_ids"].tolist() == auto["input_ids"].tolist()
    assert sorted({t for t in per_turn["input_ids"].tolist() if t < 0}) == [-2, -1]


def test_encode_prompt_for_generation(tiny) -> None:
    prompt = tiny.encode_prompt("Describe.", small())
    assert set(prompt) == {"input_ids", "pixel_values", "image_sizes"}
    assert prompt["input_ids"][-1].item() == 32001
    training = tiny.encode_conversation([{"user": "Describe.", "assistant": "x", "images": [small()]}])
    assert prompt["input_ids"].tolist() == training["input_ids"][training["labels"] == -100].tolist()
    history = [{"user": "q1", "assistant": "a1"}, {"user": "q2", "assistant": "ground truth, ignored"}]
    encoded = tiny.encode_prompt(history)
    expected = (
        tiny.encode_conversation(history[:1])["input_ids"].tolist() + tiny.encode_prompt("q2")["input_ids"].tolist()
    )
    assert encoded["input_ids"].tolist() == expected and encoded["pixel_values"] is None


# ---------------------------------------------------------------- batches
def test_batched_call_right_and_left_padding(tiny) -> None:
    texts = ["<|image_1|>\nshort", "<|image_1|><|image_2|>\na much longer prompt"]
    images = [[small()], [Image.new("RGB", (40, 20)), small(3)]]
    right = tiny(texts, images)
    left = tiny(texts, images, padding_side="left")
    singles = [tiny(text, imgs)["input_ids"][0] for text, imgs in zip(texts, images)]
    n0, n1 = len(singles[0]), len(singles[1])
    assert right["input_ids"].shape == left["input_ids"].shape == (2, n1)
    assert right["input_ids"][0, :n0].tolist() == singles[0].tolist()
    assert bool((right["input_ids"][0, n0:] == 32000).all())
    assert left["input_ids"][0, n1 - n0 :].tolist() == singles[0].tolist()
    assert right["attention_mask"].sum(1).tolist() == left["attention_mask"].sum(1).tolist() == [n0, n1]
    assert left["attention_mask"][0, : n1 - n0].sum() == 0
    assert right["image_sizes"].tolist() == [[672, 672], [336, 672], [672, 672]]
    assert right["pixel_values"].shape[0] == 3
    assert torch.equal(right["pixel_values"][1], tiny.image_processor(images[1][0])["pixel_values"][0])


def test_encoded_examples_collate_with_real_eos_unmasked(tiny) -> None:
    examples = [
        tiny.encode_conversation([{"user": "q", "assistant": "a", "images": [small()]}]),
        tiny.encode_conversation([{"user": "longer question", "assistant": "longer answer"}]),
    ]
    batch = Phi3VDataCollator(pad_token_id=tiny.pad_token_id)(examples)
    first = examples[0]["input_ids"].numel()
    assert batch["input_ids"][0, first - 1].item() == 32000 and batch["attention_mask"][0, first - 1].item() == 1
    assert batch["attention_mask"][0].sum().item() == first
    assert batch["image_sizes"] == [(672, 672)] and batch["pixel_values"].shape[0] == 1


# ---------------------------------------------------------------- persistence and decoding
def test_save_and_reload(tmp_path, tiny) -> None:
    processor = Phi3VProcessor.tiny(num_crops=9, bos_after_image=False)
    processor.save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reloaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert (reloaded.num_crops, reloaded.bos_after_image) == (9, False)
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=2).num_crops == 2
    text = "<|image_1|>\nsame ids?"
    assert reloaded(text, [small()])["input_ids"].tolist() == processor(text, [small()])["input_ids"].tolist()
    assert Phi3VProcessor.from_pretrained("tiny").num_crops == 4


def test_decode_drops_placeholders(tiny) -> None:
    out = tiny("<|image_1|>\nhello", [small()])
    assert tiny.decode(out["input_ids"][0]) == "\nhello"
    assert tiny.batch_decode(out["input_ids"]) == ["\nhello"]
    assert tiny.decode(out["input_ids"][0], skip_special_tokens=False) == "<s><s> \nhello"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("text", "n_images", "message"),
    [
        ("<|image_1|>\nq", 2, f"text has 1 image tag(s) (<|image_1|>) but 2 image(s) were given; {FIX}"),
        ("no tags", 1, f"text has 0 image tag(s) (none) but 1 image(s) were given; {FIX}"),
        (
            "<|image_1|><|image_2|>",
            0,
            f"text has 2 image tag(s) (<|image_1|>, <|image_2|>) but 0 image(s) were given; {FIX}",
        ),
        ("<|image_1|><|image_3|>", 2, f"image tags must be numbered 1..2 (got <|image_1|>, <|image_3|>); {FIX}"),
        (
            "<|image_1|><|image_1|>",
            2,
            f"image tag <|image_1|> appears more than once (<|image_1|>, <|image_1|>); {FIX}",
        ),
        ("<|image_2|><|image_1|>", 2, f"image tags must appear in order (got <|image_2|>, <|image_1|>); {FIX}"),
    ],
)
def test_tag_errors(tiny, text, n_images, message) -> None:
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        tiny(text, [small(i) for i in range(n_images)] or None)


def test_conversation_errors_name_the_location(tiny) -> None:
    turns = [{"user": "q", "assistant": "a"}, {"user": "<|image_2|>", "assistant": "b", "images": [small()]}]
    message = f"train.jsonl:3: turn 2: image tags must be numbered 1..1 (got <|image_2|>); {FIX}"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        tiny.encode_conversation(turns, where="train.jsonl:3")
    bad = [{"user": 5, "assistant": "a"}, {"user": "q"}, "nope"]
    message = (
        "3 problems: train.jsonl:4: turn 1: 'user' must be a string; train.jsonl:4: turn 2: 'assistant' must be a "
        "string; train.jsonl:4: turn 3 must be a mapping with 'user', 'assistant' and optional 'images'"
    )
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        tiny.encode_conversation(bad, where="train.jsonl:4")
    with pytest.raises(DataError, match="^conversation must be a non-empty list of turns$"):
        tiny.encode_conversation([])


def test_batch_images_must_be_per_text(tiny) -> None:
    message = "for a batch of 2 texts pass images as one list (or None) per text (got 2 entries)"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        tiny(["<|image_1|>", "<|image_1|>"], [small(), small()])


def test_corrupt_image_path_in_conversation(tiny, tmp_path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=f"^cannot read image {re.escape(str(path))}: not an image or corrupt"):
        tiny.encode_conversation([{"user": "q", "assistant": "a", "images": [str(path)]}])


def test_tags_checked_before_images_are_read(tiny, tmp_path) -> None:
    missing = str(tmp_path / "never-opened.png")
    with pytest.raises(DataError, match="^text has 0 image tag"):
        tiny("no tags here", [missing])
    with pytest.raises(DataError, match=r"^turn 2: image tags must be numbered 1\.\.1"):
        tiny.encode_conversation(
            [
                {"user": "q", "assistant": "a", "images": [missing]},
                {"user": "<|image_5|>", "assistant": "b", "images": [missing]},
            ]
        )


def test_from_pretrained_missing_folder(tmp_path) -> None:
    message = f"processor folder not found: {tmp_path / 'nope'} (pass a Phi-3-vision checkpoint folder)"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Phi3VProcessor.from_pretrained(tmp_path / "nope")

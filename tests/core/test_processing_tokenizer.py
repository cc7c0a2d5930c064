"""Tokenizers: the real Phi-3 tokenizer from the checkpoint and the tiny offline one."""

from __future__ import annotations

import json
import re

import pytest

from phi3v_core.errors import ConfigError
from phi3v_core.processing import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer

OFFICIAL_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|placeholder1|>": 32002,
    "<|placeholder4|>": 32005,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|placeholder5|>": 32008,
    "<|placeholder6|>": 32009,
    "<|user|>": 32010,
    "<|placeholder7|>": 32011,
    "<|placeholder39|>": 32043,
    "<|image|>": 32044,
}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def test_tiny_special_ids_and_vocab_bound(tiny) -> None:
    for content, token_id in OFFICIAL_IDS.items():
        assert tiny.convert_tokens_to_ids(content) == token_id, content
    assert len(SPECIAL_TOKENS) == 48
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id, tiny.unk_token_id) == (1, 32000, 32000, 0)
    assert max(tiny.get_vocab().values()) == 32044 < 32064
    assert tiny.padding_side == "right"


def test_tiny_matches_real_added_tokens(tiny, ckpt35) -> None:
    config = json.loads((ckpt35 / "tokenizer_config.json").read_text())
    real = {int(k): (v["content"], v["special"], v["rstrip"]) for k, v in config["added_tokens_decoder"].items()}
    ours = {token_id: (content, special, rstrip) for token_id, content, special, rstrip in SPECIAL_TOKENS}
    assert ours == real
    assert config["chat_template"] == CHAT_TEMPLATE == tiny.chat_template


def test_tiny_adds_bos_and_round_trips(tiny) -> None:
    texts = ["hello world", " leading space", "Ünïcödé ✓ 😀 and\nnew\tlines", "What is the total? 42."]
    for text in texts:
        ids = tiny(text)["input_ids"]
        assert ids[0] == 1 and 1 not in ids[1:]
        assert tiny.decode(ids, skip_special_tokens=True) == text
        assert tiny(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tiny("")["input_ids"] == [1]


def test_tiny_rstrip_and_newline_like_real(tiny) -> None:
    # <|assistant|> has rstrip=True: the "\n" the chat template puts after it is swallowed (as Microsoft's processor does).
    assert tiny("<|assistant|>\n", add_special_tokens=False)["input_ids"] == [32001]
    # "\n" after a special token: "▁" then the byte-fallback <0x0A> = 13, the same id as the real tokenizer.
    ids = tiny("<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids == [32007, tiny.convert_tokens_to_ids("▁"), 13, 32000]


def test_tiny_chat_template(tiny) -> None:
    messages = [{"role": "user", "content": "<|image_1|>\nQ"}, {"role": "assistant", "content": "A"}]
    assert (
        tiny.apply_chat_template(messages, tokenize=False)
        == "<|user|>\n<|image_1|>\nQ<|end|>\n<|assistant|>\nA<|end|>\n"
    )
    prompt = tiny.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n<|image_1|>\nQ<|end|>\n<|assistant|>\n"
    assert not prompt.startswith("<s>")


def test_tiny_builds_independent_tokenizers() -> None:
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    first.padding_side = "left"
    assert second.padding_side == "right"


def test_tiny_save_and_reload(tiny, tmp_path) -> None:
    tiny.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    text = "<|user|>\nhi there<|end|>\n<|assistant|>\n"
    assert reloaded(text)["input_ids"] == tiny(text)["input_ids"]
    assert reloaded.chat_template == CHAT_TEMPLATE


def test_real_tokenizer_section12_chunks(ckpt35) -> None:
    tokenizer = load_tokenizer(ckpt35)
    assert tokenizer("<|user|>\n")["input_ids"] == [1, 32010, 29871, 13]
    assert tokenizer("\n")["input_ids"] == [1, 29871, 13]
    chunk = "\nWhat is the total?<|end|>\n<|assistant|>\n"
    assert tokenizer(chunk)["input_ids"] == [1, 29871, 13, 5618, 338, 278, 3001, 29973, 32007, 29871, 13, 32001]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (32000, 32000, "right")
    for content, token_id in OFFICIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(content) == token_id


def test_real_v1_tokenizer_loads(ckpt_v1) -> None:
    assert load_tokenizer(ckpt_v1)("<|user|>\n")["input_ids"] == [1, 32010, 29871, 13]


def test_load_tokenizer_missing_folder(tmp_path) -> None:
    expected = (
        f"{tmp_path / 'tokenizer.json'} not found: pass a Phi-3-vision checkpoint folder (or use the tiny tokenizer)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_rejects_other_tokenizers(tmp_path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"<unk>": 0, "<|end|>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"not a Phi-3 tokenizer \(<s>=None \(expected 1\), </s>=None \(expected 2\)"):
        load_tokenizer(tmp_path)

"""Tokenizers: the real Phi-3 tokenizer from a local folder, and a tiny offline one with the same special tokens.

The tiny tokenizer lets tests, the tiny model and benchmarks run without any checkpoint. It copies everything of the
real tokenizer that the pipeline depends on: the special tokens and their ids (the checkpoint's tokenizer_config.json), their ``rstrip`` flags
(``<|assistant|>\\n`` swallows the newline, as Microsoft's processor does), the SentencePiece-style normalizer ("▁" prepended, spaces become
"▁"), BOS added by the post-processor, byte fallback with ``<0x00>``..``<0xFF>`` at ids 3..258 (so ``\\n`` is id 13 in
both), the decoder and the chat template. Its ordinary vocabulary is just "▁" and printable ASCII (no merges), so
text becomes roughly one token per character. All ids are < 32064, the model's embedding size.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from phi3v_core.constants import CONTEXT_LENGTH
from phi3v_core.errors import ConfigError

__all__ = [
    "ASSISTANT_TOKEN_ID",
    "BOS_TOKEN_ID",
    "CHAT_TEMPLATE",
    "END_TOKEN_ID",
    "ENDOFTEXT_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "USER_TOKEN_ID",
    "build_tiny_tokenizer",
    "load_tokenizer",
]

BOS_TOKEN_ID = 1
ENDOFTEXT_TOKEN_ID = 32000
PAD_TOKEN_ID = ENDOFTEXT_TOKEN_ID  # Phi-3 pads with <|endoftext|>, which is also the tokenizer's eos.
ASSISTANT_TOKEN_ID = 32001
END_TOKEN_ID = 32007
USER_TOKEN_ID = 32010
IMAGE_TOKEN_ID = 32044

#: The official chat template (tokenizer_config.json of both checkpoints): no BOS, no default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)


def _special_tokens() -> list[tuple[int, str, bool, bool]]:
    """``(id, content, special, rstrip)`` of every added token of the official tokenizer, in id order."""
    tokens: list[tuple[int, str, bool, bool]] = [
        (0, "<unk>", True, False),
        (1, "<s>", True, False),
        (2, "</s>", False, True),
        (32000, "<|endoftext|>", True, False),
        (32001, "<|assistant|>", True, True),
    ]
    tokens += [(32002 + i, f"<|placeholder{i + 1}|>", True, True) for i in range(4)]
    tokens += [(32006, "<|system|>", True, False), (32007, "<|end|>", True, False)]
    tokens += [(32008, "<|placeholder5|>", True, True), (32009, "<|placeholder6|>", True, True)]
    tokens += [(32010, "<|user|>", True, False)]
    tokens += [(32011 + i, f"<|placeholder{i + 7}|>", True, True) for i in range(33)]
    tokens += [(32044, "<|image|>", True, True)]
    return tokens


#: Added tokens of the official tokenizer: ``(id, content, special, rstrip)``.
SPECIAL_TOKENS: tuple[tuple[int, str, bool, bool], ...] = tuple(_special_tokens())

_TOKENIZER_KWARGS = {
    "bos_token": "<s>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
    "padding_side": "right",
    "clean_up_tokenization_spaces": False,
    "model_max_length": CONTEXT_LENGTH,
}


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the Phi-3 tokenizer from a local folder (``tokenizer.json`` + ``tokenizer_config.json``), offline.

    Uses the generic fast tokenizer class directly: ``AutoTokenizer`` would read ``config.json``, see the hub's
    ``auto_map`` and ask about remote code, and ``LlamaTokenizer`` may rebuild the normalizer.

    Args:
        folder: A checkpoint folder, or a folder written by ``Phi3VProcessor.save_pretrained``.

    Returns:
        The tokenizer (BOS added, pad = eos = ``<|endoftext|>`` (32000), padding side right).

    Raises:
        ConfigError: If the folder has no ``tokenizer.json`` or its special tokens are not Phi-3's.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            f"{folder / 'tokenizer.json'} not found: pass a Phi-3-vision checkpoint folder (or use the tiny tokenizer)"
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    _check_special_ids(tokenizer, folder)
    return tokenizer


def _check_special_ids(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Fail early if a tokenizer's special tokens do not have Phi-3's ids (the model relies on them)."""
    wrong = [
        f"{content}={tokenizer.convert_tokens_to_ids(content)} (expected {token_id})"
        for token_id, content, _, _ in SPECIAL_TOKENS
        if tokenizer.convert_tokens_to_ids(content) != token_id
    ]
    if wrong or tokenizer.pad_token_id != PAD_TOKEN_ID or tokenizer.bos_token_id != BOS_TOKEN_ID:
        details = ", ".join(wrong[:3]) or f"bos={tokenizer.bos_token_id}, pad={tokenizer.pad_token_id}"
        raise ConfigError(f"{folder}: not a Phi-3 tokenizer ({details}); use the checkpoint's tokenizer files")


@functools.lru_cache(maxsize=1)
def _tiny_backend_json() -> str:
    """Serialized ``tokenizers`` backend of the tiny tokenizer (built once per process)."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    # Byte-fallback pieces at the same ids as Llama/Phi-3 (3..258), so "\n" = <0x0A> = 13 in both tokenizers.
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    vocab["▁"] = 259
    vocab.update({chr(code): 260 + i for i, code in enumerate(range(33, 127))})
    # Special tokens live in the model vocabulary at their official ids; the gap 354..31999 stays unused, which is
    # what lets a tiny tokenizer reproduce ids up to 32044 without 32000 filler pieces.
    vocab.update({content: token_id for token_id, content, _, _ in SPECIAL_TOKENS})
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    backend.add_special_tokens(
        [
            AddedToken(content, special=special, rstrip=rstrip, lstrip=False, normalized=False, single_word=False)
            for _, content, special, rstrip in SPECIAL_TOKENS
        ]
    )
    return backend.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Build the tiny offline Phi-3-compatible tokenizer (fast: the backend is cached, a fresh wrapper is returned).

    Returns:
        A new ``PreTrainedTokenizerFast`` with the official special tokens/ids, BOS, chat template and decoder.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_backend_json()),
        additional_special_tokens=["<|system|>", "<|end|>", "<|user|>"],
        chat_template=CHAT_TEMPLATE,
        **_TOKENIZER_KWARGS,
    )
    return tokenizer

"""A tiny, deterministic, offline tokenizer with a Qwen-like (ChatML) chat template.

Design
------
* Model: byte-pair encoding over a fixed base alphabet of single characters (printable ASCII,
  ``"\\n"`` and ``"\\t"``), plus merges that turn each of the few words the task and the chat
  template use (``user``, ``assistant``, ``What``, ...) into one token. Any ASCII text therefore
  round-trips exactly through encode/decode; other characters map to ``<unk>``.
* Digits are never merged: every digit is its own token.
* ``"\\n"`` is exactly one token (verl's ``QwenContinuousTokenBuilder`` requires it).
* Special tokens: ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (1), ``<|im_end|>`` (eos, 2),
  ``<unk>`` (3), as in Qwen2 (where ``<|endoftext|>`` is also the pad token).
* Decoding concatenates tokens (``decoders.Fuse``), so ``decode(encode(s)) == s``.
"""

from __future__ import annotations

import os
from typing import Any, Union

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Base alphabet: "\n", "\t" and printable ASCII (space .. "~"), in a fixed order.
BASE_CHARS = ("\n", "\t") + tuple(chr(c) for c in range(32, 127))

# Words that become single tokens (chat roles, the task's words, a few common ones).
WORDS = (
    "system",
    "user",
    "assistant",
    "tool",
    "What",
    "is",
    "the",
    "sum",
    "of",
    "and",
    "plus",
    "Answer",
)

# Qwen2-style ChatML template (no default system prompt, no tool rendering). Message content may
# be a string or a list of {"type": "text", "text": ...} parts. Every turn ends with
# "<|im_end|>\n"; the generation prompt is "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is not none %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

TokenizerLike = Any


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + BASE_CHARS:
        vocab[tok] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        prefix = word[0]
        for ch in word[1:]:
            merged = prefix + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((prefix, ch))
            prefix = merged
    return vocab, merges


def build_tokenizer():
    """Build the tiny tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges()
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, fuse_unk=False))
    # Letters runs are BPE words (so merges only apply inside them); every other character
    # (digits, spaces, "\n", punctuation) is its own piece.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=None,
        additional_special_tokens=[IM_START_TOKEN],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: Union[str, os.PathLike]):
    """Load a saved tiny tokenizer the way verl does (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _encode(tok: TokenizerLike, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    if hasattr(ids, "ids"):  # a raw ``tokenizers.Encoding``
        ids = ids.ids
    return list(ids)


def check_tokenizer(path_or_tokenizer: Union[str, os.PathLike, TokenizerLike]):
    """Check that a tokenizer works with verl's Qwen ChatML handling; return the tokenizer.

    Raises ``ValueError`` with a clear message when ``"\\n"`` does not encode to exactly one token
    (verl's ``QwenContinuousTokenBuilder`` rejects such tokenizers) or when ``<|im_end|>`` is not
    a single known token.
    """
    tok = path_or_tokenizer
    if isinstance(path_or_tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(path_or_tokenizer)
    newline_ids = _encode(tok, "\n")
    if len(newline_ids) != 1:
        raise ValueError(
            'tokenizer check failed: the newline "\\n" must encode to exactly one token '
            f"(verl's Qwen ChatML continuous-token builder requires it), got {newline_ids!r}"
        )
    im_end_ids = _encode(tok, EOS_TOKEN)
    if len(im_end_ids) != 1:
        raise ValueError(
            f"tokenizer check failed: {EOS_TOKEN!r} must be a single token, got {im_end_ids!r}"
        )
    unk_id = getattr(tok, "unk_token_id", None)
    if unk_id is not None and im_end_ids[0] == unk_id:
        raise ValueError(f"tokenizer check failed: {EOS_TOKEN!r} is not in the vocabulary (maps to unk)")
    return tok

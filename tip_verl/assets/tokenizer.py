"""A tiny, deterministic, offline tokenizer with a Qwen-like (ChatML) chat template.

Design
------
* The pipeline is exactly Qwen2's (``transformers``' ``Qwen2Tokenizer``): NFC normalisation, Qwen's
  pre-tokenisation regex, byte-level BPE, byte-level decoding. This matters: ``AutoTokenizer`` loads a
  checkpoint whose ``config.json`` says ``model_type: qwen2`` as ``Qwen2Tokenizer``, which rebuilds
  that pipeline from the saved vocabulary and merges and ignores the saved pre-tokenizer, so any
  other pipeline would silently change (e.g. ``"\n"`` would encode to nothing).
* Vocabulary: four special tokens, the 256 byte-level symbols (so any text round-trips exactly and no
  unknown token is ever needed), and merges that make each of the few words the task and the chat
  template use (``user``, ``assistant``, ``What``, `` is``, ...) a single token.
* Digits are never merged (Qwen's regex isolates each digit): every digit is its own token.
* ``"\n"`` is exactly one token (``"Ċ"``), which verl's ``QwenContinuousTokenBuilder`` requires.
* Special tokens: ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (1), ``<|im_end|>`` (eos, 2),
  ``<unk>`` (3), as in Qwen2 (where ``<|endoftext|>`` is also the pad token).
"""

from __future__ import annotations

import os
from typing import Any, Union

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Qwen2's pre-tokenisation regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Words that become single tokens, both bare and with a leading space (chat roles, the task's words).
WORDS = (
    "assistant",
    "system",
    "Answer",
    "What",
    "user",
    "tool",
    "plus",
    "sum",
    "and",
    "the",
    "of",
    "is",
)
# Punctuation pieces with a leading space that the prompts use.
SPACED_SYMBOLS = ("+", "=")

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/Qwen byte-level alphabet: byte value -> printable unicode symbol (fixed order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level(text: str) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _merge_forms() -> list[str]:
    """Byte-level forms that must be single tokens; longer forms first (see ``_vocab_and_merges``)."""
    forms = []
    for word in WORDS:
        forms += [_byte_level(" " + word), _byte_level(word)]
    forms += [_byte_level(" " + sym) for sym in SPACED_SYMBOLS]
    return sorted(forms, key=lambda f: (-len(f), f))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    table = bytes_to_unicode()
    for b in range(256):
        vocab[table[b]] = len(vocab)
    # Each form is built by a left-to-right chain of merges (prefix, next symbol). Chains of longer
    # forms get lower ranks, so while a form is being merged its own next merge always wins over
    # merges of shorter words that match inside it; build_tokenizer() verifies every form is one token.
    merges: list[tuple[str, str]] = []
    for form in _merge_forms():
        prefix = form[0]
        for ch in form[1:]:
            merged = prefix + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((prefix, ch))
            prefix = merged
    return vocab, merges


def build_tokenizer():
    """Build the tiny tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges()
    core = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
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
    for word in WORDS:
        for text in (word, " " + word):
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) != 1:  # a merge-order bug, not a runtime condition
                raise AssertionError(f"tokenizer build: {text!r} is not one token: {ids}")
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

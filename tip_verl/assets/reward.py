"""Rule reward for the tiny addition task (``data_source == "tip_tiny_addition"``).

The response is a worked solution whose last line is the answer; only that line is checked.

This file is loaded by verl from its path
(``reward.custom_reward_function.path=<this file> reward.custom_reward_function.name=compute_score``),
so it must stay importable on its own: standard library only, no relative imports.
"""

import re

# Tokens that may appear in a decoded response (verl decodes with skip_special_tokens=True, but
# other callers may keep them). Text from the first end-of-turn/pad token on is ignored.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<pad>", "</s>")
_OTHER_SPECIALS = ("<|im_start|>",)
_WHITESPACE = re.compile(r"\s+")


def _cut_at_stop(text) -> str:
    """The text before the first stop token."""
    text = "" if text is None else str(text)
    for stop in _STOP_TOKENS:
        pos = text.find(stop)
        if pos >= 0:
            text = text[:pos]
    return text


def normalize(text) -> str:
    """Cut at the first stop token, drop other special tokens and all whitespace."""
    text = _cut_at_stop(text)
    for special in _OTHER_SPECIALS:
        text = text.replace(special, "")
    return _WHITESPACE.sub("", text)


def final_answer(text) -> str:
    """The last non-empty line of a response (cut at the first stop token), without whitespace."""
    lines = [line for line in (normalize(part) for part in _cut_at_stop(text).splitlines()) if line]
    return lines[-1] if lines else ""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the response's last line is exactly the expected answer (see :func:`final_answer`)."""
    expected = normalize(ground_truth)
    if not expected:
        return 0.0
    return 1.0 if final_answer(solution_str) == expected else 0.0

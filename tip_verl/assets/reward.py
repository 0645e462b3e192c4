"""Rule reward for the tiny addition task (``data_source == "tip_tiny_addition"``).

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


def normalize(text) -> str:
    """Cut at the first stop token, drop other special tokens and all whitespace."""
    text = "" if text is None else str(text)
    for stop in _STOP_TOKENS:
        pos = text.find(stop)
        if pos >= 0:
            text = text[:pos]
    for special in _OTHER_SPECIALS:
        text = text.replace(special, "")
    return _WHITESPACE.sub("", text)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the response is exactly the expected answer (after :func:`normalize`), else 0.0."""
    expected = normalize(ground_truth)
    if not expected:
        return 0.0
    return 1.0 if normalize(solution_str) == expected else 0.0

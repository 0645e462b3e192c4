"""tip_verl: Token Importance in on-Policy distillation (TIP) for verl.

This top-level package is the pure-torch core (signals, scores, selection, taxonomy, config,
pipeline). It never imports verl; the verl integration lives in ``tip_verl.verl_adapter``.
"""

from .config import METHODS, TIPConfig
from .pipeline import TIPSelection, select_for_batch
from .scoring import minmax_normalize, token_scores
from .selection import SampledTokens, sample_tokens, select_tokens
from .signals import full_logits_divergences, normalized_entropy, sampled_token_divergence, topk_divergences
from .taxonomy import classify_quadrants, quadrant_stats

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SampledTokens",
    "TIPConfig",
    "TIPSelection",
    "__version__",
    "classify_quadrants",
    "full_logits_divergences",
    "minmax_normalize",
    "normalized_entropy",
    "quadrant_stats",
    "sample_tokens",
    "sampled_token_divergence",
    "select_for_batch",
    "select_tokens",
    "token_scores",
    "topk_divergences",
]

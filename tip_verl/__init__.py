"""tip_verl: Token Importance in on-Policy distillation (TIP) for verl.

This package is the method in pure torch: signals (``signals``), the selection rules (``scoring``, one
registry), top-ρ and sampling (``selection``), the quadrant taxonomy (``taxonomy``), ``TIPConfig``
(``config``), one call per batch (``pipeline.select_for_batch``), the kept-row lm_head
(``kept_logprobs``) and the one row-chunking rule they and the adapter share (``chunking``). Importing it imports torch and nothing else; none of these modules imports verl.

Subpackages: ``tip_verl.verl_adapter`` (the verl integration; imports verl), ``tip_verl.analysis``
(token records and the report; needs pandas, pyarrow, matplotlib), ``tip_verl.assets`` (tiny built-in
models and task; needs transformers) and ``tip_verl.tools`` (math data and evaluation; uses verl's scorer).
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

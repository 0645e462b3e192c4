"""tip_verl: Token Importance in on-Policy distillation (TIP) for verl.

This package is the method in pure torch: signals (``signals``), the selection rules (``scoring``, one
registry), top-ρ and sampling (``selection``), the quadrant taxonomy (``taxonomy``), ``TIPConfig``
(``config``), one call per batch (``pipeline.select_for_batch``), the kept-row lm_head
(``kept_logprobs``) and the one row-chunking rule they and the adapter share (``chunking``). Importing
the package imports nothing (its names load on first use); the modules import torch and none of them
imports verl.

Subpackages: ``tip_verl.verl_adapter`` (the verl integration; imports verl), ``tip_verl.analysis``
(token records and the report; needs pandas, pyarrow, matplotlib), ``tip_verl.assets`` (tiny built-in
models and task; needs transformers) and ``tip_verl.tools`` (math data and evaluation; uses verl's scorer).
"""

from importlib import import_module

# The public names, loaded on first use (PEP 562): ``import tip_verl`` itself imports nothing, so the
# small command-line helpers under it (cpu_overrides, assets --json, console_metrics) start without torch.
_EXPORTS = {
    "METHODS": "config",
    "TIPConfig": "config",
    "TIPSelection": "pipeline",
    "select_for_batch": "pipeline",
    "minmax_normalize": "scoring",
    "token_scores": "scoring",
    "SampledTokens": "selection",
    "sample_tokens": "selection",
    "select_tokens": "selection",
    "full_logits_divergences": "signals",
    "normalized_entropy": "signals",
    "sampled_token_divergence": "signals",
    "topk_divergences": "signals",
    "classify_quadrants": "taxonomy",
    "quadrant_stats": "taxonomy",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tip_verl' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


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

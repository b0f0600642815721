"""Activation sparsity for Hugging Face causal LMs (Dhar et al., IPCCC 2024, arXiv 2412.12178).

The verbs: :func:`collect_stats` -> :class:`ActivationStats` -> :meth:`ActivationStats.thresholds`
-> :class:`Thresholds` -> :func:`sparsify_` / :func:`unsparsify_`; :func:`perplexity` to score.
Importing this package does not import transformers; loading a model does.
"""

from dormant.llm.adapters import FFN_SPECS, FFNLayout, FFNSpec, Tap, UnsupportedModelError, ffn_layout
from dormant.llm.sites import SITES, site_taps
from dormant.llm.sparsify import is_sparsified, sparsify_, unsparsify_
from dormant.llm.stats import ActivationStats, MagnitudeHistogram, collect_stats
from dormant.llm.thresholds import Thresholds, calibrate

__all__ = [
    "FFN_SPECS",
    "FFNLayout",
    "FFNSpec",
    "Tap",
    "UnsupportedModelError",
    "ffn_layout",
    "SITES",
    "site_taps",
    "sparsify_",
    "unsparsify_",
    "is_sparsified",
    "ActivationStats",
    "MagnitudeHistogram",
    "collect_stats",
    "Thresholds",
    "calibrate",
]

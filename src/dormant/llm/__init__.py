"""Activation sparsity for Hugging Face causal LMs (Dhar et al., IPCCC 2024, arXiv 2412.12178).

The verbs a user calls::

    model, tok, info = load_model("smollm2-135m")                      # HF id, folder, .gguf or alias
    thr = calibrate(model, calib_ids, CalibrationConfig("intermediate", [0.5]))   # -> Thresholds
    with sparsified(model, thr):                                        # or sparsify_ / unsparsify_
        ppl = perplexity(model, eval_ids).ppl
    enable_sparse_decode_(model)                                        # 1-token decode through sparse kernels

plus :func:`collect_stats` (one pass, any target read later), :func:`measure_sparsity`, :func:`collect_trace`
(active-neuron traces) and the text windows of :mod:`dormant.llm.text`. Internals (the adapter table, histograms,
hooks) stay in their modules. Importing this package does not import transformers; loading a model does.
"""

from dormant.llm.adapters import FFNLayout, Tap, UnsupportedModelError, ffn_layout
from dormant.llm.calibrate import CalibrationConfig, calibrate, refine
from dormant.llm.masks import collect_trace
from dormant.llm.models import ModelConfig, load_model
from dormant.llm.perplexity import PerplexityResult, perplexity
from dormant.llm.sites import SITES, site_taps
from dormant.llm.sparse_decode import disable_sparse_decode_, enable_sparse_decode_, sparse_decode_stats
from dormant.llm.sparsify import is_sparsified, measure_sparsity, sparsified, sparsify_, unsparsify_
from dormant.llm.stats import ActivationStats, StatsConfig, collect_stats
from dormant.llm.text import (
    CalibDataConfig,
    EvalConfig,
    Windows,
    load_calib_windows,
    load_eval_windows,
    load_text,
    make_windows,
)
from dormant.llm.thresholds import Thresholds
from dormant.traces import ActivationTrace

__all__ = [
    "load_model", "ModelConfig",
    "calibrate", "CalibrationConfig", "refine", "collect_stats", "StatsConfig", "ActivationStats", "Thresholds",
    "sparsify_", "unsparsify_", "sparsified", "is_sparsified", "measure_sparsity",
    "perplexity", "PerplexityResult",
    "enable_sparse_decode_", "disable_sparse_decode_", "sparse_decode_stats",
    "collect_trace", "ActivationTrace",
    "ffn_layout", "FFNLayout", "Tap", "UnsupportedModelError", "SITES", "site_taps",
    "EvalConfig", "CalibDataConfig", "Windows", "load_text", "make_windows", "load_eval_windows", "load_calib_windows",
]

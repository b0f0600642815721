"""Activation sparsity for Hugging Face causal LMs (Dhar et al., IPCCC 2024, arXiv 2412.12178).

The verbs a user calls::

    model, tok, info = load_model("smollm2-135m")                      # HF id, folder, .gguf or alias
    thr = calibrate(model, calib_ids, CalibrationConfig("intermediate", [0.5]))   # -> Thresholds
    with sparsified(model, thr):                                        # or sparsify_ / unsparsify_
        ppl = perplexity(model, eval_ids).ppl
    enable_sparse_decode_(model)                                        # 1-token decode through sparse kernels

plus :func:`collect_stats` (one pass, any target read later), :func:`measure_sparsity`, :func:`collect_trace`
(active-neuron traces) and the text windows of :mod:`dormant.llm.text`. Internals (the adapter table, histograms,
hooks) stay in their modules. The names are imported on first use, so ``import dormant.llm.configs`` (the CLI) does
not import torch; loading a model imports transformers.
"""

from importlib import import_module

_EXPORTS = {
    "load_model": "models", "ModelConfig": "configs", "calibrate": "calibration",
    "CalibrationConfig": "configs", "refine": "calibration", "collect_stats": "stats", "StatsConfig": "stats",
    "ActivationStats": "stats", "Thresholds": "thresholds", "sparsify_": "sparsify",
    "unsparsify_": "sparsify", "sparsified": "sparsify", "is_sparsified": "sparsify",
    "measure_sparsity": "sparsify", "perplexity": "evaluate", "PerplexityResult": "evaluate",
    "enable_sparse_decode_": "sparse_decode", "disable_sparse_decode_": "sparse_decode",
    "sparse_decode_stats": "sparse_decode", "collect_trace": "masks", "ffn_layout": "adapters",
    "FFNLayout": "adapters", "Tap": "adapters", "UnsupportedModelError": "adapters", "SITES": "sites",
    "site_taps": "sites", "EvalConfig": "configs", "CalibDataConfig": "configs", "Windows": "text",
    "load_text": "text", "make_windows": "text", "load_eval_windows": "text", "load_calib_windows": "text",
}
__all__ = [*_EXPORTS, "ActivationTrace"]


def __getattr__(name: str):
    if name == "ActivationTrace":
        from dormant.traces import ActivationTrace

        return ActivationTrace
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dormant.llm' has no attribute {name!r}")
    return getattr(import_module(f"dormant.llm.{_EXPORTS[name]}"), name)

"""Offloading FFN weights to flash: simulate what predictor-guided weight loading does on edge memory hierarchies.

Given activation traces (which FFN neurons each token needs), a device profile (flash, DRAM, compute)
and a weight-loading policy, the simulator reports bytes read from storage per token, DRAM hit rate,
pollution, footprint and estimated time per token. It makes measurable the guideline of Dhar et al.
(IPCCC 2024, §V) -- keep inactive neurons on disk and prefetch the predicted-active ones -- with the
mechanisms of LLM in a flash (Alizadeh et al., ACL 2024: sliding window, row-column bundling, chunked
reads) and PowerInfer (Song et al., SOSP 2024: hot neurons pinned by profiled frequency).

Modules: :mod:`~dormant.offload.traces` (traces, geometry, weight formats), :mod:`~dormant.offload.profiles`
(device profiles and the storage model), :mod:`~dormant.offload.layout` (weight-file layout, request
cost), :mod:`~dormant.offload.policies`, :mod:`~dormant.offload.simulator`,
:mod:`~dormant.offload.reference` (brute-force caches), :mod:`~dormant.offload.storage` (real reads on this
machine's disk). The package reads :class:`~dormant.traces.ActivationTrace` artifacts and never imports the model
side; the runs (policy x budget x profile sweeps, trace recording, reports) are in :mod:`dormant.experiments.offload`.
"""

from importlib import import_module

_EXPORTS = {
    "ItemLayout": "layout", "StorageLayout": "configs", "PRESETS": "policies", "Policy": "policies",
    "parse_policy": "policies", "DeviceProfile": "profiles", "ProfileError": "profiles",
    "StorageModel": "profiles", "list_profiles": "profiles", "load_profile": "profiles",
    "AccessStats": "simulator", "estimate_time": "simulator", "simulate": "simulator",
    "FFNGeometry": "traces", "WeightFormat": "traces", "perturb_trace": "traces", "synthetic_trace": "traces",
    "weight_format": "traces",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # names are imported on first use: the CLI reads the configs without numpy or torch
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dormant.offload' has no attribute {name!r}")
    return getattr(import_module(f"dormant.offload.{_EXPORTS[name]}"), name)

"""``DormantLM``: lm-eval's ``HFLM`` over a model loaded and sparsified exactly as ``dormant eval`` does.

Importing this module imports lm-eval (an optional dependency); :mod:`dormant.experiments.lm_eval` imports it only
when a score is asked for. The class is registered in lm-eval's model registry as ``dormant``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from dormant.llm.configs import ModelConfig

__all__ = ["DormantLM", "quiet_wrapping"]


@contextlib.contextmanager
def quiet_wrapping():
    """Silence the warnings ``HFLM`` logs for a model object (that its loading options are ignored, that it
    assumes one process): passing the loaded, sparsified model is the point here."""
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_log.setLevel(level)


@register_model("dormant")
class DormantLM(HFLM):
    """An lm-eval model (``model_args`` of ``simple_evaluate(model="dormant", ...)``):

    Args:
        pretrained: what ``dormant --model`` takes: HF id, local folder, ``.gguf`` file, or an alias.
        thresholds: a Thresholds artifact (``dormant calibrate``) enforced by forward hooks; dense if unset.
        sparse_decode: swap the FFNs for :class:`~dormant.llm.sparse_decode.SparseDecodeMLP` (1-token decode
            steps of ``generate_until`` tasks through the sparse kernels; other forwards are unchanged).
        device, dtype, online, device_map, max_memory, offload_folder: as :class:`~dormant.llm.configs.ModelConfig`
            (``device`` unset: ``auto``).
        batch_size, **kwargs: passed to ``HFLM`` (which ignores its loading options for a model object).
    """

    def __init__(self, pretrained: str = "smollm2-135m", thresholds: str | None = None, sparse_decode: bool = False,
                 device: str | None = None, dtype: str = "auto", online: bool = False, device_map: str | None = None,
                 max_memory: str | None = None, offload_folder: str | None = None, batch_size: int | str = 1,
                 **kwargs: Any):
        from dormant.llm.models import load_model
        from dormant.llm.sparsify import sparsify_
        from dormant.llm.thresholds import Thresholds

        mc = ModelConfig(model=str(pretrained), device=str(device or "auto"), dtype=str(dtype), online=bool(online),
                         device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
        thr = Thresholds.load(str(thresholds)) if thresholds else None  # a bad file fails before the model loads
        model, tok, info = load_model(mc)
        if thr is not None:
            sparsify_(model, thr, info["id"])
        if sparse_decode:
            from dormant.llm.sparse_decode import enable_sparse_decode_

            enable_sparse_decode_(model)
        with quiet_wrapping():
            super().__init__(pretrained=model, tokenizer=tok, batch_size=batch_size, **kwargs)
        self.dormant = {"model": info, "thresholds": None if thr is None else str(thresholds),
                        "thresholds_summary": None if thr is None else thr.summary(),
                        "sparse_decode": bool(sparse_decode)}

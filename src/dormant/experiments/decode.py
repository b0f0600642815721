"""``dormant generate``: greedy decode with the lean C++ engine, dense or with calibrated thresholds.

The model is packed once (a GGUF file's own blocks, or the HF weights re-packed in a chosen format), the
thresholds become the engine's :class:`~dormant.llm.decode.SparsityPlan` (exactly the hooks' rule), and the
prompt is prefilled token by token. Timings are wall clock of this process: prefill and decode separately.
"""

from __future__ import annotations

import time
from typing import Any

from dormant.config import UsageError
from dormant.experiments.configs import GenerateConfig

__all__ = ["GenerateConfig", "generate_text"]


def generate_text(cfg: GenerateConfig) -> dict[str, Any]:
    """Greedy decode of ``cfg.prompt`` (engine threads: ``cfg.threads``, put back afterwards)."""
    from dormant.experiments.runtime import torch_threads

    with torch_threads(cfg.threads):
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> dict[str, Any]:
    import torch

    from dormant.llm.adapters import ffn_layout
    from dormant.llm.decode import Engine, pack_gguf, pack_model
    from dormant.llm.decode.from_thresholds import plan_from_thresholds
    from dormant.llm.models import gguf_file, load_model
    from dormant.llm.thresholds import Thresholds

    model, tok, info = load_model(cfg.model)
    plan = None
    if cfg.thresholds:
        plan = plan_from_thresholds(Thresholds.load(cfg.thresholds), ffn_layout(model))
    ids = tok(cfg.prompt).input_ids
    max_seq = cfg.max_seq or len(ids) + cfg.max_new_tokens
    if len(ids) + cfg.max_new_tokens > max_seq:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} exceed --max-seq "
                         f"{max_seq}")
    t0 = time.perf_counter()
    if cfg.weights == "gguf":
        weights = pack_gguf(gguf_file(cfg.model.model), plan=plan, positions=max_seq)
    else:
        weights = pack_model(model, cfg.weights, plan=plan, positions=max_seq)
    engine = Engine(weights, max_seq)
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    prefill_s = time.perf_counter() - t0
    out: list[int] = []
    pos = len(ids)
    t0 = time.perf_counter()
    for _ in range(cfg.max_new_tokens):
        token = int(torch.argmax(logits))
        out.append(token)
        if token == tok.eos_token_id or len(out) == cfg.max_new_tokens:
            break
        logits = engine.step(token, pos)
        pos += 1
    decode_s = time.perf_counter() - t0
    steps = max(len(out) - 1, 1)  # the first new token comes from the prefill's logits
    return {"model": info["id"], "weights": cfg.weights, "thresholds": cfg.thresholds,
            "threads": torch.get_num_threads(), "prompt_tokens": len(ids), "new_tokens": len(out),
            "text": tok.decode(out), "pack_s": round(pack_s, 3), "prefill_tok_s": len(ids) / max(prefill_s, 1e-9),
            "decode_tok_s": steps / max(decode_s, 1e-9),
            "density": engine.density() if plan is not None else None}

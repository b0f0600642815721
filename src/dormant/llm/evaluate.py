"""WikiText-2 perplexity, GPTQ protocol: non-overlapping windows, mean token NLL, ``exp``.

For each window the model predicts tokens ``1..seqlen-1`` from their prefixes; the loss is the mean
cross-entropy over those positions. ``ppl = exp(mean over windows of the window loss)``, identical to
GPTQ's ``exp(sum(loss * seqlen) / (n * seqlen))`` since all windows have the same length.

Under ``torchrun`` each rank evaluates its contiguous share of the windows (:func:`dormant.distributed.shard`) and
the window losses are gathered in float64 by a sum across ranks, so every rank reads the same ``window_nll`` (in
window order) and the same perplexity as one process over all windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dormant import distributed
from dormant.llm.models import input_device

__all__ = ["PerplexityResult", "perplexity"]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    windows: int
    tokens: int  # predicted tokens
    seconds: float
    window_nll: list[float]

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "window_nll"}


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (``[n, seqlen]`` token ids), batched, with a progress bar."""
    from tqdm.auto import tqdm

    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor, got shape {tuple(windows.shape)}")
    device = input_device(model)
    n = len(windows)
    windows = distributed.shard(windows)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress or not distributed.is_main())
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none").mean(dim=1)
        losses += nll.tolist()
        bar.update(len(ids))
        bar.set_postfix(ppl=f"{math.exp(sum(losses) / len(losses)):.3f}")
    bar.close()
    if distributed.world() > 1:  # every rank's window losses, in window order (float64: exact copies)
        losses = distributed.gather_cat(torch.tensor(losses, dtype=torch.float64)).tolist()
        assert len(losses) == n, f"gathered {len(losses)} window losses of {n}"
    mean = sum(losses) / len(losses)
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        windows=len(losses),
        tokens=len(losses) * (windows.shape[1] - 1),
        seconds=time.perf_counter() - t0,
        window_nll=losses,
    )

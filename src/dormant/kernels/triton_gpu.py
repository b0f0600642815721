"""The Triton GPU sparse FFN kernel for one token (batch 1): float16, bfloat16 (and float32).

Two launches, no host synchronisation and no index compaction (masked loads are never issued, so a
skipped row costs no memory traffic):

1. ``gate_up`` -- a program owns ``BLOCK_N`` neurons and walks ``D`` in ``BLOCK_D`` chunks. It reads the
   gate rows of its live neurons (all of them gate-first; those in the mask otherwise), applies the
   activation and the ``GATE``/``ACT`` thresholds, then reads the up rows of the neurons whose activation
   survived and writes ``h`` (fp32, zero for inactive neurons) after the ``UP``/``MID`` thresholds.
2. ``down`` -- a split-K GEMV over the neuron-major ``down_t``: program ``(d, k)`` reads the rows of
   neurons ``k*ROWS .. (k+1)*ROWS`` with ``h != 0`` for columns ``d*BLOCK_D ..`` and adds its partial
   sum into an fp32 ``y`` with ``atomic_add`` (fp32 atomics, so bf16 works, unlike TEAL's fp16-only
   kernel). ``y`` is then rounded to the weight dtype and the ``OUT`` threshold applied.

The design follows the row-skipping idea of Deja Vu / TEAL (``kernels/sparse_gemv.py``, notes §2.1) but
skips whole neurons (rows of gate/up/down_t) rather than input columns; the code is our own. Intermediates
are rounded to the weight dtype where the dense module rounds them (see :mod:`dormant.kernels.reference`).
``triton`` is imported on first use only; set ``TRITON_INTERPRET=1`` to run these kernels on CPU tensors
with Triton's interpreter (slow; for tests). Block sizes are untuned defaults (no GPU was available
when this was written); ``BLOCKS`` can be overridden per call site for tuning.
"""

from __future__ import annotations

import functools
import os

import torch

from dormant.kernels.base import FFNThresholds, PackedFFN, UnsupportedKernelError
from dormant.kernels.reference import as_mask, zero_below

__all__ = ["SUPPORTED_DTYPES", "BLOCKS", "available", "check", "sparse_ffn"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_CODES = {"silu": 0, "gelu_tanh": 1}
# Launch parameters: gate_up (BLOCK_N neurons x BLOCK_D columns), down (ROWS neurons per program in
# BLOCK_N2-row steps, BLOCK_D2 columns).
BLOCKS = {"BLOCK_N": 16, "BLOCK_D": 256, "BLOCK_N2": 32, "BLOCK_D2": 256, "ROWS": 256, "num_warps": 4}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def available() -> str | None:
    """``None`` when Triton can run, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return (
            "the 'triton' package is not installed (pip install triton; it ships with CUDA builds of torch)"
        )
    if not torch.cuda.is_available() and not _interpret():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    return None


def check(device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedKernelError` unless the ``triton`` kernel handles ``device`` and ``dtype``."""
    reason = available()
    if reason is not None:
        raise UnsupportedKernelError(f"impl 'triton' is unavailable: {reason}")
    if device.type != "cuda" and not _interpret():
        raise UnsupportedKernelError(
            f"impl 'triton' runs on CUDA, the weights are on {device}; use impl 'cpu' on the CPU"
        )
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise UnsupportedKernelError(
            f"impl 'triton' supports {names}; got {str(dtype).removeprefix('torch.')}"
        )


def sparse_ffn(
    packed: PackedFFN,
    x: torch.Tensor,
    thresholds: FFNThresholds,
    active: torch.Tensor | None = None,
    blocks=None,
) -> torch.Tensor:
    """:func:`dormant.kernels.reference.sparse_ffn` with Triton; same arguments (indices are not validated).

    ``blocks`` overrides entries of :data:`BLOCKS` (``ROWS`` must be a multiple of ``BLOCK_N2``).
    """
    check(packed.device, packed.dtype)
    import triton

    from dormant.kernels._triton_kernels import down, gate_up

    b = {**BLOCKS, **(blocks or {})}
    dtype, dev, D, I = packed.dtype, packed.device, packed.D, packed.I  # noqa: E741
    t = thresholds.rounded(dtype)
    x = x.detach().to(device=dev, dtype=dtype).contiguous()
    h = torch.empty(I, dtype=torch.float32, device=dev)
    y = torch.zeros(D, dtype=torch.float32, device=dev)
    mask = h if active is None else as_mask(active.to(dev), I).view(torch.uint8)
    gate_up[(triton.cdiv(I, b["BLOCK_N"]),)](
        x, packed.gate, packed.up, h, mask, D, I, packed.gate.stride(0), packed.up.stride(0),
        t.gate, t.up, t.act, t.mid, HAS_MASK=active is not None, ACT=_ACT_CODES[packed.activation],
        BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"], num_warps=b["num_warps"],
    )  # fmt: skip
    down[(triton.cdiv(D, b["BLOCK_D2"]), triton.cdiv(I, b["ROWS"]))](
        h, packed.down_t, y, D, I, packed.down_t.stride(0),
        ROWS=b["ROWS"], BLOCK_N=b["BLOCK_N2"], BLOCK_D=b["BLOCK_D2"], num_warps=b["num_warps"],
    )  # fmt: skip
    return zero_below(y.to(dtype), t.out)

"""The specification of the batch-1 GEMV kernels of ``csrc/gemv.cpp``, in plain torch.

Three modes over a :class:`~dormant.kernels.blocks.PackedWeight` ``W`` ``[out, in]`` and one input ``x`` ``[in]``:

* :func:`gemv_rows` -- dense ``y = W x`` (``rows`` layout). Float formats: ``y_r = sum_i W_ri x_i`` in fp32.
  Quantised formats follow llama.cpp's numerics: ``x`` is quantised once to 8-bit blocks
  (:func:`~dormant.kernels.blocks.quantize_activation`: ``qx``, ``dx``, ``sx``) and each block of row ``r``
  contributes an exact integer dot product::

      y_r = sum_b  fp32(dw_rb * dx_b) * dot(qw_rb, qx_b)  [ + mw_rb * fp32(dx_b * sx_b) ]   (q4_1 only)

  with ``qw`` offset-corrected (q4_0: ``q - 8``).
* :func:`gemv_rows_gather` -- ``y_k = (W x)_{rows_k}``: the same numbers for the listed rows only (CATS:
  the up rows of active neurons).
* :func:`gemv_cols` -- column-sparse ``y = sum_{i active} x_i W[:, i]`` (``cols`` layout) in float, with
  ``active = not (|x_i| < t_i)``: exactly ``W @ Z(x, t)`` for ``Z(v, t) = 0 where |v| < t`` (the rule
  :mod:`dormant.llm.sparsify` enforces with hooks; NaN passes, ``t = 0`` keeps every channel). One
  per-channel threshold vector covers TEAL (one scalar), WINA (``T / ||W[:, i]||``) and CHESS.

Sums here run in float64; the kernels sum in fp32 in their own order, so they match within the
tolerances stated in ``tests/kernels/test_gemv.py``.
"""

from __future__ import annotations

import torch

from dormant.kernels.blocks import QK, PackedWeight, block_ints, quantize_activation, unpack

__all__ = ["gemv_rows", "gemv_rows_gather", "gemv_cols", "active_columns"]


def gemv_rows(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """``y = W x`` ``[out]`` float32 for ``x`` ``[in]`` (quantised formats: integer dots on quantised ``x``)."""
    x = x.detach().float().reshape(-1)
    if x.numel() != w.in_features:
        raise ValueError(f"x has {x.numel()} entries, the weight has {w.in_features} inputs")
    if not w.format.quantized:
        return (unpack(w).double() @ x.double()).float()
    qx, dx, sx = quantize_activation(x)
    nb = qx.shape[0]
    qw, dw, mw = block_ints(w.data.view(w.out_features, nb, w.format.block_bytes), w.fmt)
    dot = (qw.long() * qx.long()).sum(-1)  # [out, nb], exact
    terms = (dw * dx).double() * dot.double()
    if mw is not None:
        terms = terms + (mw * (dx * sx.float())).double()
    return terms.sum(-1).float()


def gemv_rows_gather(w: PackedWeight, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(W x)[rows]`` ``[len(rows)]`` float32: what :func:`gemv_rows` gives for the listed rows."""
    rows = rows.long().reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= w.out_features):
        raise IndexError(f"row indices must lie in [0, {w.out_features})")
    return gemv_rows(w, x)[rows]


def active_columns(x: torch.Tensor, t: torch.Tensor | float | None) -> torch.Tensor:
    """The bool mask ``[in]`` of channels that survive ``Z(x, t)`` (``not |x_i| < t_i``; all when ``t`` is None)."""
    x = x.detach().float().reshape(-1)
    if t is None:
        return torch.ones_like(x, dtype=torch.bool)
    t = torch.as_tensor(t, dtype=torch.float32).expand_as(x)
    return ~(x.abs() < t)


def gemv_cols(w: PackedWeight, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
    """``y = W Z(x, t)`` ``[out]`` float32 (float arithmetic on the stored weights; ``x`` is not quantised)."""
    x = x.detach().float().reshape(-1)
    if x.numel() != w.in_features:
        raise ValueError(f"x has {x.numel()} entries, the weight has {w.in_features} inputs")
    xz = torch.where(active_columns(x, t), x, torch.zeros_like(x))
    return (unpack(w).double() @ xz.double()).float()


assert QK == 32  # the integer numerics above assume GGUF's block size

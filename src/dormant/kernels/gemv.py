"""Batch-1 GEMV on the CPU: ``csrc/gemv.cpp`` (C++17, OpenMP, AVX512-VNNI / AVX2 / scalar), called through ctypes.

The three modes of :mod:`dormant.kernels.gemv_reference` (their specification) over a
:class:`~dormant.kernels.blocks.PackedWeight`:

* :func:`gemv` -- dense ``y = W x`` (``rows`` layout);
* :func:`gemv_gather` -- only the listed output rows (``rows`` layout; CATS: active neurons' up rows);
* :func:`gemv_cols` -- column-sparse ``y = W Z(x, t)`` (``cols`` layout), skipping inactive input channels.

Formats: ``f32``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1`` in both layouts (:data:`KERNELS` is the
dispatch table: mode -> layout it reads -> formats). Threads: ``torch.get_num_threads()``, on the
OpenMP runtime torch loaded (see :mod:`dormant.kernels.build`). The library is compiled on first use.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from dormant.kernels import build as _build
from dormant.kernels.base import UnsupportedKernelError
from dormant.kernels.blocks import FORMATS, QK, PackedWeight

__all__ = ["SOURCE", "KERNELS", "library", "simd_level", "gemv", "gemv_gather", "gemv_cols", "quantize_x"]

SOURCE = _build.CSRC / "gemv.cpp"
# mode -> (layout it reads, formats it supports)
KERNELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dense": ("rows", tuple(FORMATS)),
    "gather": ("rows", tuple(FORMATS)),
    "cols": ("cols", tuple(FORMATS)),
}
SIMD_LEVELS = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
_LOCK = threading.Lock()
_LIBS: dict[tuple[str, ...], ctypes.CDLL] = {}


def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The loaded kernel library (built on first call); ``extra_flags`` (e.g. ``("-mno-avx512f",)``) builds a variant."""
    with _LOCK:
        if extra_flags not in _LIBS:
            lib = _build.load(SOURCE, extra_flags)
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
            lib.dormant_gemv_rows.argtypes = [p, i64, i64, i32, p, p, i64, i32, p, i32]
            lib.dormant_gemv_rows.restype = i64
            lib.dormant_gemv_cols.argtypes = [p, i64, i64, i32, p, p, p, i32, i32]
            lib.dormant_gemv_cols.restype = i64
            lib.dormant_gemv_quantize_x.argtypes = [p, i64, p, p, p]
            lib.dormant_gemv_quantize_x.restype = None
            lib.dormant_gemv_simd.restype = i32
            _LIBS[extra_flags] = lib
        return _LIBS[extra_flags]


def simd_level(extra_flags: tuple[str, ...] = ()) -> str:
    """Which code path the library was compiled with: ``avx512-vnni``, ``avx2`` or ``scalar``."""
    return SIMD_LEVELS[library(extra_flags).dormant_gemv_simd()]


def _check(w: PackedWeight, mode: str) -> None:
    layout, fmts = KERNELS[mode]
    if w.layout != layout:
        raise UnsupportedKernelError(f"gemv mode {mode!r} reads the {layout!r} layout; the weight is {w.layout!r}")
    if w.fmt not in fmts:
        raise UnsupportedKernelError(f"gemv mode {mode!r} supports {', '.join(fmts)}; got {w.fmt!r}")


def _input(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 1 or x.numel() != w.in_features:
        raise ValueError(f"x must be a vector of {w.in_features} entries, got shape {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def gemv(w: PackedWeight, x: torch.Tensor, extra_flags: tuple[str, ...] = ()) -> torch.Tensor:
    """``y = W x`` ``[out]`` float32 for a ``rows``-layout weight and ``x`` ``[in]``."""
    _check(w, "dense")
    x = _input(w, x)
    y = torch.empty(w.out_features, dtype=torch.float32)
    rc = library(extra_flags).dormant_gemv_rows(
        w.data.data_ptr(), w.out_features, w.in_features, w.format.code, x.data_ptr(), None, 0, 0, y.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"gemv kernel failed with code {rc}")
    return y


def gemv_gather(w: PackedWeight, x: torch.Tensor, rows: torch.Tensor, extra_flags: tuple[str, ...] = ()) -> torch.Tensor:
    """``(W x)[rows]`` ``[len(rows)]`` float32, reading only the listed rows (any order, repeats allowed)."""
    _check(w, "gather")
    x = _input(w, x)
    if rows.ndim != 1 or rows.dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"rows must be a 1-D integer tensor of row indices, got {rows.dtype} {tuple(rows.shape)}")
    idx = rows.to(torch.int64).contiguous()
    y = torch.empty(idx.numel(), dtype=torch.float32)
    rc = library(extra_flags).dormant_gemv_rows(
        w.data.data_ptr(), w.out_features, w.in_features, w.format.code, x.data_ptr(), idx.data_ptr(), idx.numel(), 1,
        y.data_ptr(), torch.get_num_threads(),
    )
    if rc == -2:
        raise IndexError(f"row indices must lie in [0, {w.out_features})")
    if rc != 0:
        raise RuntimeError(f"gemv kernel failed with code {rc}")
    return y


def gemv_cols(
    w: PackedWeight,
    x: torch.Tensor,
    t: torch.Tensor | float | None = None,
    extra_flags: tuple[str, ...] = (),
    split_columns: bool = False,
) -> tuple[torch.Tensor, int]:
    """Column-sparse ``y = W Z(x, t)`` for a ``cols``-layout weight.

    Args:
        w: the weight, ``cols`` layout.
        x: ``[in]``.
        t: per-input-channel thresholds ``[in]``, a scalar (the same for every channel) or ``None`` (all
            channels active); channel ``i`` is read iff ``not |x_i| < t_i`` and ``x_i != 0``.
        split_columns: threads split the active columns (each reads whole columns into a private partial ``y``,
            summed in thread order) instead of the output blocks.

    Returns:
        ``y`` ``[out]`` float32 and the number of columns read.
    """
    _check(w, "cols")
    x = _input(w, x)
    if t is not None:
        t = torch.as_tensor(t, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(w.in_features)
        if t.shape != (w.in_features,):
            raise ValueError(f"thresholds must be a scalar or a vector of {w.in_features}, got shape {tuple(t.shape)}")
        t = t.contiguous()
    nbo = -(-w.out_features // QK)
    y = torch.empty(nbo * QK, dtype=torch.float32)
    n = library(extra_flags).dormant_gemv_cols(
        w.data.data_ptr(), w.out_features, w.in_features, w.format.code, x.data_ptr(),
        None if t is None else t.data_ptr(), y.data_ptr(), torch.get_num_threads(), int(split_columns),
    )
    if n < 0:
        raise RuntimeError(f"gemv kernel failed with code {n}")
    return y[: w.out_features].clone(), int(n)


def quantize_x(x: torch.Tensor, extra_flags: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's own quantisation of ``x`` ``[n]``: ``(q int32 [nb, 32], d [nb], s int32 [nb])``, as
    :func:`dormant.kernels.blocks.quantize_activation` specifies it."""
    x = x.detach().float().contiguous().reshape(-1)
    nb = -(-x.numel() // QK)
    q = torch.empty(nb * QK, dtype=torch.int8)
    d = torch.empty(nb, dtype=torch.float32)
    s = torch.empty(nb, dtype=torch.int32)
    library(extra_flags).dormant_gemv_quantize_x(x.data_ptr(), x.numel(), q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q.view(nb, QK).int(), d, s

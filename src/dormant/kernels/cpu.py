"""The CPU sparse FFN kernel: ``csrc/sparse_ffn.cpp`` (C++17, OpenMP, AVX2/FMA), built by :mod:`dormant.kernels.build`.

Decode is memory-bound, and the win comes from reading only active neurons' rows with a fused gather-dot /
gather-axpy; torch ops would first copy the rows (``index_select``), tripling the bytes moved, so a
hand-written loop is needed. bfloat16 is converted to float32 by 16-bit shifts; without AVX2/FMA the same
code runs scalar.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from dormant.kernels import build as _build
from dormant.kernels.base import FFNThresholds, PackedFFN, UnsupportedKernelError
from dormant.kernels.build import KernelBuildError

__all__ = ["KernelBuildError", "SUPPORTED_DTYPES", "SOURCE", "check", "library", "build", "sparse_ffn"]

SOURCE = _build.CSRC / "sparse_ffn.cpp"
SUPPORTED_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ACT_CODES = {"silu": 0, "gelu_tanh": 1}
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None


def check(device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedKernelError` unless the ``cpu`` kernel handles ``device`` and ``dtype``."""
    if device.type != "cpu":
        raise UnsupportedKernelError(
            f"impl 'cpu' runs on the CPU, the weights are on {device}; use impl 'triton' on CUDA"
        )
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise UnsupportedKernelError(f"impl 'cpu' supports {names}; got {str(dtype).removeprefix('torch.')}")


def build(force: bool = False):
    """Compile the kernel into the cache unless it is there already; returns the library path."""
    return _build.build(SOURCE, force=force)


def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first call), with its function signatures declared."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = _build.load(SOURCE)
            f = lib.dormant_sparse_ffn
            p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
            f.argtypes = [
                p,
                p,
                p,
                i64,
                i64,
                i64,
                p,
                p,
                i64,
                i64,
                p,
                i64,
                i32,
                f32,
                f32,
                f32,
                f32,
                f32,
                i32,
                i32,
                i32,
            ]
            f.restype = i64
            lib.dormant_sparse_ffn_simd.restype = i32
            _LIB = lib
        return _LIB


def simd() -> bool:
    """Whether the library was compiled with the AVX2/FMA path."""
    return bool(library().dormant_sparse_ffn_simd())


def sparse_ffn(
    packed: PackedFFN, x: torch.Tensor, thresholds: FFNThresholds, active: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`dormant.kernels.reference.sparse_ffn` on the CPU; same arguments, ``torch.get_num_threads()`` threads.

    ``active`` may be a bool mask ``[I]`` or strictly increasing indices. Layers smaller than 1 MiB of
    weights per thread use fewer threads (waking a thread costs more than it saves).
    """
    check(packed.device, packed.dtype)
    lib = library()
    dtype = packed.dtype
    x = x.detach().to(dtype).contiguous()
    y = torch.empty(packed.D, dtype=dtype)
    t = thresholds.rounded(dtype)
    if active is None:
        idx_ptr, n_idx = None, 0
    else:
        idx = active.nonzero().view(-1) if active.dtype == torch.bool else active
        if active.dtype == torch.bool and active.shape != (packed.I,):
            raise ValueError(f"a neuron mask must have shape ({packed.I},), got {tuple(active.shape)}")
        idx = idx.to(torch.int64).contiguous()
        idx_ptr, n_idx = idx.data_ptr(), idx.numel()
    n = lib.dormant_sparse_ffn(
        packed.gate.data_ptr(), packed.up.data_ptr(), packed.down_t.data_ptr(),
        packed.gate.stride(0), packed.up.stride(0), packed.down_t.stride(0),
        x.data_ptr(), y.data_ptr(), packed.D, packed.I, idx_ptr, n_idx, int(active is None),
        t.gate, t.up, t.act, t.mid, t.out, SUPPORTED_DTYPES[dtype], _ACT_CODES[packed.activation], torch.get_num_threads(),
    )  # fmt: skip
    if n == -2:
        raise IndexError(f"active neuron indices must be strictly increasing and in [0, {packed.I})")
    if n < 0:
        raise RuntimeError(f"sparse FFN kernel failed with code {n}")
    return y

"""Integrate-and-fire recursion: the fused CPU kernel ``csrc/spiking.cpp`` and dispatch to the torch reference.

The step-by-step loop (:mod:`dormant.kernels.spiking_reference`) makes four passes over a ``[N, C, *S]``
tensor per step (add, compare, select, subtract) plus one for the drive, each reading and writing memory;
the fused kernel keeps each membrane row in L1 across the T steps and reads every input and writes every
output once. Same float32 additions in the same order: outputs equal the reference bit for bit (tested).

``impl`` is ``"cpu"`` (the kernel; float32 on the CPU), ``"reference"``, or ``"auto"`` (the kernel where it
applies, the reference elsewhere, e.g. on CUDA); calls that name none use the one set by :func:`using`
(default ``"auto"``), which is how a simulation engine picks the neurons' implementation.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from dormant.kernels import build as _build
from dormant.kernels import spiking_reference as reference
from dormant.kernels.build import KernelBuildError

__all__ = ["IMPLS", "SOURCE", "default_impl", "count_nonzero", "if_forward", "if_probe", "library", "resolve", "using"]

SOURCE = _build.CSRC / "spiking.cpp"
IMPLS = ("auto", "cpu", "reference")
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_UNAVAILABLE: str | None = None  # None: not tried yet; "": built; else why it failed
log = logging.getLogger(__name__)
_PARALLEL_MIN = 1 << 16  # elements per step below which one thread is faster than waking the others
_IMPL: ContextVar[str] = ContextVar("dormant_if_impl", default="auto")


def default_impl() -> str:
    """The implementation calls without an explicit ``impl`` use (``"auto"`` unless inside :func:`using`)."""
    return _IMPL.get()


@contextmanager
def using(impl: str) -> Iterator[None]:
    """Within the block, IF calls without an explicit ``impl`` use ``impl`` (restored on exit)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown IF implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    token = _IMPL.set(impl)
    try:
        yield
    finally:
        _IMPL.reset(token)


def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first call)."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = _build.load(SOURCE)
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
            lib.dormant_if_forward.argtypes = [p, i64, p, p, p, p, i64, i64, i64, i64, i32]
            lib.dormant_if_forward.restype = None
            lib.dormant_if_probe.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32]
            lib.dormant_if_probe.restype = None
            lib.dormant_count_nonzero.argtypes = [p, i64, i64, p, i32]
            lib.dormant_count_nonzero.restype = None
            _LIB = lib
        return _LIB


def resolve(impl: str | None, x: torch.Tensor) -> str:
    """The implementation ``impl`` (``None``: :func:`default_impl`) means for ``x``: ``"cpu"`` or ``"reference"``."""
    impl = impl or _IMPL.get()
    if impl not in IMPLS:
        raise ValueError(f"unknown IF implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    fits = x.device.type == "cpu" and x.dtype == torch.float32
    if impl == "cpu" and not fits:
        raise ValueError(f"IF implementation 'cpu' needs float32 CPU tensors, got {x.dtype} on {x.device}")
    if impl == "auto" and fits and not _available():
        return "reference"
    return "cpu" if impl == "cpu" or (impl == "auto" and fits) else "reference"


def _available() -> bool:
    """Whether the kernel builds and loads here; the first failure is logged once and ``auto`` uses the reference."""
    global _UNAVAILABLE
    if _UNAVAILABLE is None:
        try:
            library()
            _UNAVAILABLE = ""
        except KernelBuildError as e:
            _UNAVAILABLE = str(e)
            log.warning("the fused IF kernel is unavailable (%s); simulating with the torch reference loop",
                        _UNAVAILABLE.splitlines()[0])
    return not _UNAVAILABLE


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= _PARALLEL_MIN else 1


def _geometry(v: torch.Tensor) -> tuple[int, int, int]:
    n, c = v.shape[:2]
    return n, c, v[0, 0].numel()


def if_forward(x: torch.Tensor, beta: torch.Tensor | None, theta: torch.Tensor, v: torch.Tensor,
               impl: str | None = None) -> torch.Tensor:
    """:func:`dormant.kernels.spiking_reference.if_forward`, fused on the CPU.

    ``x`` ``[T, N, C, *S]`` may be a step-broadcast view (``x[t]`` the same tensor for every t, step stride
    0), which the kernel reads without copying; ``v`` must be contiguous (it is updated in place).
    """
    if resolve(impl, x) == "reference":
        return reference.if_forward(x, beta, theta, v)
    if not v.is_contiguous():
        raise ValueError("the membrane tensor must be contiguous")
    steps = len(x)
    if x.stride(0) == 0 and x[0].is_contiguous():
        base, tstride = x[0], 0
    else:
        base = x.contiguous()
        tstride = base[0].numel()
    n, c, s = _geometry(v)
    theta = theta.to(torch.float32).contiguous()
    if beta is not None:
        beta = beta.to(torch.float32).contiguous()
        if beta.shape != (steps, c):
            raise ValueError(f"beta must be [T, C] = [{steps}, {c}], got {tuple(beta.shape)}")
    out = torch.empty(x.shape, dtype=torch.float32)
    library().dormant_if_forward(base.data_ptr(), tstride, beta.data_ptr() if beta is not None else None,
                                 theta.data_ptr(), v.data_ptr(), out.data_ptr(), steps, n, c, s,
                                 _threads(n * c * s))
    return out


def if_probe(x: torch.Tensor, beta: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, target: torch.Tensor,
             impl: str | None = None) -> torch.Tensor:
    """:func:`dormant.kernels.spiking_reference.if_probe`, fused on the CPU."""
    if resolve(impl, x) == "reference":
        return reference.if_probe(x, beta, theta, v, target)
    x, target = x.contiguous(), target.to(torch.float32).contiguous()
    beta, theta = beta.to(torch.float32).contiguous(), theta.to(torch.float32).contiguous()
    if not v.is_contiguous():
        raise ValueError("the membrane tensor must be contiguous")
    n, c, s = _geometry(v)
    diff = torch.empty(v.shape, dtype=torch.float32)
    library().dormant_if_probe(x.data_ptr(), beta.data_ptr(), theta.data_ptr(), v.data_ptr(), target.data_ptr(),
                               diff.data_ptr(), n, c, s, _threads(n * c * s))
    return diff



def count_nonzero(x: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Non-zero elements of each row of ``x`` ``[T, ...]``: ``[T]`` int64 (spikes per step, for the monitors)."""
    rows = x.reshape(len(x), -1)
    if resolve(impl, x) == "reference":
        return reference.count_nonzero(rows)
    rows = rows.contiguous()
    counts = torch.empty(len(rows), dtype=torch.int64)
    library().dormant_count_nonzero(rows.data_ptr(), len(rows), rows.shape[1], counts.data_ptr(),
                                    _threads(rows.shape[1]))
    return counts

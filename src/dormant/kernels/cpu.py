"""The CPU sparse FFN kernel: ``csrc/sparse_ffn.cpp`` (C++17, OpenMP, AVX2/FMA), compiled once per machine.

Why a plain shared library loaded with :mod:`ctypes` rather than a ``torch.utils.cpp_extension`` module
or numba:

* decode is memory-bound, and the win comes from reading only active neurons' rows with a fused
  gather-dot / gather-axpy; torch ops would first copy the rows (``index_select``), tripling the bytes
  moved, so a hand-written loop is needed;
* the kernel only needs raw pointers, so it includes no torch or Python headers: it compiles in about
  1.5 s with ``g++`` alone (no ninja, no ``Python.h``, no ABI coupling to the torch build, so nothing to
  rebuild when torch changes), where anything including ``torch/extension.h`` takes tens of seconds to
  compile; numba would add a heavy dependency and a thread pool of its own;
* it is linked against the OpenMP runtime torch already loaded (``libgomp.so.1``), so its threads are
  torch's threads: :func:`torch.set_num_threads` governs both and they do not fight over cores.

Build: at first use, ``$CXX`` (else ``g++``, ``c++``, ``clang++``) compiles the source with
``-O3 -march=native -fopenmp`` into ``$DORMANT_CACHE/kernels`` (default ``~/.cache/dormant/kernels``),
named by a hash of the source, compiler, flags and CPU, so a cache shared between machines never hands
one machine another's binary. The build is atomic (temp file + rename); a missing compiler or a failed
build raises :class:`KernelBuildError` with the compiler's message. bfloat16 is converted to float32 by
16-bit shifts; without AVX2/FMA the same code runs scalar.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from dormant.kernels.ffn import FFNThresholds, PackedFFN, UnsupportedKernelError

__all__ = ["KernelBuildError", "SUPPORTED_DTYPES", "SOURCE", "check", "library", "build", "sparse_ffn"]

SOURCE = Path(__file__).with_name("csrc") / "sparse_ffn.cpp"
SUPPORTED_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ACT_CODES = {"silu": 0, "gelu_tanh": 1}
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def check(device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedKernelError` unless the ``cpu`` kernel handles ``device`` and ``dtype``."""
    if device.type != "cpu":
        raise UnsupportedKernelError(
            f"impl 'cpu' runs on the CPU, the weights are on {device}; use impl 'triton' on CUDA"
        )
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise UnsupportedKernelError(f"impl 'cpu' supports {names}; got {str(dtype).removeprefix('torch.')}")


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise KernelBuildError(
        "the 'cpu' sparse FFN kernel is compiled on first use and needs a C++17 compiler with OpenMP, but none was "
        "found (looked for $CXX, g++, c++, clang++). Install one (Debian/Ubuntu: apt-get install g++) or use impl "
        "'reference'."
    )


def _flags() -> list[str]:
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "i686") else ["-mcpu=native"]
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *arch]


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_path(cxx: str) -> Path:
    from dormant.data import cache_dir

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), cxx, version, " ".join(_flags()), platform.machine(), _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"sparse_ffn-{key}.so"


def build(force: bool = False) -> Path:
    """Compile the kernel into the cache unless it is there already; returns the library path."""
    cxx = _compiler()
    out = _cache_path(cxx)
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(
            f"cannot create the kernel cache {out.parent} ({e}); set DORMANT_CACHE to a writable folder"
        ) from e
    fd, tmp = tempfile.mkstemp(prefix=".sparse_ffn-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_flags(), str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise KernelBuildError(
                f"compiling the 'cpu' sparse FFN kernel failed:\n$ {' '.join(cmd)}\n{res.stderr[-4000:]}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first call)."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            path = build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise KernelBuildError(f"cannot load the compiled kernel {path}: {e}") from e
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

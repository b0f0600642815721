"""Compile a C++ kernel source into a shared library once per machine, and load it with :mod:`ctypes`.

Why plain shared libraries loaded with :mod:`ctypes` rather than ``torch.utils.cpp_extension`` modules
or numba: the kernels only need raw pointers, so they include no torch or Python headers and compile in
seconds with ``g++`` alone (no ninja, no ``Python.h``, no ABI coupling to the torch build, nothing to
rebuild when torch changes), where anything including ``torch/extension.h`` takes tens of seconds; numba
would add a heavy dependency and a thread pool of its own. Each library is linked against the OpenMP
runtime torch already loaded (``libgomp.so.1``), so its threads are torch's threads:
:func:`torch.set_num_threads` governs both and they do not fight over cores.

Build: ``$CXX`` (else ``g++``, ``c++``, ``clang++``) compiles the source with ``-O3 -march=native
-fopenmp`` into ``$DORMANT_CACHE/kernels`` (default ``~/.cache/dormant/kernels``), named by a hash of the
source, compiler, flags and CPU, so a cache shared between machines never hands one machine another's
binary. The build is atomic (temp file + rename); a missing compiler or a failed build raises
:class:`KernelBuildError` with the compiler's message.
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

from dormant.config import UserError

__all__ = ["KernelBuildError", "CSRC", "compiler", "flags", "build", "load"]

CSRC = Path(__file__).with_name("csrc")
_LOCK = threading.Lock()
_LOADED: dict[Path, ctypes.CDLL] = {}


class KernelBuildError(UserError, RuntimeError):
    """A C++ kernel could not be compiled or loaded."""


def compiler() -> str:
    """Path of the C++ compiler: ``$CXX``, else the first of g++, c++, clang++ on ``PATH``."""
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise KernelBuildError(
        "dormant's CPU kernels are compiled on first use and need a C++17 compiler with OpenMP, but none was "
        "found (looked for $CXX, g++, c++, clang++). Install one (Debian/Ubuntu: apt-get install g++) or use impl "
        "'reference'."
    )


def flags() -> list[str]:
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


def _cache_path(source: Path, cxx: str, extra: tuple[str, ...]) -> Path:
    from dormant.data import cache_dir

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\n".join([source.read_text(), cxx, version, " ".join([*flags(), *extra]), platform.machine(),
                   _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{source.stem}-{key}.so"


def build(source: str | Path, extra_flags: tuple[str, ...] = (), force: bool = False) -> Path:
    """Compile ``source`` (a file in :data:`CSRC` or a path) into the cache unless it is there; returns the path."""
    source = Path(source) if Path(source).is_absolute() else CSRC / source
    cxx = compiler()
    out = _cache_path(source, cxx, extra_flags)
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(
            f"cannot create the kernel cache {out.parent} ({e}); set DORMANT_CACHE to a writable folder"
        ) from e
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags(), *extra_flags, str(source), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed:\n$ {' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o755 & ~_umask())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(source: str | Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The loaded library of ``source`` (built on first call, then cached for the process)."""
    with _LOCK:
        path = build(source, extra_flags)
        if path not in _LOADED:
            try:
                _LOADED[path] = ctypes.CDLL(str(path))
            except OSError as e:
                raise KernelBuildError(f"cannot load the compiled kernel {path}: {e}") from e
        return _LOADED[path]

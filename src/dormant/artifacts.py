"""Versioned, checksummed, self-validating artifacts and crash-safe result files.

Every result that outlives a process is one ``.safetensors`` file: tensors plus a JSON header (``kind``,
``version``, free-form ``meta``) and a ``checksum``: the SHA-256 of the canonical header (kind, version, meta and
the tensor table of names, dtypes, shapes and offsets) followed by the raw tensor bytes. Loading recomputes it, so
one flipped bit anywhere in the file -- a threshold's value, a shape, a key of the meta -- is refused naming the
file, as is a file of another kind or version, or one without a checksum.

Writes are atomic and durable (:func:`atomic_path`): a temporary file in the target's folder, fsync'ed, renamed
onto the target, and the folder fsync'ed, so a crash or a power loss leaves either the old file or the new one,
never a torn one. Files get the permissions the umask allows (not the 0600 of a temporary file), and temporary
files left by a killed writer are removed by the next write to the same folder.

Long runs append one JSON object per finished unit of work to a ``.jsonl`` file (:func:`append_jsonl`, fsync'ed);
:func:`read_jsonl` tolerates a truncated last line, and :class:`dormant.experiments.ledger.Ledger` recovers it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dormant.config import UserError

__all__ = [
    "ArtifactError",
    "OutputError",
    "config_key",
    "check_writable",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "save_artifact",
    "load_artifact",
    "verify_artifact",
    "append_jsonl",
    "read_jsonl",
]

_TMP_SUFFIX = ".tmp"


class ArtifactError(UserError, ValueError):
    """An artifact is missing, corrupted, of the wrong kind or version, or does not fit its model."""


class OutputError(UserError, OSError):
    """A result cannot be written where it was asked to go (the message names that place, not a temp file)."""


def config_key(config: Any, digits: int = 12) -> str:
    """A short stable hash of a JSON-ready configuration (dict key order does not matter): the one key of what
    produced a result, a cache or an artifact."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


# -- atomic, durable writes -------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(folder: Path, name: str) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` files whose writing process is gone (killed mid-write)."""
    for tmp in folder.glob(f".{name}.*{_TMP_SUFFIX}"):
        parts = tmp.name[len(name) + 2 :].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            try:
                tmp.unlink()
            except OSError:
                pass


def check_writable(path: str | os.PathLike, what: str = "output file") -> Path:
    """Raise :class:`OSError` naming ``path`` unless a file can be written there (before any work is done).

    The folder is created if needed; an existing directory at ``path`` is refused.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is an existing directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder of {what} {path}: {e.strerror or e}") from None
    if not path.parent.is_dir():
        raise OutputError(f"{what} {path}: {path.parent} is not a directory")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: the folder {path.parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} exists and is not writable")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, fsync it and rename it onto ``path``.

    Errors name ``path``, not the temporary file.
    """
    path = Path(path)
    check_writable(path)
    _clean_stale_temps(path.parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# -- artifacts ---------------------------------------------------------------------------------------------------
def _split(blob: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    """The safetensors header (parsed) and data section of a file's bytes."""
    if len(blob) < 8:
        raise ArtifactError(f"{path} is not a safetensors artifact (only {len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise ArtifactError(f"{path} is not a readable safetensors file (header length {n}, file {len(blob)} bytes)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} is not a readable safetensors file (header is not an object)")
    return header, blob[8 + n :]


def _checksum(header: dict[str, Any], data: bytes) -> str:
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != "checksum"}
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(canonical.encode())
    h.update(data)
    return h.hexdigest()


def _serialize(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section on 8 bytes
    return len(text).to_bytes(8, "little") + text + data


def save_artifact(
    path: str | os.PathLike, kind: str, version: int, tensors: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write ``tensors`` (torch tensors) and ``meta`` as one checksummed safetensors file, atomically."""
    from safetensors.torch import save

    metadata = {"kind": kind, "version": str(version), "meta": json.dumps(meta, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header, data = _split(save(tensors, metadata=metadata), Path(path))
    header["__metadata__"]["checksum"] = _checksum(header, data)
    return atomic_write_bytes(path, _serialize(header, data))


def _read_verified(path: Path, kind: str, versions: tuple[int, ...]) -> tuple[bytes, dict[str, Any], int]:
    if not path.is_file():
        raise ArtifactError(f"{kind} artifact not found: {path}")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    header, data = _split(blob, path)
    metadata = header.get("__metadata__") or {}
    stored = metadata.get("checksum")
    if stored is None:
        raise ArtifactError(f"{path} carries no checksum (corrupted, or written by a dormant from before checksums: "
                            "recompute it)")
    if stored != _checksum(header, data):
        raise ArtifactError(f"{path} is corrupted: its checksum does not match its contents")
    if metadata.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {metadata.get('kind')!r} artifact, expected {kind!r}")
    try:
        version = int(metadata["version"])
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: malformed {kind} header ({e})") from None
    if version not in versions:
        raise ArtifactError(f"{path}: {kind} version {version} is not supported (supported: {list(versions)})")
    return blob, meta, version


def verify_artifact(path: str | os.PathLike, kind: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """Check that ``path`` is an intact ``kind`` artifact of a supported version (no torch needed); returns meta."""
    _, meta, _ = _read_verified(Path(path), kind, versions)
    return meta


def load_artifact(
    path: str | os.PathLike, kind: str, versions: tuple[int, ...]
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Read an artifact written by :func:`save_artifact`; check its checksum, kind and version.

    Returns ``(tensors, meta, version)``. Raises :class:`ArtifactError` with the reason on any problem.
    """
    from safetensors.torch import load

    path = Path(path)
    blob, meta, version = _read_verified(path, kind, versions)
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises several types for inconsistent files
        raise ArtifactError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return tensors, meta, version


# -- result files ------------------------------------------------------------------------------------------------
def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON record and fsync it, so a crash loses at most the record in flight."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by :func:`append_jsonl`; a truncated final line (crash) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # interrupted write of the last record
            raise ArtifactError(f"{path}: line {i + 1} is not valid JSON") from None
    return records

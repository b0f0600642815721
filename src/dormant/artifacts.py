"""Versioned, self-validating artifacts and crash-safe result files.

Every result that outlives a process is one ``.safetensors`` file: tensors plus a JSON header
(``kind``, ``version``, free-form ``meta``). Files are written atomically (temp file + rename),
so a crash never leaves a half-written artifact behind, and loading checks kind and version.

Long runs append one JSON object per finished unit of work to a ``.jsonl`` file
(:func:`append_jsonl`); :func:`read_jsonl` tolerates a truncated last line so that a killed
run resumes where it stopped.
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

import torch

__all__ = [
    "ArtifactError",
    "config_key",
    "atomic_path",
    "atomic_write_text",
    "save_artifact",
    "load_artifact",
    "append_jsonl",
    "read_jsonl",
]


class ArtifactError(ValueError):
    """An artifact is missing, corrupted, of the wrong kind or version, or does not fit its model."""


def config_key(config: Any, digits: int = 12) -> str:
    """A short stable hash of a JSON-ready configuration (dict key order does not matter): the one key of what
    produced a result, a cache or an artifact."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_artifact(
    path: str | os.PathLike, kind: str, version: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``tensors`` and ``meta`` as one safetensors file, atomically."""
    from safetensors.torch import save_file

    header = {"kind": kind, "version": str(version), "meta": json.dumps(meta, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def load_artifact(
    path: str | os.PathLike, kind: str, versions: tuple[int, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Read an artifact written by :func:`save_artifact`; check its kind and version.

    Returns ``(tensors, meta, version)``. Raises :class:`ArtifactError` with the reason on any problem.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{kind} artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/corrupted files
        raise ArtifactError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if header.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {header.get('kind')!r} artifact, expected {kind!r}")
    try:
        version = int(header["version"])
        meta = json.loads(header["meta"])
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: malformed {kind} header ({e})") from e
    if version not in versions:
        raise ArtifactError(f"{path}: {kind} version {version} is not supported (supported: {list(versions)})")
    return tensors, meta, version


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON record and flush it to disk, so a crash loses at most the record in flight."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
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

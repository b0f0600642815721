"""Training data for active-neuron predictors: (FFN input -> active-neuron mask) pairs on disk.

One forward pass of the (thresholded) model over calibration text records, for every layer ``l``
and token ``t``, the FFN input ``x[t, l]`` (tap ``FFN_IN``, after the pre-FFN norm; stored float16)
and the active-neuron mask ``m[t, l, i] = MID[t, l, i] != 0`` (bit-packed, 8 neurons per byte, the
layout of :func:`dormant.traces.pack_masks`). This is the training signal of Deja Vu (Liu et al.,
ICML 2023, ``sparse_predictor``: per-layer MLP input -> ReLU > 0 labels) transposed to thresholded
SwiGLU FFNs, where "active" means ``|act(gate) * up| >= T`` (Dhar et al., arXiv 2412.12178, Eq. 7).

On disk a :class:`PairStore` is a folder: ``pairs.json`` (kind, version, model, thresholds, text)
and one ``shard_NNNNN.safetensors`` per window with tensors ``x.{l}`` float16 ``[T, D]``, ``m.{l}``
uint8 ``[T, ceil(I / 8)]`` and ``ids`` int32 ``[T]``. Shards are written as soon as their window is
done (atomically), so an interrupted collection resumes; readers load one layer's tensors at a time
(``safetensors`` reads single tensors), so a big model's data never needs to fit in memory.

Windows are split in text order into ``train`` | ``select`` | ``heldout``: predictors train on ``train``, choose
their decision thresholds, stop early and are compared on ``select``, and ``heldout`` is never used to choose
anything -- the scores a fit reports as held-out come from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dormant.artifacts import ArtifactError, atomic_write_text, config_key, save_artifact, verify_artifact
from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.traces import pack_masks, unpack_masks

__all__ = ["PairStore", "collect_pairs", "write_pairs", "SPLITS"]

SPLITS = ("train", "select", "heldout", "all")
_SHARD_KIND = "dormant.PairShard"


@dataclass
class PairStore:
    """A folder of (FFN input, active mask) pairs, read one layer at a time. Version 1.

    Attributes:
        root: the folder.
        meta: ``pairs.json``: ``model`` (:meth:`FFNLayout.describe` + id), ``thresholds`` (summary or
            ``None`` for a dense model), ``text`` (windows description), ``select`` and ``heldout`` (numbers
            of selection and held-out windows, the last ones, in that order), ``shards`` (file names in text
            order), ``tokens`` per shard.
    """

    root: Path
    meta: dict[str, Any]

    KIND = "dormant.PairStore"
    VERSION = 1

    @property
    def n_layers(self) -> int:
        return int(self.meta["model"]["n_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["model"]["hidden_size"])

    @property
    def n_neurons(self) -> int:
        return int(self.meta["model"]["intermediate_size"])

    def shards(self, split: str = "all") -> list[Path]:
        """Shard files of ``split`` (``train`` | ``select`` | ``heldout`` in text order, or ``all``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        names = self.meta["shards"]
        s, h = self.n_windows("select"), self.n_windows("heldout")
        bounds = {"train": (0, len(names) - s - h), "select": (len(names) - s - h, len(names) - h),
                  "heldout": (len(names) - h, len(names)), "all": (0, len(names))}[split]
        return [self.root / n for n in names[bounds[0] : bounds[1]]]

    def n_windows(self, split: str) -> int:
        """Windows of ``select`` or ``heldout`` (stores from before the selection split count theirs as ``select``)."""
        if "select" not in self.meta:
            return int(self.meta["heldout"]) if split == "select" else 0
        return int(self.meta[split])

    def n_tokens(self, split: str = "all") -> int:
        tokens = dict(zip(self.meta["shards"], self.meta["tokens"]))
        return sum(tokens[p.name] for p in self.shards(split))

    def _read(self, split: str, names: list[str]) -> Iterator[list[torch.Tensor]]:
        from safetensors import safe_open

        for path in self.shards(split):
            _verify_shard(path)
            with safe_open(str(path), framework="pt") as f:
                yield [f.get_tensor(n) for n in names]

    def token_ids(self, split: str = "all") -> torch.Tensor:
        """Long ``[n_windows, T]`` token ids of the windows of ``split`` (e.g. to score perplexity on held-out text)."""
        return torch.stack([t[0].long() for t in self._read(split, ["ids"])])

    def inputs(self, layer: int, split: str = "all") -> torch.Tensor:
        """FFN inputs of ``layer``: float16 ``[N, D]``, tokens in text order."""
        return torch.cat([t[0] for t in self._read(split, [f"x.{layer}"])])

    def packed_masks(self, layer: int, split: str = "all") -> torch.Tensor:
        """Active masks of ``layer``, bit-packed: uint8 ``[N, ceil(I / 8)]``."""
        return torch.cat([t[0] for t in self._read(split, [f"m.{layer}"])])

    def masks(self, layer: int, split: str = "all") -> torch.Tensor:
        """Active masks of ``layer``: bool ``[N, I]``."""
        return unpack_masks(self.packed_masks(layer, split), self.n_neurons)

    def source(self, layer: int, tap: Tap, split: str = "all") -> torch.Tensor:
        """What a predictor reads at ``(layer, tap)``: float32 inputs for ``FFN_IN``, bool masks for ``MID``."""
        if tap is Tap.FFN_IN:
            return self.inputs(layer, split).float()
        if tap is Tap.MID:
            return self.masks(layer, split)
        raise ValueError(f"pair stores hold FFN_IN and MID only, not {tap.value!r}")

    def iter_layer(self, layer: int, split: str = "all") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``(inputs float16 [T, D], packed masks uint8 [T, B])`` of ``layer``, one shard at a time."""
        yield from self._read(split, [f"x.{layer}", f"m.{layer}"])

    def density(self, split: str = "all") -> torch.Tensor:
        """``[n_layers]`` fraction of active neurons per token."""
        out = torch.zeros(self.n_layers, dtype=torch.float64)
        for layer in range(self.n_layers):
            out[layer] = self.masks(layer, split).double().mean()
        return out

    @classmethod
    def open(cls, root: str | Path) -> PairStore:
        root = Path(root)
        p = root / "pairs.json"
        if not p.is_file():
            raise ArtifactError(f"no pair store at {root} (missing pairs.json)")
        meta = json.loads(p.read_text())
        if meta.get("kind") != cls.KIND or int(meta.get("version", -1)) != cls.VERSION:
            raise ArtifactError(f"{p} is not a {cls.KIND} v{cls.VERSION}")
        missing = [n for n in meta["shards"] if not (root / n).is_file()]
        if missing:
            raise ArtifactError(f"{root}: missing shards {missing[:3]}")
        return cls(root, meta)


def _key(meta: dict[str, Any]) -> str:
    return config_key({k: meta[k] for k in ("model", "thresholds", "text")}, digits=16)


@torch.inference_mode()
def collect_pairs(
    model: nn.Module,
    windows: torch.Tensor,
    root: str | Path,
    select: int,
    heldout: int,
    model_id: str | None = None,
    text: dict[str, Any] | None = None,
    progress: bool = True,
) -> PairStore:
    """Record (FFN input, active mask) pairs of every layer over ``windows`` into a :class:`PairStore`.

    Apply thresholds first (:func:`dormant.llm.sparsify.sparsify_`): the hooks here are registered
    after them, so they see what the FFN really receives and the thresholded intermediate. Shards
    already on disk from an interrupted run with the same model, thresholds and text are kept.

    Args:
        model: a Hugging Face causal LM (dense or sparsified).
        windows: ``[n, seqlen]`` token ids; split in order into train | select | heldout.
        root: output folder.
        select: windows for decision thresholds, early stopping and model selection.
        heldout: windows never used to choose anything (``select + heldout < n``).
        model_id: recorded in the metadata.
        text: description of the text (e.g. :meth:`dormant.llm.text.Windows.describe`).
    """
    from tqdm.auto import tqdm

    from dormant.llm.sparsify import active_thresholds

    if windows.ndim != 2 or min(select, heldout) < 0 or select + heldout >= len(windows):
        raise ValueError(f"need [n, seqlen] windows and select + heldout < n; got {tuple(windows.shape)}, "
                         f"select={select}, heldout={heldout}")
    root = Path(root)
    layout = ffn_layout(model)
    thr = active_thresholds(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta: dict[str, Any] = {
        "kind": PairStore.KIND,
        "version": PairStore.VERSION,
        "model": {"id": model_id or getattr(model.config, "_name_or_path", None), "dtype": dtype, **layout.describe()},
        "thresholds": None if thr is None else {"site": thr.site, "taps": [t.value for t in thr.taps],
                                                 "mean_target": float(thr.targets.mean()),
                                                 "calibration": thr.calibration,
                                                 "values_sha": tensor_sha(thr.values)},
        "text": {**(text or {}), "windows": len(windows), "seqlen": int(windows.shape[1])},
        "select": select,
        "heldout": heldout,
    }
    key = _key(meta)
    if (root / "pairs.json").is_file():
        try:
            store = PairStore.open(root)
            if store.meta.get("key") == key:
                return store
        except ArtifactError:
            pass
        raise ArtifactError(f"{root} holds pairs of another model/thresholds/text; use another folder")
    device = next(model.parameters()).device
    buf: dict[tuple[int, Tap], torch.Tensor] = {}

    def record(layer: int, tap: Tap, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        buf[(layer, tap)] = x.to(torch.float16).cpu() if tap is Tap.FFN_IN else pack_masks(x != 0)

    names, tokens = [], []
    t0 = time.perf_counter()
    with tap_hooks(layout, [Tap.FFN_IN, Tap.MID], record):
        for i in tqdm(range(len(windows)), desc="pairs", unit="win", disable=not progress):
            name = f"shard_{i:05d}.safetensors"
            path = root / name
            if not _shard_ok(path, key):
                buf.clear()
                model(windows[i : i + 1].to(device), use_cache=False)
                _write_shard(path, key, i, windows[i], [buf[(layer, Tap.FFN_IN)] for layer in range(layout.n_layers)],
                             [buf[(layer, Tap.MID)] for layer in range(layout.n_layers)])
            names.append(name)
            tokens.append(int(windows.shape[1]))
    meta.update(key=key, shards=names, tokens=tokens, seconds=time.perf_counter() - t0)
    atomic_write_text(root / "pairs.json", json.dumps(meta, indent=1, sort_keys=True))
    return PairStore(root, meta)


def _write_shard(path: Path, key: str, window: int, ids: torch.Tensor, xs: list[torch.Tensor], packed: list[torch.Tensor]):
    tensors = {"ids": ids.to(torch.int32)}
    for layer, (x, m) in enumerate(zip(xs, packed)):
        tensors[f"x.{layer}"] = x.to(torch.float16)
        tensors[f"m.{layer}"] = m
    save_artifact(path, _SHARD_KIND, 1, tensors, {"key": key, "window": window})


def write_pairs(root: str | Path, inputs: torch.Tensor, masks: torch.Tensor, select: int, heldout: int,
                model: dict[str, Any] | None = None) -> PairStore:
    """A :class:`PairStore` from in-memory pairs (synthetic data, tests, imports from other tools).

    Args:
        inputs: float ``[W, T, L, D]`` FFN inputs of ``W`` windows of ``T`` tokens.
        masks: bool ``[W, T, L, I]`` active masks.
        select, heldout: the last ``select + heldout`` windows form the selection and held-out splits.
        model: model description (``n_layers``, ``hidden_size``, ``intermediate_size`` are filled in).
    """
    root = Path(root)
    w, t, n_layers, d = inputs.shape
    meta: dict[str, Any] = {
        "kind": PairStore.KIND, "version": PairStore.VERSION,
        "model": {**(model or {}), "n_layers": n_layers, "hidden_size": d, "intermediate_size": masks.shape[-1]},
        "thresholds": None, "text": {"windows": w, "seqlen": t, "source": "in-memory"}, "select": select,
        "heldout": heldout,
    }
    meta["key"] = key = _key(meta)
    names = []
    for i in range(w):
        names.append(f"shard_{i:05d}.safetensors")
        _write_shard(root / names[-1], key, i, torch.zeros(t, dtype=torch.int32),
                     [inputs[i, :, layer] for layer in range(n_layers)],
                     [pack_masks(masks[i, :, layer]) for layer in range(n_layers)])
    meta.update(shards=names, tokens=[t] * w)
    atomic_write_text(root / "pairs.json", json.dumps(meta, indent=1, sort_keys=True))
    return PairStore(root, meta)


_VERIFIED: set[tuple[str, int, int]] = set()


def _verify_shard(path: Path) -> None:
    """Check a shard's checksum once per process (readers then load single tensors from it)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        verify_artifact(path, _SHARD_KIND, (1,))
        _VERIFIED.add(key)


def _shard_ok(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return verify_artifact(path, _SHARD_KIND, (1,)).get("key") == key
    except ArtifactError:  # a corrupted shard (e.g. from a crash): rewrite it
        return False


def tensor_sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

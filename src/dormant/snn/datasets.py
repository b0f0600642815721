"""Image datasets for conversion and evaluation, without torchvision.

Every loader returns an :class:`ImageSet` of uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``; the model's
normalisation is applied by :meth:`ImageSet.tensors`. Files are found through :func:`dormant.data.resolve`.

| name | splits | source |
|---|---|---|
| ``cifar10-lossless`` | train (images 0..3999 of data_batch_1), test (0..999) | bit-exact npz slices |
| ``cifar10-jpeg`` | train (50,000), test (10,000), round-robin over classes | JPEG q75 zips: lossy, not "CIFAR-10 accuracy" |
| ``cifar10`` | train (50,000), test (10,000) | the official python archive (Krizhevsky 2009) |
| ``mnist`` | train (60,000), test (10,000) | IDX gz files (LeCun et al.) |
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageSet", "DATASETS", "load_dataset", "split_holdout", "augment_crop_flip", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageSet:
    """Images and labels of one split.

    Attributes:
        x: ``[N, C, H, W]`` uint8.
        y: ``[N]`` int64.
        name: e.g. ``"cifar10-lossless:train"``; subsets append ``[...]``.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.ndim != 4 or len(self.x) != len(self.y):
            raise ValueError(f"ImageSet wants uint8 [N,C,H,W] images and N labels, got {tuple(self.x.shape)}, "
                             f"{self.x.dtype}, {len(self.y)} labels")
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor | Sequence[int], tag: str) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.x[index], self.y[index], f"{self.name}[{tag}]")

    def head(self, n: int | None) -> ImageSet:
        """The first ``n`` images (all when ``n`` is ``None`` or larger than the set)."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.x[:n], self.y[:n], f"{self.name}[:{n}]")

    def tensors(self, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """``((x/255 - mean)/std`` as float32 ``[N, C, H, W]``, labels ``[N]``)."""
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return (self.x.float() / 255 - m) / s, self.y

    def describe(self) -> dict:
        return {"name": self.name, "n": len(self), "shape": list(self.x.shape[1:])}


def split_holdout(data: ImageSet, holdout: int, seed: int = 0, calib_n: int | None = None
                  ) -> tuple[ImageSet, ImageSet]:
    """Split a training set into (calibration, held-out) parts with a seeded permutation.

    The held-out part is for early stopping / selection of calibration knobs: it is training data, never test.
    ``calib_n`` keeps only the first ``calib_n`` calibration images (the same as ``.head(calib_n)`` on the
    calibration part, without copying the rest).
    """
    if not 0 <= holdout < len(data):
        raise ValueError(f"holdout {holdout} must be in [0, {len(data)})")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    rest = perm[holdout:]
    if calib_n is not None and calib_n < len(rest):
        calib = data.subset(rest[:calib_n], f"calib,seed={seed}")
        calib.name += f"[:{calib_n}]"
    else:
        calib = data.subset(rest, f"calib,seed={seed}")
    return calib, data.subset(perm[:holdout], f"holdout,seed={seed}")


def _npz(source: str, name: str, path: str | None) -> ImageSet:
    from dormant.data import resolve

    with np.load(resolve(source, path)) as z:
        x, y = z["x"], z["y"]
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64)),
                    name)


def _cifar_lossless(split: str, path: str | None) -> ImageSet:
    source = {"train": "cifar10-train4000", "test": "cifar10-test1000"}[split]
    return _npz(source, f"cifar10-lossless:{split}", path)


def _cifar_jpeg(split: str, path: str | None) -> ImageSet:
    """Decode ``<split>/<class>/NNNN.jpg`` with Pillow (a matplotlib dependency).

    ``NNNN`` is the image's index within its class in the official order. Images are ordered round-robin over
    the classes (index 0 of every class, then index 1, ...), so the first N images are class-balanced and, for the
    test split, close to the official first N (the first 1000 hold the first ~100 test images of every class).
    """
    from PIL import Image

    from dormant.data import resolve

    xs, ys = [], []
    with zipfile.ZipFile(resolve(f"cifar10-jpeg-{split}", path)) as z:
        names = [n for n in z.namelist() if n.lower().endswith(".jpg")]
        keyed = []
        for n in names:
            parts = n.split("/")
            if len(parts) < 3 or parts[-2] not in CIFAR10_CLASSES:
                raise ValueError(f"unexpected member {n!r} in the CIFAR-10 JPEG zip (want <split>/<class>/NNNN.jpg)")
            keyed.append((CIFAR10_CLASSES.index(parts[-2]), int(Path(parts[-1]).stem), n))
        for _, label, n in sorted((i, c, n) for c, i, n in keyed):
            with Image.open(io.BytesIO(z.read(n))) as im:
                xs.append(np.asarray(im.convert("RGB")))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).copy())
    return ImageSet(x, torch.tensor(ys), f"cifar10-jpeg:{split}")


_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"  # of cifar-10-python.tar.gz (also checked by sha256 on download)


def _cifar_official(split: str, path: str | None) -> ImageSet:
    """Read the official archive. Its batches are Python pickles, so the archive's checksum is verified first."""
    from dormant.data import resolve

    p = resolve("cifar10-python", path)
    md5 = hashlib.md5(p.read_bytes()).hexdigest()
    if md5 != _CIFAR_MD5:
        raise ValueError(f"{p}: md5 {md5} is not the official archive's {_CIFAR_MD5}; refusing to unpickle it")
    want = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    with tarfile.open(p, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        for w in want:
            d = pickle.load(tar.extractfile(members[w]), encoding="bytes")  # verified official file
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), f"cifar10:{split}")


def _idx(p: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic ``0x0000 08 ndim`` then dims, then uint8 data."""
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{p}: not a uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{p}: truncated IDX file ({data.size} values for dims {dims})")
    return data.reshape(dims)


def _mnist(split: str, path: str | None) -> ImageSet:
    """MNIST from IDX files; ``path`` is a folder holding the four canonical file names."""
    from dormant.data import resolve

    prefix = {"train": "train", "test": "t10k"}[split]
    key = {"train": "train", "test": "test"}[split]
    files = {}
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        explicit = Path(path) / f"{prefix}-{kind}-{idx}-ubyte.gz" if path else None
        files[kind] = resolve(f"mnist-{key}-{kind}", explicit)
    x = _idx(files["images"])
    y = _idx(files["labels"])
    return ImageSet(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)), f"mnist:{split}")


DATASETS: dict[str, Callable[[str, str | None], ImageSet]] = {
    "cifar10-lossless": _cifar_lossless,
    "cifar10-jpeg": _cifar_jpeg,
    "cifar10": _cifar_official,
    "mnist": _mnist,
}


def load_dataset(name: str, split: str, path: str | None = None) -> ImageSet:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` (see the module table)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return DATASETS[name](split, path)


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per image.

    Args:
        x: ``[B, C, H, W]`` uint8 images (padding is black, as torchvision's ``RandomCrop(padding=4)``).
        generator: CPU generator (seeded per epoch for resumable runs).

    Returns:
        ``[B, C, H, W]`` uint8.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)

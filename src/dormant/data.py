"""Where data and weights come from: one resolution order for every file the project reads.

For a named source the search order is

1. an explicit path given by the caller (CLI flag or argument);
2. ``$DORMANT_DATA`` -- a directory laid out like ``../shared/data``;
3. ``../shared/data`` next to the project checkout (and next to the current directory);
4. the user cache, ``$DORMANT_CACHE`` or ``~/.cache/dormant``;
5. a download into that cache from the source's public URL (skipped when ``DORMANT_OFFLINE=1``).

When everything fails, :class:`DataNotFoundError` lists every place that was looked at.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dormant.config import UserError

__all__ = ["DataSource", "DataNotFoundError", "SOURCES", "resolve", "data_roots", "cache_dir"]

log = logging.getLogger(__name__)


class DataNotFoundError(UserError, FileNotFoundError):
    """A data file or folder could not be found locally nor downloaded."""


@dataclass(frozen=True)
class DataSource:
    """A named file or folder the project reads.

    Attributes:
        relpaths: candidate paths relative to a data root, most preferred first.
        url: public download URL (a file, or a ``.zip`` archive holding ``member``); ``None`` if there is none.
        member: path of the file inside the downloaded zip archive.
        sha256: optional checksum of the downloaded file (checked after download).
        note: shown in the error message when the source cannot be found.
    """

    relpaths: tuple[str, ...]
    url: str | None = None
    member: str | None = None
    sha256: str | None = None
    note: str = ""


_WIKITEXT_ZIP = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"
SOURCES: dict[str, DataSource] = {
    "wikitext2-test": DataSource(("wikitext-2/wiki.test.raw",), _WIKITEXT_ZIP, "wikitext-2-raw/wiki.test.raw"),
    # The raw validation split when present; the shared folder only carries its tokenized form.
    "wikitext2-valid": DataSource(
        ("wikitext-2/wiki.valid.raw", "wikitext-2/tokens/valid.txt"), _WIKITEXT_ZIP, "wikitext-2-raw/wiki.valid.raw"
    ),
    "stories260k": DataSource(
        ("llm/stories260K/hf",),
        note="the Hugging Face conversion of karpathy's stories260K (tinyllamas); give its folder with --model",
    ),
    # --- dormant.snn: CIFAR-10, MNIST and the pretrained ReLU networks ---
    "cifar10-test1000": DataSource(
        ("cifar10/cifar10_test1000_lossless.npz",),
        note="bit-exact slice (official test images 0..999) shipped in ../shared/data; use cifar10-python otherwise",
    ),
    "cifar10-train4000": DataSource(
        ("cifar10/cifar10_train4000_lossless.npz",),
        note="bit-exact slice (official train images 0..3999) shipped in ../shared/data; use cifar10-python otherwise",
    ),
    "cifar10-jpeg-train": DataSource(("cifar10/cifar10_train_jpeg_q75.zip",), note="lossy JPEG copy of the train set"),
    "cifar10-jpeg-test": DataSource(("cifar10/cifar10_test_jpeg_q75.zip",), note="lossy JPEG copy of the test set"),
    "cifar10-python": DataSource(
        ("cifar10/cifar-10-python.tar.gz",), "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        note="the official CIFAR-10 python archive (Krizhevsky 2009)",
    ),
    "mnist-train-images": DataSource(
        ("mnist/train-images-idx3-ubyte.gz",), "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    ),
    "mnist-train-labels": DataSource(
        ("mnist/train-labels-idx1-ubyte.gz",), "https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz"
    ),
    "mnist-test-images": DataSource(
        ("mnist/t10k-images-idx3-ubyte.gz",), "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz"
    ),
    "mnist-test-labels": DataSource(
        ("mnist/t10k-labels-idx1-ubyte.gz",), "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz"
    ),
    "resnet20-cifar10": DataSource(
        ("cifar10-models/resnet20-12fca82f.th",),
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th",
        sha256="12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    ),
    "resnet32-cifar10": DataSource(
        ("cifar10-models/resnet32-d509ac18.th",),
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet32-d509ac18.th",
        sha256="d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
    ),
    "resnet44-cifar10": DataSource(
        ("cifar10-models/resnet44-014dd654.th",),
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet44-014dd654.th",
        sha256="014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
    ),
    "resnet56-cifar10": DataSource(
        ("cifar10-models/resnet56-4bfd9763.th",),
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet56-4bfd9763.th",
        sha256="4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
    ),
    "lenet-mnist": DataSource(
        ("mnist/mnistnet_shrinkbench.pt",),
        "https://github.com/JJGO/shrinkbench-models/raw/master/mnist/mnistnet.pt",
        sha256="5e1e80e145773c6ea30cb93dfc7d23fb87fd4116ff24e6889fdcb96a577190c9",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DORMANT_CACHE", Path.home() / ".cache" / "dormant"))


def data_roots() -> list[Path]:
    """Data roots in search order (steps 2-4 above); entries may not exist, except ``$DORMANT_DATA``: a value
    that is not a directory is an error (a typo would otherwise fall back to other data without a word)."""
    roots = []
    if os.environ.get("DORMANT_DATA"):
        given = Path(os.path.expanduser(os.environ["DORMANT_DATA"]))
        if not given.is_dir():
            raise DataNotFoundError(f"DORMANT_DATA={os.environ['DORMANT_DATA']} is not a directory; unset it or point "
                                    "it at a folder laid out like ../shared/data")
        roots.append(given)
    here = Path(__file__).resolve()
    if len(here.parents) > 3:  # src/dormant/data.py in a checkout -> <checkout>/../shared/data
        roots.append(here.parents[3] / "shared" / "data")
    roots.append(Path.cwd().parent / "shared" / "data")
    roots.append(cache_dir())
    seen, out = set(), []
    for r in roots:
        key = str(r.resolve()) if r.exists() else str(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def resolve(name: str, path: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """Return a local path for data source ``name`` (see the module docstring for the search order).

    Args:
        name: a key of :data:`SOURCES`.
        path: an explicit path; if given it must exist (nothing else is tried).
        download: allow step 5; defaults to ``DORMANT_OFFLINE`` not being ``1``.
    """
    if path is not None:
        p = Path(os.path.expanduser(path))
        if not p.exists():
            raise DataNotFoundError(f"{name}: the given path {p} does not exist")
        return p
    if name not in SOURCES:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    src = SOURCES[name]
    tried = []
    roots = data_roots()
    for root in roots:
        for rel in src.relpaths:
            p = root / rel
            if p.exists():
                if os.environ.get("DORMANT_DATA") and root != roots[0]:
                    log.warning("%s is not in DORMANT_DATA=%s; using %s", name, os.environ["DORMANT_DATA"], p)
                return p
            tried.append(str(p))
    if download is None:
        download = os.environ.get("DORMANT_OFFLINE", "0") != "1"
    failure = "no public URL known" if src.url is None else "download disabled (DORMANT_OFFLINE=1)"
    if src.url is not None and download:
        try:
            return _download(src, cache_dir() / src.relpaths[0])
        except Exception as e:  # network errors come in many types
            failure = f"download from {src.url} failed: {type(e).__name__}: {e}"
    lines = "\n  ".join(tried)
    raise DataNotFoundError(
        f"could not find data {name!r}. Looked in:\n  {lines}\n{failure}.\n"
        f"Set DORMANT_DATA to a folder laid out like ../shared/data, or pass an explicit path. {src.note}"
    )


def _download(src: DataSource, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``src`` into the cache (and extract its member), each step atomic and the archive checksummed.

    A killed download or extraction leaves only a temporary file, never a partial file that a later run would
    accept; an archive whose SHA-256 differs from the known one is refused.
    """
    from dormant.artifacts import atomic_path

    blob = cache_dir() / "downloads" / Path(src.url).name
    if not blob.exists():
        with atomic_path(blob) as tmp:
            with urllib.request.urlopen(src.url, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            if src.sha256 and _sha256(tmp) != src.sha256:
                raise OSError(f"checksum mismatch for {src.url}: refusing the download")
    elif src.sha256 and _sha256(blob) != src.sha256:
        raise OSError(f"cached download {blob} does not match its known checksum; delete it to download again")
    with atomic_path(dest) as tmp:
        if src.member is None:
            shutil.copyfile(blob, tmp)
        else:
            with zipfile.ZipFile(blob) as z, z.open(src.member) as m, open(tmp, "wb") as f:
                shutil.copyfileobj(m, f)
    return dest


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

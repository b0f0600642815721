"""The one place reports are written from: markdown tables, CSV files, PNG figures (all atomic), provenance.

Figures are made with matplotlib's object-oriented API (:class:`matplotlib.figure.Figure`), never ``pyplot``, so
writing a plot changes no global state (no backend switch, no figure registry) in the caller's process.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dormant.artifacts import atomic_path, atomic_write_text

__all__ = ["markdown_table", "csv_text", "write_csv", "new_figure", "save_figure", "write_markdown", "provenance", "fmt"]


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    """CSV text (RFC 4180 quoting) of ``rows``: dicts (columns = their keys in first-seen order, or ``headers``)
    or sequences (``headers`` required). Missing dict keys are empty cells."""
    buf = io.StringIO()
    if rows and isinstance(rows[0], Mapping):
        keys = list(headers) if headers is not None else list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", restval="")
        w.writeheader()
        w.writerows(rows)
    else:
        if headers is None:
            raise ValueError("rows that are sequences need headers")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(headers)
        w.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]],
              headers: Sequence[str] | None = None) -> Path:
    """Write :func:`csv_text` of ``rows`` to ``path`` atomically."""
    return atomic_write_text(path, csv_text(rows, headers))


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A matplotlib ``Figure`` and its ``[nrows, ncols]`` axes (no pyplot, no display, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return Path(path)


def write_markdown(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_text(path, text)


def provenance() -> dict[str, Any]:
    """Machine, versions and commit, for result files and benchmark logs."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        root = Path(__file__).resolve().parents[2]
        info["commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

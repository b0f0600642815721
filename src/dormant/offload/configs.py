"""The config dataclasses of :mod:`dormant.offload` (torch-free, so the CLI checks flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dormant.config import checked, field

__all__ = ["StorageLayout"]


@dataclass
@checked
class StorageLayout:
    """How FFN weights sit in the weight file (:mod:`dormant.offload.layout`)."""

    bundling: Literal["bundled", "separate"] = field("bundled", help="weight file layout: bundled | separate")
    chunk: int = field(1, help="neurons per chunk, the unit of loading and caching", ge=1)
    align: int = field(4096, help="read alignment in bytes (flash page / O_DIRECT block); 1 = none", ge=1)
    coalesce: bool = field(True, help="read a run of consecutive needed chunks with one request")

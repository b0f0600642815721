"""Device profiles as data: storage, DRAM and compute numbers, each with its source.

A profile is a YAML file (shipped ones live in ``dormant/offload/profiles/*.yaml``; users pass their
own path). Every number is a mapping ``{value, source, estimate?, note?}`` so that no figure in a
result is anonymous::

    name: rpi5-nvme
    description: Raspberry Pi 5 + NVMe SSD on the PCIe x1 connector (Gen 3)
    storage:
      device: M.2 HAT+ with a PCIe Gen 3 NVMe SSD
      seq_read_MBps:          {value: 830, source: "..."}
      rand_read_4k_qd1_iops:  {value: 10000, source: "...", estimate: true, note: "..."}
      rand_read_4k_max_iops:  {value: 80000, source: "...", estimate: true}
      max_queue_depth:        {value: 32, source: "..."}
    dram:
      capacity_GB:            {value: 8, source: "..."}
      bandwidth_GBps:         {value: 10, source: "...", estimate: true}
    compute:
      GFLOPs:                 {value: 50, source: "...", estimate: true}

Units: MB = 1e6 B, GB = 1e9 B, GFLOPs = 1e9 floating-point operations per second (effective, batch 1).

Storage model. The three published figures every flash benchmark reports -- sequential read
bandwidth ``B``, 4 KiB random-read IOPS at queue depth 1 and at the device's best queue depth --
give a per-request latency ``L`` and an IOPS ceiling ``X_max``::

    t_req(s)  = L + s / B                      one request of s bytes alone (QD1)
    L         = 1 / IOPS_4k_qd1 - 4096 / B
    X(s, q)   = min(q / t_req(s), X_max, B / s)    requests per second with q requests in flight
    BW(s, q)  = s * X(s, q)                    read bandwidth as a function of read size and depth

so small reads are latency- or IOPS-bound and large reads bandwidth-bound, as measured for flash by
LLM in a flash (Alizadeh et al. 2024, §2.2, "read throughput vs chunk size and threads"). A batch of
``n`` requests totalling ``S`` bytes issued together at depth ``q`` takes::

    T(n, S) = max( (n * L + S / B) / min(q, n),  n / X_max,  S / B )      (0 if n = 0)

i.e. the service time of the requests spread over ``min(q, n)`` parallel slots, bounded below by the
IOPS ceiling and by the bandwidth. With equal-size requests this is ``n / X(s, q)`` (for n >= q).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dormant.config import UserError

__all__ = ["ProfileError", "Figure", "StorageModel", "DeviceProfile", "list_profiles", "load_profile"]


class ProfileError(UserError, ValueError):
    """A device profile is missing, malformed or inconsistent; the message says which key and why."""


@dataclass(frozen=True)
class Figure:
    """One number with where it comes from."""

    value: float
    source: str
    estimate: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"value": self.value, "source": self.source}
        if self.estimate:
            d["estimate"] = True
        if self.note:
            d["note"] = self.note
        return d


# section -> {key: (description, integer?)}; every key is required.
SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "storage": {
        "seq_read_MBps": ("sequential read bandwidth, large reads (MB/s)", False),
        "rand_read_4k_qd1_iops": ("4 KiB random reads per second at queue depth 1", False),
        "rand_read_4k_max_iops": ("4 KiB random reads per second at the best queue depth", False),
        "max_queue_depth": ("requests the device and driver keep in flight", True),
    },
    "dram": {
        "capacity_GB": ("DRAM capacity (GB)", False),
        "bandwidth_GBps": ("sustained DRAM read bandwidth (GB/s)", False),
    },
    "compute": {
        "GFLOPs": ("effective batch-1 matrix-vector throughput (GFLOP/s)", False),
    },
}
_TEXT_KEYS = {"storage": {"device"}, "dram": {"kind"}, "compute": {"unit"}}


@dataclass(frozen=True)
class StorageModel:
    """Parametric flash read model (equations in the module docstring).

    Attributes:
        bandwidth: ``B``, bytes/s.
        latency: ``L``, seconds per request at queue depth 1 (without the transfer).
        max_iops: ``X_max``, requests/s ceiling.
        max_queue_depth: the deepest queue the device accepts.
    """

    bandwidth: float
    latency: float
    max_iops: float
    max_queue_depth: int

    def depth(self, queue_depth: int | None) -> int:
        """The queue depth actually used: ``min(requested, max_queue_depth)`` (device max if None)."""
        q = self.max_queue_depth if queue_depth is None else int(queue_depth)
        if q < 1:
            raise ValueError("queue depth must be >= 1")
        return min(q, self.max_queue_depth)

    def request_rate(self, size: float, queue_depth: int | None = None) -> float:
        """``X(s, q)``: requests per second for ``size``-byte reads."""
        q = self.depth(queue_depth)
        return min(q / (self.latency + size / self.bandwidth), self.max_iops, self.bandwidth / size)

    def read_bandwidth(self, size: float, queue_depth: int | None = None) -> float:
        """``BW(s, q) = s * X(s, q)`` in bytes/s."""
        return size * self.request_rate(size, queue_depth)

    def batch_time(self, n_requests, n_bytes, queue_depth: int | None = None):
        """``T(n, S)`` in seconds for arrays (or scalars) of request counts and byte totals."""
        q = self.depth(queue_depth)
        n = np.asarray(n_requests, dtype=np.float64)
        s = np.asarray(n_bytes, dtype=np.float64)
        slots = np.clip(np.minimum(n, q), 1.0, None)
        t = np.maximum.reduce([(n * self.latency + s / self.bandwidth) / slots, n / self.max_iops,
                               s / self.bandwidth])
        t = np.where(n > 0, t, 0.0)
        return float(t) if t.ndim == 0 else t


@dataclass
class DeviceProfile:
    """A device: its storage model inputs, DRAM and compute, each a :class:`Figure`.

    Attributes:
        name: short identifier (file stem of shipped profiles).
        description: one line.
        figures: ``{"storage.seq_read_MBps": Figure, ...}`` -- every key of :data:`SCHEMA`.
        text: free-text fields (``storage.device`` ...).
        path: file it was read from (``None`` when built in code).
    """

    name: str
    description: str
    figures: dict[str, Figure]
    text: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self):
        missing = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if f"{s}.{k}" not in self.figures]
        if missing:
            raise ProfileError(f"profile {self.name!r}: missing {', '.join(missing)}")
        for key, fig in self.figures.items():
            if not (isinstance(fig.value, (int, float)) and math.isfinite(fig.value) and fig.value > 0):
                raise ProfileError(f"profile {self.name!r}: {key} must be a positive number, got {fig.value!r}")
            if not fig.source.strip():
                raise ProfileError(f"profile {self.name!r}: {key} needs a source")
        b = self.value("storage.seq_read_MBps") * 1e6
        if 1.0 / self.value("storage.rand_read_4k_qd1_iops") <= 4096 / b:
            raise ProfileError(
                f"profile {self.name!r}: 4 KiB QD1 IOPS ({self.value('storage.rand_read_4k_qd1_iops'):g}) would "
                f"need more than the sequential bandwidth ({b / 1e6:g} MB/s); one of them is wrong"
            )
        if self.value("storage.rand_read_4k_max_iops") < self.value("storage.rand_read_4k_qd1_iops"):
            raise ProfileError(f"profile {self.name!r}: max IOPS is below the QD1 IOPS")

    def value(self, key: str) -> float:
        return float(self.figures[key].value)

    @property
    def storage(self) -> StorageModel:
        b = self.value("storage.seq_read_MBps") * 1e6
        lat = 1.0 / self.value("storage.rand_read_4k_qd1_iops") - 4096 / b
        return StorageModel(b, lat, self.value("storage.rand_read_4k_max_iops"),
                            int(self.value("storage.max_queue_depth")))

    @property
    def dram_bandwidth(self) -> float:
        """Bytes/s."""
        return self.value("dram.bandwidth_GBps") * 1e9

    @property
    def dram_capacity(self) -> float:
        """Bytes."""
        return self.value("dram.capacity_GB") * 1e9

    @property
    def flops(self) -> float:
        """FLOP/s."""
        return self.value("compute.GFLOPs") * 1e9

    def estimates(self) -> list[str]:
        """Keys whose value is marked as an estimate."""
        return [k for k, f in self.figures.items() if f.estimate]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "description": self.description}
        for section, keys in SCHEMA.items():
            d[section] = {k: self.figures[f"{section}.{k}"].to_dict() for k in keys}
            for t in _TEXT_KEYS.get(section, ()):
                if f"{section}.{t}" in self.text:
                    d[section][t] = self.text[f"{section}.{t}"]
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<dict>") -> DeviceProfile:
        """Validate and build a profile; errors name the offending key."""
        if not isinstance(data, dict):
            raise ProfileError(f"{origin}: a profile must be a mapping with name, description, {', '.join(SCHEMA)}")
        allowed_top = {"name", "description", *SCHEMA}
        extra = set(data) - allowed_top
        if extra:
            raise ProfileError(f"{origin}: unknown top-level key(s) {sorted(extra)}; allowed: {sorted(allowed_top)}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ProfileError(f"{origin}: 'name' must be a non-empty string")
        figures: dict[str, Figure] = {}
        text: dict[str, str] = {}
        for section, keys in SCHEMA.items():
            sec = data.get(section)
            if not isinstance(sec, dict):
                raise ProfileError(f"{origin}: section '{section}' is missing or not a mapping "
                                   f"(needs {', '.join(keys)})")
            extra = set(sec) - set(keys) - _TEXT_KEYS.get(section, set())
            if extra:
                raise ProfileError(f"{origin}: unknown key(s) {sorted(extra)} in '{section}'; allowed: "
                                   f"{sorted(set(keys) | _TEXT_KEYS.get(section, set()))}")
            for t in _TEXT_KEYS.get(section, ()):
                if t in sec:
                    text[f"{section}.{t}"] = str(sec[t])
            for key, (desc, integer) in keys.items():
                where = f"{origin}: {section}.{key} ({desc})"
                if key not in sec:
                    raise ProfileError(f"{where} is missing")
                entry = sec[key]
                if not isinstance(entry, dict) or "value" not in entry or "source" not in entry:
                    raise ProfileError(f"{where} must be a mapping {{value: ..., source: ...}}, got {entry!r}")
                bad = set(entry) - {"value", "source", "estimate", "note"}
                if bad:
                    raise ProfileError(f"{where}: unknown field(s) {sorted(bad)}")
                v = entry["value"]
                if isinstance(v, str):  # YAML 1.1 reads 1e3 (no dot) as a string: accept numbers written so
                    try:
                        v = float(v)
                    except ValueError:
                        pass
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ProfileError(f"{where}: value must be a number, got {v!r}")
                if integer and float(v) != int(v):
                    raise ProfileError(f"{where}: value must be an integer, got {v!r}")
                if not isinstance(entry["source"], str) or not entry["source"].strip():
                    raise ProfileError(f"{where}: source must be a non-empty string")
                figures[f"{section}.{key}"] = Figure(float(v), entry["source"], bool(entry.get("estimate", False)),
                                                     str(entry.get("note", "")))
        try:
            return cls(name, str(data.get("description", "")), figures, text, None if origin == "<dict>" else origin)
        except ProfileError as e:
            raise ProfileError(f"{origin}: {e}") from None


def _shipped() -> dict[str, Any]:
    root = resources.files("dormant.offload") / "profiles"
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(_shipped())


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a YAML/JSON file by path. Raises :class:`ProfileError` on any problem."""
    import yaml

    shipped = _shipped()
    key = str(name_or_path)
    if key in shipped:
        text, origin = shipped[key].read_text(encoding="utf-8"), f"{key}.yaml"
    else:
        p = Path(os.path.expanduser(key))
        if not p.is_file():
            raise ProfileError(f"device profile {key!r} is neither a shipped profile "
                               f"({', '.join(sorted(shipped))}) nor a file")
        text, origin = p.read_text(encoding="utf-8"), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"{origin}: not valid YAML/JSON ({e})") from None
    return DeviceProfile.from_dict(data, origin)

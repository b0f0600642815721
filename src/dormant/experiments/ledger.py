"""The one results ledger of every resumable run, and the one key of a configuration.

A run that takes minutes to hours appends one JSON record per finished unit of work (a sweep point, a
calibration, an evaluation) to ``results.jsonl`` as soon as the unit is done, and on a rerun skips the units it
finds there. :class:`Ledger` is that file plus three guarantees:

* **one configuration per folder.** The run's configuration key (:func:`config_key`) is written to
  ``<results>.config.json`` the first time the folder is used; a run with another key is refused before it does
  any work, and so is a results file holding records of another key.
* **a torn last record is recovered, not lost.** A kill while a record is appended can leave a partial last
  line. Opening the ledger moves that fragment, verbatim, to ``<results>.torn`` (appended, never deleted) and
  truncates the file to its last complete record, so the unit is recomputed and every later run reads a valid
  file. A complete record whose newline was cut is kept (the newline is restored). Damage anywhere else is an
  error naming the line: it is not something a crash does.
* **cached intermediates are keyed by what produced them.** :meth:`Ledger.cache_path` names a cache file after
  the key of its inputs (e.g. activation statistics after the model, text and taps), so a rerun under another
  configuration recomputes it instead of reusing a stale one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dormant import distributed
from dormant.artifacts import ArtifactError, append_jsonl, atomic_write_text, config_key

__all__ = ["config_key", "Ledger"]


class Ledger:
    """The append-only results file of one resumable run.

    Args:
        path: the ``.jsonl`` file (its folder is created).
        key: the run's configuration key; every record carries it.
        config: the configuration the key was computed from (written beside the results for people to read).
        what: how the refusal names the run ("sweep", "SNN sweep", ...).
        shared: opened by every rank of a ``torchrun`` group (:mod:`dormant.distributed`): the main rank opens (and
            repairs) and writes the file, the others wait for it, read it, and keep what they append in memory only.
    """

    def __init__(self, path: str | os.PathLike, key: str, config: Mapping[str, Any] | None = None,
                 what: str = "run", shared: bool = False):
        self.path = Path(path)
        self.key = key
        self.what = what
        self.write = not shared or distributed.is_main()
        if not self.write:
            distributed.barrier()  # the main rank opens the ledger first (below)
            self._open(config)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open(config)
        if shared:
            distributed.barrier()

    def _open(self, config: Mapping[str, Any] | None) -> None:
        key, what = self.key, self.what
        self.config_path = self.path.with_name(self.path.stem + ".config.json")
        self._check_config(config)
        self.torn: str | None = None  # the fragment set aside on opening, if any
        self.records: list[dict[str, Any]] = self._read()
        other = next((r for r in self.records if r.get("key") != key), None)
        if other is not None:
            raise ArtifactError(
                f"{self.path} holds results of another configuration ({what} key {other.get('key')}, this run "
                f"{key}); use another --out, or delete the folder to start over")
        if self.write and not self.config_path.exists():
            atomic_write_text(self.config_path, json.dumps({"key": key, "config": dict(config or {})}, indent=1,
                                                           sort_keys=True, default=str) + "\n")

    # -- opening ---------------------------------------------------------------------------------------------
    def _check_config(self, config: Mapping[str, Any] | None) -> None:
        if not self.config_path.exists():
            return
        try:
            theirs = json.loads(self.config_path.read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{self.config_path} is not readable ({e}); delete it to reuse the folder") from None
        if theirs != self.key:
            raise ArtifactError(
                f"{self.path.parent} holds results of another configuration ({self.what} key {theirs}, this run "
                f"{self.key}; see {self.config_path.name}); use another --out, or delete the folder to start over")

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # text after the last newline: b"" when the file ends cleanly
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ArtifactError(f"{self.path}: line {i + 1} is not valid JSON (damage a crash cannot cause); "
                                    "fix or remove the line") from None
        if tail.strip():
            try:
                records.append(json.loads(tail))  # complete record, only its newline was cut
                if not self.write:
                    return records
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
            except (json.JSONDecodeError, UnicodeDecodeError):
                if self.write:
                    self._set_aside(tail, len(raw) - len(tail))
        return records

    def _set_aside(self, fragment: bytes, keep: int) -> None:
        torn = self.path.with_name(self.path.name + ".torn")
        with open(torn, "ab") as f:
            f.write(fragment + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        self.torn = fragment.decode("utf-8", "replace")

    # -- use -------------------------------------------------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one finished unit (the key is added) and keep it in :attr:`records` exactly as a rerun will read it
        back (through JSON, keys sorted), so a report never depends on whether its records were resumed."""
        rec = json.loads(json.dumps({"key": self.key, **record}, sort_keys=True))
        if self.write:
            append_jsonl(self.path, rec)
        self.records.append(rec)
        return rec

    def find(self, **match: Any) -> dict[str, Any] | None:
        """The first record whose fields equal ``match``."""
        return next((r for r in self.records if all(r.get(k) == v for k, v in match.items())), None)

    def all(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if all(r.get(k) == v for k, v in match.items())]

    def cache_path(self, name: str, inputs: Mapping[str, Any], suffix: str) -> Path:
        """``<folder>/<name>_<key of inputs><suffix>``: a cache file that cannot be reused under other inputs."""
        return self.path.parent / f"{name}_{config_key(inputs)}{suffix}"

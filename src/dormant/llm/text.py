"""Text corpora and their cutting into fixed-length token windows (GPTQ / AWQ protocol).

WikiText-2 is read as the Hugging Face row list joined with ``"\\n\\n"`` (the usual GPTQ recipe) and
tokenised as one stream. Windows are non-overlapping and the tail shorter than a window is dropped.
When the tokenizer normally starts a text with BOS (Llama-style tokenizers), each window is
``[BOS] + seqlen-1`` text tokens, so every window looks like the start of a document to the model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dormant.artifacts import atomic_path
from dormant.data import cache_dir, resolve
from dormant.llm.configs import CORPUS_NAMES, CalibDataConfig, EvalConfig, check_calibration_text

__all__ = ["CORPORA", "EvalConfig", "CalibDataConfig", "load_text", "Windows", "make_windows", "tokenizer_adds_bos",
           "tokenize_stream", "load_eval_windows", "load_calib_windows", "calib_description"]

log = logging.getLogger(__name__)

CORPORA = {
    "wikitext2-test": "WikiText-2 raw test split",
    "wikitext2-valid": "WikiText-2 validation split",
}
assert tuple(CORPORA) == CORPUS_NAMES


def load_text(source: str, path: str | None = None) -> str:
    """Text of a corpus: a name from :data:`CORPORA` (resolved by :func:`dormant.data.resolve`) or a file path."""
    if source in CORPORA:
        p = resolve(source, path)
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"text source {source!r} is neither a known corpus ({', '.join(CORPORA)}) nor a file")
    raw = p.read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


@dataclass
class Windows:
    """``ids`` ``[n, seqlen]`` token windows; ``bos``: whether each starts with an added BOS."""

    ids: torch.Tensor
    bos: bool
    source: str
    skipped: int = 0  # windows at the start of the stream that were left out

    def describe(self) -> dict:
        n, seqlen = self.ids.shape
        return {"source": self.source, "windows": n, "seqlen": seqlen, "bos": self.bos, "skipped": self.skipped}


def make_windows(
    tokenizer,
    text: str,
    seqlen: int,
    max_windows: int | None = None,
    skip: int = 0,
    bos: str = "auto",
    source: str = "",
) -> Windows:
    """Cut ``text`` into non-overlapping ``seqlen``-token windows.

    Args:
        skip: leave out the first ``skip`` windows (e.g. those used for calibration).
        bos: ``"auto"`` (prepend BOS if the tokenizer adds one), ``"always"`` or ``"never"``.
    """
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    if bos not in ("auto", "always", "never"):
        raise ValueError("bos must be 'auto', 'always' or 'never'")
    add_bos = tokenizer_adds_bos(tokenizer) if bos == "auto" else bos == "always"
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("bos='always' but the tokenizer has no BOS token")
    stream = tokenize_stream(tokenizer, text)
    body = seqlen - 1 if add_bos else seqlen
    n = stream.numel() // body
    if n <= skip:
        raise ValueError(f"text gives {n} windows of {seqlen} tokens; cannot skip {skip}")
    stop = n if max_windows is None else min(n, skip + max_windows)
    ids = stream[skip * body : stop * body].view(-1, body)
    if add_bos:
        ids = torch.cat([torch.full((ids.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long), ids], dim=1)
    return Windows(ids, add_bos, source, skip)


_STREAMS: dict[str, torch.Tensor] = {}


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one stream (no special tokens), cached in memory and on disk.

    Tokenising WikiText-2 test takes seconds; the cache key is a hash of the text and of the fast
    tokenizer's full serialisation, so a different tokenizer or text never reuses a stale stream.
    Tokenizers without a serialisation are not cached.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    h = hashlib.sha256(text.encode())
    h.update(backend.to_str().encode())
    key = h.hexdigest()[:24]
    if key not in _STREAMS:
        path = cache_dir() / "tokens" / f"{key}.pt"
        try:
            _STREAMS[key] = torch.load(path, weights_only=True)
        except Exception:  # missing or unreadable cache entry: tokenize again
            _STREAMS[key] = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
            try:
                with atomic_path(path) as tmp:
                    torch.save(_STREAMS[key], tmp)
            except OSError:
                pass  # a read-only cache only costs time
    return _STREAMS[key]


def load_eval_windows(tokenizer, cfg: EvalConfig) -> Windows:
    """The evaluation windows of ``cfg``."""
    return make_windows(tokenizer, load_text(cfg.data), cfg.seqlen, cfg.max_windows, bos=cfg.bos, source=cfg.data)


def load_calib_windows(tokenizer, cfg: CalibDataConfig, eval_cfg: EvalConfig, eval_windows: Windows | None = None
                       ) -> Windows:
    """Calibration windows, disjoint from the evaluation text unless ``calib_on_eval``.

    With ``calib_on_eval`` (the paper's protocol) the calibration windows *are* the evaluation windows.
    """
    if cfg.calib_on_eval:
        log.warning("calibrating on the evaluation text (calib_on_eval, the paper's protocol): results are not held-out")
        return eval_windows if eval_windows is not None else load_eval_windows(tokenizer, eval_cfg)
    check_calibration_text(cfg, eval_cfg)
    return make_windows(tokenizer, load_text(cfg.calib_data), cfg.calib_seqlen, cfg.calib_windows, bos=eval_cfg.bos,
                        source=cfg.calib_data)


def calib_description(cfg: CalibDataConfig, windows: Windows) -> dict:
    """What thresholds record about their calibration text."""
    return {**windows.describe(), "calib_on_eval": cfg.calib_on_eval}

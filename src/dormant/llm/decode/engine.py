"""The lean CPU decode engine: whole-model batch-1 steps in C++, with activation sparsity that pays.

``Engine(pack_model(model, "q4_0", plan)).generate(ids, 64)``. Every token is one C call
(:class:`~dormant.kernels.decode_step.DecodeStep`): embedding row, the decoder layers, LM head, into a
logits buffer, with a static preallocated fp32 KV cache -- no per-op Python and no torch ops.

Costs, stated: :meth:`Engine.prefill` runs the prompt token by token through the same step (each
token's active sets are its own, exactly what the plan specifies), so a prompt of ``n`` tokens costs
``n`` decode steps -- it reads every weight ``n`` times where a batched dense prefill would read them
once. :meth:`Engine.step_batch` serves ``B`` independent sequences (one KV slot each) as ``B``
batch-1 steps, per-row active sets, so it costs ``B`` steps too: correct with sparsity, not faster per
token than batch 1. There is no dense fallback: a model, format or plan the engine cannot run raises
:class:`~dormant.llm.decode.weights.UnsupportedDecodeError` or ``ValueError`` naming what is supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dormant.kernels.decode_step import PROJECTIONS, TRACE_SITES, DecodeStep
from dormant.llm.decode.weights import EngineWeights, UnsupportedDecodeError

__all__ = ["Engine"]


class Engine:
    """Greedy decoding with the C step.

    Args:
        weights: from :func:`~dormant.llm.decode.weights.pack_model`, ``pack_gguf`` or ``random_weights``.
        max_seq: KV-cache positions per sequence.
        batch: independent sequences (KV slots) for :meth:`step_batch` / :meth:`generate_batch`.
        threads: threads per step (None: ``torch.get_num_threads()``, fewer for tiny models; see
            :class:`~dormant.kernels.decode_step.DecodeStep`).
        column_split: how threads share a sparse (cols) projection; see
            :class:`~dormant.kernels.decode_step.DecodeStep`.
    """

    def __init__(self, weights: EngineWeights, max_seq: int = 2048, batch: int = 1, threads: int | None = None,
                 column_split: str = "auto"):  # fmt: skip
        if weights.max_context is not None and max_seq > weights.max_context:
            raise UnsupportedDecodeError(
                f"{weights.model_type} attends within a sliding window of {weights.max_context} positions; the engine "
                f"attends to the whole cache, which is exact only for max_seq <= {weights.max_context} (got {max_seq})"
            )
        self.weights = weights
        self.max_seq, self.batch = max_seq, batch
        self.step_fn = DecodeStep(weights.decoder, max_seq, batch, threads, column_split=column_split)
        self._logits = torch.empty(weights.decoder.vocab, dtype=torch.float32)

    @property
    def vocab(self) -> int:
        return self.weights.decoder.vocab

    def reset(self) -> None:
        """Forget every sequence (zero the KV caches) and the read counters."""
        self.step_fn.reset()
        self.step_fn.counts(reset=True)

    def step(self, token: int, pos: int, slot: int = 0) -> torch.Tensor:
        """Logits ``[vocab]`` float32 after ``token`` at position ``pos`` (a fresh tensor)."""
        return self.step_fn.step(int(token), int(pos), slot)

    def prefill(self, ids: Sequence[int] | torch.Tensor, start: int = 0, slot: int = 0) -> torch.Tensor:
        """Feed ``ids`` at positions ``start, start + 1, ...`` one step each; returns the last logits ``[vocab]``."""
        ids = [int(t) for t in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise ValueError("prefill needs at least one token")
        if start + len(ids) > self.max_seq:
            raise ValueError(f"{start + len(ids)} positions exceed max_seq={self.max_seq}")
        for i, t in enumerate(ids):
            self.step_fn.step(t, start + i, slot, out=self._logits)
        return self._logits.clone()

    def generate(
        self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
    ) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (from an empty cache): the new tokens, stopping after EOS."""
        ids = [int(t) for t in (prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        if len(ids) + max_new_tokens > self.max_seq + 1:
            raise ValueError(f"prompt + new tokens ({len(ids)} + {max_new_tokens}) exceed max_seq={self.max_seq}")
        logits = self.prefill(ids)
        out: list[int] = []
        pos = len(ids)
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            out.append(tok)
            if tok == eos_token_id or len(out) == max_new_tokens:
                break
            logits = self.step_fn.step(tok, pos, 0, out=self._logits)
            pos += 1
        return out

    def step_batch(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, vocab]``: row ``b`` steps sequence ``b`` (KV slot ``b``) with ``tokens[b]`` at ``positions[b]``."""
        n = len(tokens)
        if n > self.batch:
            raise ValueError(f"{n} rows for an engine built with batch={self.batch}")
        return self.step_fn.step_batch(torch.as_tensor(tokens), torch.as_tensor(positions), torch.arange(n))

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of up to ``batch`` prompts of any lengths (each row as :meth:`generate` gives it)."""
        if len(prompts) > self.batch:
            raise ValueError(f"{len(prompts)} prompts for an engine built with batch={self.batch}")
        logits = torch.stack([self.prefill(list(p), 0, b) for b, p in enumerate(prompts)])
        pos = [len(p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            toks = logits.argmax(-1).tolist()
            for b, t in enumerate(toks):
                out[b].append(int(t))
            if step + 1 == max_new_tokens:
                break
            logits = self.step_batch(toks, pos)
            pos = [p + 1 for p in pos]
        return out

    def density(self, reset: bool = False) -> dict[str, float]:
        """Fraction of each sparse projection's input channels read per step (CATS ``up``: rows), averaged over
        layers and steps since the last reset, and ``head`` for a sparse LM head; dense ones are absent."""
        counts, head, steps = self.step_fn.counts(reset)
        if steps == 0:
            return {}
        dec = self.weights.decoder
        width = {"q": dec.dim, "k": dec.dim, "v": dec.dim, "o": dec.attn_dim, "gate": dec.dim, "up": dec.dim,
                 "down": dec.inter}  # fmt: skip
        out = {}
        for j, p in enumerate(PROJECTIONS):
            layers = [n for n, lw in enumerate(dec.layers)
                      if (lw.fused_of(p) or getattr(lw, p)).layout == "cols" or (p == "up" and lw.act)]  # fmt: skip
            if layers:
                w = dec.inter if (p == "up" and dec.layers[layers[0]].act) else width[p]
                out[p] = float(counts[layers, j].sum()) / (steps * w * len(layers))
        if dec.head_thresholds is not None:
            out["head"] = head / (steps * dec.dim)
        return out

    def trace(self, ids: Sequence[int], slot: int = 0) -> dict[str, torch.Tensor]:
        """Run ``ids`` from position 0 and record every layer's step tensors (calibration).

        Returns:
            site -> ``[len(ids), n_layers, width]`` for the sites of :data:`~dormant.kernels.decode_step.TRACE_SITES`
            (``attn_in``: input of q/k/v, ``o_in``, ``ffn_in``: input of gate/up, ``act``: ``act(gate)``, ``mid``:
            ``act(g) * u``, each before this engine's own thresholds at that tensor).
        """
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in TRACE_SITES}
        for i, t in enumerate(ids):
            tr: dict = {}
            self.step_fn.step(int(t), i, slot, out=self._logits, trace=tr)
            for k in rows:
                rows[k].append(tr[k])
        return {k: torch.stack(v) for k, v in rows.items()}

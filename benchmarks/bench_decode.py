"""End-to-end decode speed of SmolLM2-135M, dense vs sparsified (hooks) vs sparsified + sparse FFN kernel.

For each site whose 50% thresholds exist (``--thresholds-dir``/``smollm2_{site}_50.safetensors``, made by
``dormant calibrate --model smollm2-135m --site SITE --sparsity 0.5 --out ...``), the same greedy decode of
``--new-tokens`` tokens after a fixed prompt runs as

* ``dense``  -- the model as loaded;
* ``hooks``  -- :func:`~dormant.llm.sparsify.sparsify_` (thresholds by hooks: the reference; no speed-up
  expected, the hooks add work);
* ``kernel`` -- the same thresholds plus :func:`~dormant.llm.sparse_decode.enable_sparse_decode_`.

The decode loop is a plain greedy loop over ``model(token, past_key_values=cache)`` (prefill not timed),
the variants interleaved over ``--reps`` repetitions; tokens/s is one over the median step time, and the
time spent inside the FFN containers is reported too (the part the kernel can speed up: the rest of a
step -- attention, the LM head, Python -- bounds the end-to-end gain). The ``kernel`` tokens must equal
the ``hooks`` tokens. Then perplexity on ``--ppl-windows`` WikiText-2 test windows: the full-sequence
thresholded perplexity (:func:`dormant.llm.evaluate.perplexity`, dense prefill with hooks), and the
same windows decoded token by token with the KV cache through the hooks and through the kernel -- the
kernel's must equal the hooks' (it is the same computation).

Usage::

    python benchmarks/bench_decode.py --threads 2
    python benchmarks/bench_decode.py --threads 1 --dtype bfloat16 --sites gate_act

Appends one JSON line per (site, dtype) to ``--out`` with :func:`dormant.report.provenance`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dormant.artifacts import append_jsonl
from dormant.config import add_config_args, config_from_args, field
from dormant.llm.adapters import ffn_layout
from dormant.llm.configs import EvalConfig, ModelConfig
from dormant.llm.evaluate import perplexity
from dormant.llm.models import load_model
from dormant.llm.sparse_decode import (
    disable_sparse_decode_,
    enable_sparse_decode_,
    kernel_sites,
    sparse_decode_stats,
)
from dormant.llm.sparsify import measure_sparsity, sparsify_, unsparsify_
from dormant.llm.text import load_eval_windows
from dormant.llm.thresholds import Thresholds
from dormant.report import markdown_table, provenance

PROMPT = "The history of the city begins in the Middle Ages, when a small market town grew around"


@dataclass
class DecodeBenchConfig:
    model: str = field("smollm2-135m", help="model alias, HF id or path")
    dtype: str = field("float32", help="float32 | bfloat16")
    impl: str = field("cpu", help="kernel implementation (cpu | triton | reference)")
    threads: int = field(2, help="torch (and kernel) threads")
    sites: list[str] = field(default_factory=kernel_sites, help="sites to run (thresholds must exist)")
    thresholds_dir: str = field("runs/shared", help="folder with smollm2_{site}_50.safetensors")
    new_tokens: int = field(64, help="greedy tokens decoded per run")
    reps: int = field(3, help="repetitions per variant (interleaved); tokens/s is the median")
    clock: str = field(
        "wall", help="wall | cpu (process CPU time: leaves out descheduled time on a shared machine)"
    )
    ppl_windows: int = field(2, help="WikiText-2 test windows for the perplexity check (0 = skip)")
    ppl_seqlen: int = field(128, help="tokens per perplexity window")
    out: str = field("runs/bench/decode.jsonl", help="JSONL file the results are appended to")


class FFNTimer:
    """Time (read from ``clock``) spent inside the FFN containers per decode step, by pre/post hooks on
    the containers, which neither the dense path nor the kernel path treats specially."""

    def __init__(self, model, clock=time.perf_counter):
        self.clock = clock
        self.current = 0.0
        self._t0 = 0.0
        self.handles = []
        for ffn in ffn_layout(model).ffns:
            self.handles.append(ffn.register_forward_pre_hook(self._start))
            self.handles.append(ffn.register_forward_hook(self._stop))

    def _start(self, module, args):
        self._t0 = self.clock()

    def _stop(self, module, args, out):
        self.current += self.clock() - self._t0

    def take(self) -> float:
        t, self.current = self.current, 0.0
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def greedy(
    model, ids: torch.Tensor, n: int, clock=time.perf_counter
) -> tuple[torch.Tensor, list[float], list[float]]:
    """Greedy-decode ``n`` tokens after ``ids`` ``[1, s]``.

    Returns the tokens ``[1, n]`` and, per decode step (prefill excluded), its seconds and the seconds
    spent inside the FFNs, both read from ``clock``.
    """
    timer = FFNTimer(model, clock)
    out = model(ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    tokens, step_s, ffn_s = [token], [], []
    timer.take()
    for _ in range(n - 1):
        t0 = clock()
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step_s.append(clock() - t0)
        ffn_s.append(timer.take())
        tokens.append(token)
    timer.remove()
    return torch.cat(tokens, dim=1), step_s, ffn_s


@torch.inference_mode()
def stepwise_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL of ``windows`` fed one token at a time with the KV cache (every step is decode)."""
    nll = []
    for w in windows:
        out = model(w[None, :1], use_cache=True)
        logits = [out.logits[0, -1]]
        for t in range(1, len(w) - 1):
            out = model(w[None, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
        nll.append(F.cross_entropy(torch.stack(logits).float(), w[1:]).item())
    return sum(nll) / len(nll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, DecodeBenchConfig)
    cfg = config_from_args(DecodeBenchConfig, parser.parse_args(argv))
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")  # cache= is 5.x-only
    torch.set_num_threads(cfg.threads)
    clock = {"wall": time.perf_counter, "cpu": time.process_time}[cfg.clock]
    model, tok, info = load_model(
        ModelConfig(model=cfg.model, device="cpu" if cfg.impl != "triton" else "auto", dtype=cfg.dtype)
    )
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    windows = None
    if cfg.ppl_windows:
        windows = load_eval_windows(tok, EvalConfig(seqlen=cfg.ppl_seqlen, max_windows=cfg.ppl_windows)).ids
    prov = provenance()
    rows = []
    for site in cfg.sites:
        path = Path(cfg.thresholds_dir) / f"smollm2_{site}_50.safetensors"
        if not path.exists():
            print(
                f"skipping site {site}: {path} not found (calibrate it with `dormant calibrate --site {site}`)",
                flush=True,
            )
            continue
        thr = Thresholds.load(path)
        steps: dict[str, list[float]] = {"dense": [], "hooks": [], "kernel": []}
        ffns: dict[str, list[float]] = {k: [] for k in steps}
        tokens = {}
        for r in range(cfg.reps):
            for variant in list(steps)[r % 3 :] + list(steps)[: r % 3]:
                if variant != "dense":
                    sparsify_(model, thr, model_id=cfg.model)
                if variant == "kernel":
                    enable_sparse_decode_(model, impl=cfg.impl)
                toks, step_s, ffn_s = greedy(model, ids, cfg.new_tokens, clock)
                if variant == "kernel":
                    stats = sparse_decode_stats(model)
                    disable_sparse_decode_(model)
                unsparsify_(model)
                steps[variant] += step_s
                ffns[variant] += ffn_s
                tokens[variant] = toks
        # Medians over all decode steps of all repetitions: robust to preemption on a shared machine.
        step_ms = {k: 1e3 * statistics.median(v) for k, v in steps.items()}
        ffn_ms = {k: 1e3 * statistics.median(v) for k, v in ffns.items()}
        tps = {k: 1e3 / v for k, v in step_ms.items()}
        row = {
            "site": site, "dtype": cfg.dtype, "threads": cfg.threads, "impl": cfg.impl, "new_tokens": cfg.new_tokens, "clock": cfg.clock,
            "reps": cfg.reps, "tokens_per_s": tps, "step_ms": step_ms, "ffn_ms_per_token": ffn_ms,
            "speedup_vs_dense": tps["kernel"] / tps["dense"], "speedup_vs_hooks": tps["kernel"] / tps["hooks"],
            "ffn_speedup_vs_dense": ffn_ms["dense"] / ffn_ms["kernel"], "ffn_share_dense": ffn_ms["dense"] / step_ms["dense"],
            "tokens_equal_hooks": bool(torch.equal(tokens["kernel"], tokens["hooks"])), "kernel_calls": stats,
            "thresholds": str(path), "mean_target": float(thr.targets.mean()),
        }  # fmt: skip
        sparsify_(model, thr, model_id=cfg.model)
        with measure_sparsity(model, thr.taps) as meter:
            greedy(model, ids, cfg.new_tokens)
        row["neuron_sparsity"] = meter.summary()["neuron"]
        if windows is not None:
            full = perplexity(model, windows, progress=False)
            hooks_nll = stepwise_nll(model, windows)
            enable_sparse_decode_(model, impl=cfg.impl)
            kernel_nll = stepwise_nll(model, windows)
            disable_sparse_decode_(model)
            row.update({
                "ppl_full_sequence": full.ppl, "ppl_stepwise_hooks": math.exp(hooks_nll), "ppl_stepwise_kernel": math.exp(kernel_nll),
                "nll_abs_diff_kernel_vs_hooks": abs(kernel_nll - hooks_nll), "ppl_windows": list(windows.shape),
            })  # fmt: skip
        unsparsify_(model)
        append_jsonl(cfg.out, {**row, "model": info, "config": asdict(cfg), "provenance": prov})
        rows.append(row)
        print(f"done {site}: {row}", flush=True)
    print(
        f"\n{prov['processor']}, {prov['cpu_count']} CPUs, torch {prov['torch']}, threads {cfg.threads}, {cfg.dtype}, {cfg.clock} clock\n"
    )
    headers = ["site", "neuron sparsity", "dense tok/s", "hooks tok/s", "kernel tok/s", "x dense", "FFN ms dense",
               "FFN ms kernel", "FFN x", "tokens = hooks", "ppl full", "ppl step hooks", "ppl step kernel"]  # fmt: skip
    print(markdown_table(headers, [
        [r["site"], r["neuron_sparsity"], r["tokens_per_s"]["dense"], r["tokens_per_s"]["hooks"], r["tokens_per_s"]["kernel"],
         r["speedup_vs_dense"], r["ffn_ms_per_token"]["dense"], r["ffn_ms_per_token"]["kernel"], r["ffn_speedup_vs_dense"],
         r["tokens_equal_hooks"], r.get("ppl_full_sequence", "-"), r.get("ppl_stepwise_hooks", "-"),
         r.get("ppl_stepwise_kernel", "-")] for r in rows
    ], digits=3))  # fmt: skip


if __name__ == "__main__":
    main()

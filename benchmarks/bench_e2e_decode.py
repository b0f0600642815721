"""Whole-model batch-1 decode speed: the lean engine (dense, sparse) vs Hugging Face eager vs llama.cpp.

Variants of one model run interleaved in one process over ``--reps`` repetitions (rotated order);
each repetition resets the KV cache, feeds a fixed prompt (prefill, not timed) and decodes
``--new-tokens`` greedy tokens one step at a time; tokens/s is one over the median step time (step =
one model call + argmax). Thread counts (``--threads``) run one after the other.

* SmolLM2-135M-Instruct (real weights): HF eager fp32 (``model(token, past_key_values=cache)``);
  engine fp32 / bf16 / q8_0 / q4_0 (from the HF model); engine ``gguf``-native on the shipped Q4_1
  file and on Q4_0 / Q8_0 requantisations made with ``llama_cpp.llama_model_quantize`` (under
  ``--gguf-dir``); llama.cpp on the same three files (``Llama.eval`` of one token, logits read from the
  context); engine sparse at each ``--targets`` sparsity for the ``intermediate`` site (one ``mid``
  threshold per layer) and the ``inputs`` site (TEAL-like: per projection, all 7 linears, one
  threshold at the target quantile of ``|x|``), calibrated on ``--calib-tokens`` WikiText-2
  validation tokens with the dense fp32 engine's trace, and at the plans of ``--thresholds`` artifacts
  calibrated by the library (any site with an engine path, e.g. a sweep's TEAL-greedy or dormant points),
  run on the Q4_0 / Q8_0 files (projections the
  plan sparsifies re-packed column-major in the file's format). The density each projection actually
  had during the timed decode is reported beside each point.
* Llama-3.2-1B and Llama-3-8B shapes with random weights (speed does not depend on values): dense and
  sparse in ``--random-formats``, thresholds calibrated the same way on the random model's own trace
  so each layer's density is set to the target. Llama-3-8B runs ``--layers-8b`` of its 32 layers (the
  engines of all variants must fit in memory together); its table shows the measured tokens/s of that
  truncated model and an estimate for 32 layers from the per-phase profile (head + 32/L x layers).

A profiling pass (per-phase wall time of thread 0, :data:`dormant.kernels.decode_step.PHASES`) after
the timed runs says where each engine's time goes. Multi-thread numbers need otherwise idle cores: a
step has ~8 barriers per layer (llama.cpp's graph has its own), and a descheduled thread turns each
into a wait of a scheduler time slice. Never a test: results go to ``--out`` as JSON
lines with :func:`dormant.report.provenance`, and a markdown table per model and thread count.

Usage::

    python benchmarks/bench_e2e_decode.py --threads 1,2
    python benchmarks/bench_e2e_decode.py --models smollm2-135m --threads 2 --reps 5 --no-llamacpp
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dormant.artifacts import append_jsonl
from dormant.config import add_config_args, config_from_args, field
from dormant.kernels.decode_step import PHASES
from dormant.llm.decode import Engine, LayerPlan, SparsityPlan, pack_gguf, pack_model, random_weights
from dormant.report import markdown_table, provenance

PROMPT = "The history of the city begins in the Middle Ages, when a small market town grew around"
# Input tensor traced by Engine.trace for each projection (the inputs site) and for mid.
SITE_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "ffn_in", "up": "ffn_in", "down": "mid"}
RANDOM_CONFIGS = {
    # public shapes of meta-llama/Llama-3.2-1B and Meta-Llama-3-8B (config.json), built without a download
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}  # fmt: skip


@dataclass
class E2EBenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "llama-3.2-1b", "llama-3-8b"],
                              help="smollm2-135m, llama-3.2-1b, llama-3-8b")  # fmt: skip
    threads: list[int] = field(default_factory=lambda: [1, 2], help="thread counts, run one after the other")
    new_tokens: int = field(32, help="greedy tokens decoded per repetition (prefill not timed)")
    reps: int = field(3, help="repetitions per variant, interleaved; tokens/s from the median step")
    targets: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5], help="target sparsities")
    sites: list[str] = field(default_factory=lambda: ["intermediate", "inputs"], help="intermediate (mid), inputs (7 linears)")
    calib_tokens: int = field(128, help="WikiText-2 validation tokens traced for the thresholds")
    thresholds: list[str] = field(default_factory=list, help="SmolLM2 Thresholds artifacts (dormant calibrate, "
                                  "dormant sweep) also run sparse, as dormant.llm.decode.from_thresholds maps them")
    sparse_files: list[str] = field(default_factory=lambda: ["Q4_0", "Q8_0"], help="SmolLM2 GGUF files sparse variants run on")
    random_formats: list[str] = field(default_factory=lambda: ["q4_0", "q8_0"], help="formats of the random-weight models")
    random_sparse_formats: list[str] = field(default_factory=lambda: ["q4_0"], help="random-model formats with sparse variants")
    layers_8b: int = field(8, help="decoder layers of the Llama-3-8B run (of 32)")
    random_calib_rounds: int = field(1, help="re-calibration rounds under the plan for the random-weight models")
    gguf_dir: str = field("runs/gguf", help="where the Q4_0 / Q8_0 requantisations of SmolLM2 are made / found")
    llamacpp: bool = field(True, help="run llama.cpp (pip install dormant[bench])")
    hf: bool = field(True, help="run the Hugging Face eager fp32 baseline")
    only: str | None = field(None, help="regular expression: time only the variants whose name it matches (a quick "
                             "A/B; include the dense and llama.cpp variants the ratios divide by)")
    out: str = field("runs/bench/e2e_decode.jsonl", help="JSONL file results are appended to")


# Variants: prefill (untimed) and one timed greedy step ------------------------------------------

class EngineVariant:
    def __init__(self, engine: Engine, meta: dict):
        self.engine, self.meta, self.pos = engine, meta, 0

    def prefill(self, ids: list[int]) -> int:
        self.engine.reset()
        self.pos = len(ids)
        return int(self.engine.prefill(ids).argmax())

    def step(self, token: int) -> int:
        logits = self.engine.step(token, self.pos)
        self.pos += 1
        return int(logits.argmax())


class HFVariant:
    def __init__(self, model, meta: dict):
        self.model, self.meta, self.past = model, meta, None

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> int:
        out = self.model(torch.tensor([ids]), use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(self, token: int) -> int:
        out = self.model(torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())


class LlamaCppVariant:
    def __init__(self, path: Path, threads: int, n_ctx: int, meta: dict):
        import llama_cpp
        import numpy as np

        self.np = np
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
        self.meta, self.vocab = meta, self.llm.n_vocab()

    def _argmax(self) -> int:
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(logits.argmax())

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._argmax()


def run_interleaved(variants: dict, prompt: list[int], new_tokens: int, reps: int) -> dict[str, dict]:
    """Per variant: step seconds of every repetition, the tokens of the last one, engine densities."""
    res = {k: {"steps": [], "tokens": None, "density": []} for k in variants}
    names = list(variants)
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            v = variants[k]
            tok = v.prefill(prompt)
            if isinstance(v, EngineVariant):
                v.engine.density(reset=True)
            toks = [tok]
            for _ in range(new_tokens - 1):
                t0 = time.perf_counter()
                tok = v.step(tok)
                res[k]["steps"].append(time.perf_counter() - t0)
                toks.append(tok)
            res[k]["tokens"] = toks
            if isinstance(v, EngineVariant):
                res[k]["density"].append(v.engine.density())
    return res


def profile(v: EngineVariant, prompt: list[int], steps: int = 8) -> dict[str, float]:
    """Milliseconds per token in each phase (thread 0, barrier waits included)."""
    tok = v.prefill(prompt)
    v.engine.step_fn.profile(True, True)
    for _ in range(steps):
        tok = v.step(tok)
    ph = v.engine.step_fn.profile(False, True)
    return {p: 1e3 * s / steps for p, s in ph.items()}


# Calibration ------------------------------------------------------------------------------------

def plans_from_trace(trace: dict[str, torch.Tensor], targets: list[float], sites: list[str]) -> dict[str, SparsityPlan]:
    """``{f"{site}{target}": plan}``: per layer, thresholds at the ``target`` quantile of the traced ``|x|``."""
    n_layers = trace["attn_in"].shape[1]

    def q(name: str, n: int, t: float) -> float:
        v = trace[name][:, n].abs().reshape(-1).float()
        if v.numel() > 1 << 24:
            v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
        return float(torch.quantile(v, t))

    plans = {}
    for t in targets:
        for site in sites:
            if site == "intermediate":
                layers = [LayerPlan(mid=q("mid", n, t)) for n in range(n_layers)]
            elif site == "inputs":
                layers = [LayerPlan({p: torch.full((trace[s].shape[-1],), q(s, n, t)) for p, s in SITE_OF.items()})
                          for n in range(n_layers)]  # fmt: skip
            else:
                raise ValueError(f"unknown site {site!r}; sites: intermediate, inputs")
            plans[f"{site}{t:g}"] = SparsityPlan(layers, {"site": site, "target": t, "calibration": "engine trace"})
    return plans


def mean_density(densities: list[dict[str, float]]) -> dict[str, float]:
    if not densities or not densities[0]:
        return {}
    return {p: statistics.mean(d[p] for d in densities) for p in densities[0]}


# Models -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs from C to fd 2; silence it while quantising."""
    fd = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def smollm2_files(src: Path, gguf_dir: Path) -> dict[str, Path]:
    """The shipped Q4_1 file and its Q4_0 / Q8_0 requantisations (made once with llama.cpp)."""
    files = {"Q4_1": src}
    for name in ("Q4_0", "Q8_0"):
        dst = gguf_dir / src.name.replace("Q4_1", name)
        if not dst.exists():
            import ctypes

            import llama_cpp

            dst.parent.mkdir(parents=True, exist_ok=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.allow_requantize = True
            with quiet_stderr():
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({name}) failed with {rc}")
        files[name] = dst
    return files


def smollm2_variants(cfg: E2EBenchConfig, threads: int, prompt: list[int], cache: dict) -> dict:
    from dormant.llm.models import _smollm2_gguf, load_model
    from dormant.llm.text import load_text, make_windows

    if "hf" not in cache:
        model, tok, _ = load_model("smollm2-135m")
        files = smollm2_files(_smollm2_gguf(), Path(cfg.gguf_dir))
        calib_engine = Engine(pack_model(model, "fp32", positions=1024), max_seq=1024)
        text = make_windows(tok, load_text("wikitext2-valid"), cfg.calib_tokens, max_windows=1, source="wikitext2-valid")
        trace = calib_engine.trace(text.ids[0].tolist())
        plans = plans_from_trace(trace, cfg.targets, cfg.sites)
        if cfg.thresholds:
            from dormant.llm.adapters import ffn_layout
            from dormant.llm.decode.from_thresholds import plan_from_thresholds
            from dormant.llm.thresholds import Thresholds

            for path in cfg.thresholds:
                plans[Path(path).stem] = plan_from_thresholds(Thresholds.load(path), ffn_layout(model))
        cache.update(hf=model, files=files, plans=plans, engines={})
        cache["engines"]["engine fp32"] = (calib_engine, {"fmt": "fp32", "source": "hf"})
        for fmt in ("bf16", "q8_0", "q4_0"):
            cache["engines"][f"engine {fmt}"] = (Engine(pack_model(model, fmt, positions=1024), 1024),
                                                 {"fmt": fmt, "source": "hf"})  # fmt: skip
        for name, path in files.items():
            cache["engines"][f"engine gguf {name}"] = (Engine(pack_gguf(path, positions=1024), 1024),
                                                       {"fmt": "gguf", "file": name})  # fmt: skip
        for name in cfg.sparse_files:
            for pname, plan in cache["plans"].items():
                w = pack_gguf(files[name], plan=plan, positions=1024)
                cache["engines"][f"sparse {pname} {name}"] = (Engine(w, 1024), {"fmt": "gguf", "file": name, **plan.meta})
    variants = {}
    if cfg.hf:
        variants["hf eager fp32"] = HFVariant(cache["hf"], {"fmt": "fp32", "impl": "hf"})
    for k, (e, meta) in cache["engines"].items():
        variants[k] = EngineVariant(e, {**meta, "impl": "dormant"})
    if cfg.llamacpp:
        for name, path in cache["files"].items():
            variants[f"llama.cpp {name}"] = LlamaCppVariant(path, threads, 1024, {"file": name, "impl": "llama.cpp"})
    return variants


def random_variants(cfg: E2EBenchConfig, name: str, fmt: str, prompt: list[int]) -> dict:
    """Dense and (if ``fmt`` is in ``--random-sparse-formats``) sparse engines of one random model and format."""
    from transformers import LlamaConfig

    config = LlamaConfig(**RANDOM_CONFIGS[name])
    n_layers = cfg.layers_8b if name == "llama-3-8b" else None
    gen = torch.Generator().manual_seed(0)
    calib = prompt + torch.randint(0, config.vocab_size, (min(cfg.calib_tokens, 64),), generator=gen).tolist()
    def build(plan=None) -> Engine:  # the same seed: the same random weights, laid out for ``plan``
        return Engine(random_weights(config, fmt, plan=plan, n_layers=n_layers, positions=512), 512)

    dense = build()
    variants = {f"engine {fmt}": EngineVariant(dense, {"fmt": fmt, "impl": "dormant", "source": "random"})}
    if fmt in cfg.random_sparse_formats:
        dense_trace = dense.trace(calib)
        for t in cfg.targets:
            for site in cfg.sites:
                # Random weights have no redundancy: thresholds from the dense trace leave later projections far
                # sparser than the target once earlier ones are sparse. Re-trace under the plan (the trace records
                # each input after the upstream thresholds) until every layer's density sits at the target.
                plan = plans_from_trace(dense_trace, [t], [site])[f"{site}{t:g}"]
                for _ in range(cfg.random_calib_rounds):
                    plan = plans_from_trace(build(plan).trace(calib), [t], [site])[f"{site}{t:g}"]
                plan.meta["calibration"] = f"engine trace under the plan, {cfg.random_calib_rounds} rounds"
                variants[f"sparse {site}{t:g} {fmt}"] = EngineVariant(
                    build(plan), {"fmt": fmt, "impl": "dormant", "source": "random", **plan.meta}
                )
    return variants


# Report -----------------------------------------------------------------------------------------

def summarize(name: str, threads: int, variants: dict, res: dict, prompt: list[int], cfg: E2EBenchConfig,
              prov: dict) -> list[dict]:  # fmt: skip
    rows = []
    med = {k: statistics.median(r["steps"]) for k, r in res.items()}
    ref_tokens = res.get("hf eager fp32", res.get("engine fp32", {})).get("tokens")
    for k, v in variants.items():
        meta = dict(v.meta)
        row = {"model": name, "variant": k, "threads": threads, **meta, "tokens_per_s": 1.0 / med[k],
               "step_ms_median": 1e3 * med[k],
               "step_ms_p10_p90": [1e3 * q for q in statistics.quantiles(res[k]["steps"], n=10)[::8]],
               "density": mean_density(res[k]["density"])}  # fmt: skip
        if row["density"]:
            row["density_mean"] = statistics.mean(row["density"].values())
        # the dense engine of the same weights: gguf file or format
        if meta.get("impl") == "dormant" and "site" in meta:
            base = f"engine gguf {meta['file']}" if "file" in meta else f"engine {meta['fmt']}"
            row["speedup_vs_dense_same_format"] = med[base] / med[k]
            if f"llama.cpp {meta.get('file')}" in med:
                row["speedup_vs_llamacpp_same_file"] = med[f"llama.cpp {meta['file']}"] / med[k]
        if k.startswith("engine gguf") and f"llama.cpp {meta['file']}" in med:
            row["speedup_vs_llamacpp_same_file"] = med[f"llama.cpp {meta['file']}"] / med[k]
        if ref_tokens is not None:
            row["greedy_match_vs_fp32"] = sum(a == b for a, b in zip(res[k]["tokens"], ref_tokens)) / len(ref_tokens)
        if isinstance(v, EngineVariant):
            row["phases_ms"] = profile(v, prompt)
            row["weight_mb"] = v.engine.weights.decoder.nbytes() / 2**20
            if name == "llama-3-8b":
                ph = row["phases_ms"]
                layers = sum(ph[p] for p in PHASES if p != "head")
                scale = (ph["head"] + layers * 32 / cfg.layers_8b) / (ph["head"] + layers)
                row["estimated_32_layer_tokens_per_s"] = row["tokens_per_s"] / scale
                row["layers_run"] = cfg.layers_8b
        rows.append(row)
        append_jsonl(cfg.out, {**row, "config": asdict(cfg), "provenance": prov})
    return rows


def print_table(name: str, threads: int, rows: list[dict]) -> None:
    est = name.startswith("llama-3-8b")
    headers = ["variant", "tok/s", "step ms", "x dense (same fmt)", "x llama.cpp (same file)", "density (mean; per proj)",
               "greedy = fp32"] + (["est. tok/s 32 layers"] if est else [])  # fmt: skip
    table = []
    for r in rows:
        dens = r.get("density") or {}
        dens_s = "-" if not dens else f"{r['density_mean']:.2f}; " + " ".join(f"{p}={d:.2f}" for p, d in dens.items())
        table.append([r["variant"], r["tokens_per_s"], r["step_ms_median"], r.get("speedup_vs_dense_same_format", "-"),
                      r.get("speedup_vs_llamacpp_same_file", "-"), dens_s, r.get("greedy_match_vs_fp32", "-")]
                     + ([r.get("estimated_32_layer_tokens_per_s", "-")] if est else []))  # fmt: skip
    print(f"\n### {name}, {threads} thread(s)\n")
    print(markdown_table(headers, table, digits=2))
    phased = [r for r in rows if "phases_ms" in r]
    if phased:
        print(markdown_table(["variant", *PHASES], [[r["variant"], *[r["phases_ms"][p] for p in PHASES]] for r in phased],
                             digits=3))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_args(parser, E2EBenchConfig)
    cfg = config_from_args(E2EBenchConfig, parser.parse_args(argv))
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    from transformers import AutoTokenizer

    from dormant.llm.models import _smollm2_gguf

    gg = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gg.parent), gguf_file=gg.name, local_files_only=True)
    prompt = tok(PROMPT).input_ids
    prov = provenance()
    print(f"{prov['processor']}, {prov['cpu_count']} CPUs, torch {prov['torch']}, commit {prov.get('commit')}", flush=True)
    for name in cfg.models:
        if name not in ("smollm2-135m", *RANDOM_CONFIGS):
            raise ValueError(f"unknown model {name!r}; models: smollm2-135m, {', '.join(RANDOM_CONFIGS)}")
    smol_cache: dict = {}
    for name in cfg.models:
        # random models: one format group (dense + its sparse variants) in memory at a time
        groups = [None] if name == "smollm2-135m" else cfg.random_formats
        for fmt in groups:
            random_group = None if fmt is None else random_variants(cfg, name, fmt, prompt)
            for threads in cfg.threads:
                torch.set_num_threads(threads)
                variants = smollm2_variants(cfg, threads, prompt, smol_cache) if fmt is None else random_group
                if cfg.only:
                    variants = {k: v for k, v in variants.items() if re.search(cfg.only, k)}
                res = run_interleaved(variants, prompt, cfg.new_tokens, cfg.reps)
                rows = summarize(name, threads, variants, res, prompt, cfg, {**prov, "torch_threads": threads})
                print_table(name if fmt is None else f"{name} {fmt}", threads, rows)
                for v in variants.values():
                    if isinstance(v, LlamaCppVariant):
                        v.llm.close()
            del random_group
        smol_cache.clear()


if __name__ == "__main__":
    main()

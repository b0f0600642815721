"""Wall time of each saved predictor per decode token, next to the dense FFN layer it guards.

The predictor cost in the reports is counted (bytes read, FLOPs per token); this script measures it.
For batch 1 (one decode token) and a small prefill batch, it times, interleaved and in one process,
(a) one dense SwiGLU FFN layer of the model's shape (float32, random weights: only shapes matter) and
(b) each predictor's ``features`` + ``scores`` + threshold for every layer it predicts, divided by the
number of layers, and reports the median ratio. Results are appended to a JSONL file with provenance.

    python benchmarks/bench_predictors.py runs/predictors/smollm2/*.safetensors --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictors", nargs="+", help="saved predictors (.safetensors)")
    ap.add_argument("--tokens", default="1,64", help="tokens per call (comma-separated)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="runs/bench/predictors.jsonl")
    args = ap.parse_args()

    from dormant.artifacts import append_jsonl
    from dormant.llm.adapters import Tap
    from dormant.llm.predictors import load_predictor
    from dormant.report import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preds = {Path(p).name.removesuffix(".safetensors"): load_predictor(p) for p in args.predictors}
    first = next(iter(preds.values()))
    d, i, n_layers = first.hidden_size, first.n_neurons, first.n_layers
    wg, wu, wd = torch.randn(i, d) / d**0.5, torch.randn(i, d) / d**0.5, torch.randn(d, i) / i**0.5
    for n_tok in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n_tok, d)
        with torch.inference_mode():
            ffn = _median_time(lambda x=x: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd), args.repeats)
            for name, p in preds.items():
                srcs = {s: (torch.randn(n_tok, d) if s[1] is Tap.FFN_IN else torch.rand(n_tok, i) < 0.5)
                        for s in p.sources()}

                def run(p=p, srcs=srcs):
                    feats = {s: p.features(s[0], s[1], v) for s, v in srcs.items()}
                    for layer in p.predicted_layers():
                        p.predict(layer, feats[p.source(layer)])

                per_layer = _median_time(run, args.repeats) / n_layers
                rec = {"predictor": name, "tokens": n_tok, "ffn_layer_s": ffn, "predictor_per_layer_s": per_layer,
                       "ratio": per_layer / ffn, "cost": p.cost().summary(), "provenance": provenance()}
                append_jsonl(args.out, rec)
                print(json.dumps({k: rec[k] for k in ("predictor", "tokens", "ffn_layer_s", "predictor_per_layer_s",
                                                      "ratio")}))


if __name__ == "__main__":
    main()

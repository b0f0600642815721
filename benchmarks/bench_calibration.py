"""Calibration cost relative to a dense forward over the same tokens (target: <= 1.3x).

Calibration is one streaming pass: a dense forward plus, at each hooked tap, one shift and one
``bincount`` per tensor (``dormant.llm.stats``), then whatever the method's score and allocation add (CHESS's
``E|up|`` over two windows, the loss allocation's probe passes, TEAL's greedy replays). This script times, in one
process and interleaved (dense, method 1, method 2, dense, ...), a plain dense forward and the whole
``calibrate()`` of each method (``dormant.llm.configs.METHODS`` names or ``site:score:allocation``) over the same
windows, and reports the median ratio. Results are appended to a JSONL file with provenance.

    python benchmarks/bench_calibration.py --model smollm2-135m --windows 4 --seqlen 2048 --repeats 3 \
        --methods paper,intermediate,teal,wina,chess,dormant
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="paper,intermediate,teal,wina,chess,dormant")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="runs/bench/calibration.jsonl")
    args = ap.parse_args()

    from dormant.artifacts import append_jsonl
    from dormant.llm.calibration import calibrate
    from dormant.llm.configs import CalibrationConfig, parse_method
    from dormant.llm.models import load_model
    from dormant.llm.text import load_text, make_windows
    from dormant.report import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model)
    ids = make_windows(tok, load_text("wikitext2-valid"), args.seqlen, args.windows).ids
    methods = {name: (site, score, alloc) for name, site, score, alloc in map(parse_method, args.methods.split(","))}
    sites = list(methods)

    def dense() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(len(ids)):
                model(ids[i : i + 1], use_cache=False)
        return time.perf_counter() - t0

    def calib(name: str) -> float:
        site, score, allocation = methods[name]
        t0 = time.perf_counter()
        calibrate(model, ids, CalibrationConfig(site, [args.target], score=score, allocation=allocation,
                                                progress=False))
        return time.perf_counter() - t0

    dense()  # warm-up
    times: dict[str, list[float]] = {"dense": [], **{s: [] for s in sites}}
    for _ in range(args.repeats):
        times["dense"].append(dense())
        for s in sites:
            times[s].append(calib(s))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "calibration_vs_dense_forward",
        "model": info["id"],
        "tokens": int(ids.numel()),
        "seconds_median": med,
        "ratio_vs_dense": {s: med[s] / med["dense"] for s in sites},
        "methods": {k: ":".join(v) for k, v in methods.items()},
        "target": args.target,
        "repeats": args.repeats,
        **provenance(),
    }
    append_jsonl(args.out, result)
    print(f"{info['id']}: {ids.numel()} tokens, {result['torch_threads']} threads, {result['processor']}")
    print(f"  dense forward      {med['dense']:.2f} s")
    for s in sites:
        print(f"  calibrate {s:<14} {med[s]:7.2f} s  = {med[s] / med['dense']:.3f} x dense   ({':'.join(methods[s])})")
    print(json.dumps(result["ratio_vs_dense"]))


if __name__ == "__main__":
    main()

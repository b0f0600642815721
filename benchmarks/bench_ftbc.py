"""FTBC calibration cost: cached (one ANN + one SNN forward per batch) vs straightforward (re-forward per layer).

Both implementations run the same update on the same batches of a converted CIFAR ResNet; the script checks the
biases are identical (bit for bit), reports wall times and their ratio, and checks that calibrating at T/2 gives
the first T/2 steps of the calibration at T (causality, so one calibration serves every smaller T). Results are
appended to a JSONL file with machine, versions and commit.

    python benchmarks/bench_ftbc.py --model resnet20 --T 32 --images 50 --threads 2

FTBC: Wu et al., ECCV 2024, arXiv 2403.18388.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from dormant.artifacts import append_jsonl
from dormant.report import markdown_table, provenance
from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.datasets import load_dataset, split_holdout
from dormant.snn.ftbc import FTBCConfig, calibrate_ftbc
from dormant.snn.models import load_zoo_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--images", type=int, default=50, help="calibration images (batches of --batch-size)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench/ftbc.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    model, spec = load_zoo_model(args.model)
    calib, _ = split_holdout(load_dataset(spec.default_data, "train"), 1000)
    x, _ = calib.tensors(spec.mean, spec.std)
    snn = convert(model, x[:1000], ConvertConfig(), device=dev)
    xb = x[1000 : 1000 + args.images]
    cfg = FTBCConfig(passes=args.passes, batch_size=args.batch_size, select="last")
    # warm-up (allocator, oneDNN primitive caches)
    calibrate_ftbc(snn, xb[:4], 2, FTBCConfig(passes=1, batch_size=4, select="last"))

    res = {}
    for impl in ("cached", "reforward"):
        c = FTBCConfig(**{**asdict(cfg), "implementation": impl})
        start = time.perf_counter()
        res[impl] = calibrate_ftbc(snn, xb, args.T, c)
        res[impl].wall = time.perf_counter() - start
    identical = all(
        torch.equal(b, res["reforward"].snapshots[-1][name])
        for name, b in res["cached"].snapshots[-1].items()
    )
    max_diff = max(
        float((b - res["reforward"].snapshots[-1][name]).abs().max())
        for name, b in res["cached"].snapshots[-1].items()
    )
    half = calibrate_ftbc(snn, xb, args.T // 2, cfg)
    causal_diff = max(
        float((b - res["cached"].snapshots[-1][name][: args.T // 2]).abs().max())
        for name, b in half.snapshots[-1].items()
    )

    rec = {
        "bench": "ftbc_calibration",
        "model": args.model,
        "T": args.T,
        "images": len(xb),
        "batch_size": args.batch_size,
        "passes": args.passes,
        "neuron_layers": len(snn.neurons),
        "device": str(dev),
        "seconds_cached": res["cached"].seconds,
        "seconds_reforward": res["reforward"].seconds,
        "speedup": res["reforward"].seconds / res["cached"].seconds,
        "identical_biases": identical,
        "max_abs_bias_difference": max_diff,
        "causal_max_abs_difference_T_half": causal_diff,
        **provenance(),
    }
    append_jsonl(args.out, rec)
    print(
        markdown_table(
            [
                "model",
                "T",
                "images",
                "layers",
                "cached s",
                "re-forward s",
                "speed-up",
                "identical",
                "T/2 prefix diff",
            ],
            [
                [
                    args.model,
                    args.T,
                    len(xb),
                    len(snn.neurons),
                    round(rec["seconds_cached"], 2),
                    round(rec["seconds_reforward"], 2),
                    round(rec["speedup"], 2),
                    identical,
                    causal_diff,
                ]
            ],
        )
    )
    print(
        json.dumps({k: rec[k] for k in ("speedup", "identical_biases", "causal_max_abs_difference_T_half")})
    )


if __name__ == "__main__":
    main()

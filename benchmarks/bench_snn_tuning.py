"""Choose conversion and FTBC settings on held-out *training* images (never test images).

Splits the model's training data into calibration and held-out parts (as ``dormant snn sweep`` does), then for every
threshold setting (``--thresholds threshold:percentile:granularity[:scale],...``; ``ltb:<step>:granularity`` for local
threshold balancing) and every FTBC setting
(``--ftbc calib_images:alpha:passes:batch_size,...``; ``0`` calibration images = plain conversion) reports the
held-out accuracy after each step of ``--T``. The held-out images are split in two: FTBC's pass per step is chosen
on the first half (as the sweep chooses it on its own held-out split) and the accuracy of that chosen pass is
scored on the second half, so no reported number comes from the images that chose it. FTBC is causal, so settings
chosen at T = 16 are the first 16 steps of a calibration at any larger T. Results are appended to a JSONL file with
machine and versions. The settings this table selects are then the defaults of ``ConvertConfig`` (held-out
training images only; test images are never read here).

    python benchmarks/bench_snn_tuning.py --model resnet20 --T 16 --holdout 500 \\
        --thresholds percentile:99:channel --ftbc 0:0:0:50,300:0.5:3:50,1000:0.5:3:50 --threads 1

FTBC: Wu et al., ECCV 2024, arXiv 2403.18388.
"""

from __future__ import annotations

import argparse
import time

import torch

from dormant.artifacts import append_jsonl
from dormant.report import markdown_table, provenance
from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.datasets import load_dataset, split_holdout
from dormant.snn.ftbc import FTBCConfig, calibrate_ftbc
from dormant.snn.models import load_zoo_model
from dormant.snn.simulate import evaluate_snn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default=None, help="dataset (default: the model's); only its train split is read")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=500, help="held-out training images: the first half selects FTBC "
                                                            "passes, the second half scores")
    ap.add_argument("--threshold-images", type=int, default=1000, help="calibration images for the thresholds")
    ap.add_argument("--thresholds", default="percentile:99:channel",
                    help="threshold:percentile:granularity[:scale],... (threshold ltb: ltb:<step c>:granularity)")
    ap.add_argument("--ftbc", default="0:0:0:50", help="calib_images:alpha:passes:batch_size,...")
    ap.add_argument("--v0", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/bench/snn_tuning.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec = load_zoo_model(args.model)
    train = load_dataset(args.data or spec.default_data, "train")
    calib, held = split_holdout(train, args.holdout)
    xc, _ = calib.tensors(spec.mean, spec.std)
    xh, yh = held.tensors(spec.mean, spec.std)
    half = len(yh) // 2
    (xs, ys), (xh, yh) = (xh[:half], yh[:half]), (xh[half:], yh[half:])  # select | score
    steps = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= args.T]
    rows = []
    for th in args.thresholds.split(","):
        kind, value, gran, *scale = th.split(":")  # percentile|max:<percentile>:<granularity>[:<scale>]
        opts = {"ltb_step": float(value)} if kind == "ltb" else {"percentile": float(value)}  # ltb:<step c>:...
        conv = ConvertConfig(threshold=kind, granularity=gran, v0=args.v0, scale=float(scale[0]) if scale else 1.0,
                             **opts)
        snn = convert(model, xc[: args.threshold_images], conv)
        for fs in args.ftbc.split(","):
            n, alpha, passes, bs = fs.split(":")
            start = time.perf_counter()
            if int(n) == 0:
                snn.reset_calibration_()
                correct = evaluate_snn(snn, xh, yh, args.T, batch_size=args.batch_size, monitor=False).correct
                best, seconds, sel = correct, 0.0, [0] * len(steps)
            else:
                res = calibrate_ftbc(snn, xc[: int(n)], args.T, FTBCConfig(alpha=float(alpha), passes=int(passes),
                                                                            batch_size=int(bs)),
                                     holdout=(xs, ys), eval_batch_size=args.batch_size)
                seconds = res.seconds
                sel = [res.select(t) for t in steps]
                best = torch.zeros(args.T, dtype=torch.long)
                for k in sorted(set(sel)):  # score each chosen pass on the images that did not choose it
                    snn.reset_calibration_()
                    res.apply_(snn, args.T, k)
                    correct = evaluate_snn(snn, xh, yh, args.T, batch_size=args.batch_size, monitor=False).correct
                    for t, kk in zip(steps, sel):
                        if kk == k:
                            best[t - 1] = correct[t - 1]
            acc = [round(100 * float(best[t - 1]) / len(yh), 2) for t in steps]
            rec = {"model": args.model, "threshold": th, "v0": args.v0, "ftbc": fs, "T": args.T, "steps": steps,
                   "score_accuracy": acc, "selected_pass": sel, "select_images": half, "score_images": len(yh), "calib_seconds": seconds,
                   "wall": time.perf_counter() - start, "holdout": held.describe(), "calib": calib.describe(),
                   "provenance": provenance()}
            append_jsonl(args.out, rec)
            rows.append([th, args.v0, fs, *acc, round(seconds)])
            print(markdown_table(["thresholds", "v0", "ftbc n:alpha:passes:bs", *[f"T={t}" for t in steps], "s"],
                                 rows[-1:], digits=2), flush=True)
    print(markdown_table(["thresholds", "v0", "ftbc n:alpha:passes:bs", *[f"T={t}" for t in steps], "calib s"], rows,
                         digits=2))


if __name__ == "__main__":
    main()

"""SNN simulation and calibration cost: the fast engine against the reference, side by side in one process.

For each model, T and thread count, runs every task under ``engine="reference"`` (the step-by-step semantics:
analog input copied to every step, torch IF loop, all T steps per call) and then ``engine="fast"`` on the same
images, checks the outputs are identical (logits, per-step correct counts and firing rates; FTBC/BC/PC biases or
membranes), and reports wall times (the fastest of ``--repeats`` interleaved runs), their ratio and images/s. Tasks:

* ``simulate``: ``evaluate_snn`` without monitors; ``monitor``: with the firing-rate and synaptic monitors sweeps use;
* ``ftbc``: one FTBC pass (cached implementation, one batch of all images); ``bc``, ``pc``: one correction pass;
  ``rts``: install the shift, then simulate.

Results are appended to a JSONL file with machine, versions and commit.

    python benchmarks/bench_snn_engine.py --models resnet20,resnet56 --T 8,32 --threads 1,2 --images 128

FTBC: Wu et al., ECCV 2024, arXiv 2403.18388; BC/PC: Li et al., ICML 2021; RTS: Deng & Gu, ICLR 2021.
"""

from __future__ import annotations

import argparse
import time

import torch

from dormant.artifacts import append_jsonl
from dormant.report import markdown_table, provenance
from dormant.snn.calibrate import CalibrationData, get_calibration
from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.datasets import load_dataset, split_holdout
from dormant.snn.ftbc import FTBCConfig, calibrate_ftbc
from dormant.snn.models import load_zoo_model
from dormant.snn.simulate import evaluate_snn

TASKS = ("simulate", "monitor", "ftbc", "bc", "pc", "rts")


def _state(snn) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in snn.net.state_dict().items()}


def _run(task: str, snn, x, y, T: int, batch: int):
    """Run ``task``; returns what must be identical across engines."""
    if task in ("simulate", "monitor"):
        ev = evaluate_snn(snn, x, y, T, batch_size=batch, monitor=task == "monitor")
        return [ev.correct, ev.rates, ev.synaptic_rates]
    snn.reset_calibration_()
    if task == "ftbc":
        res = calibrate_ftbc(snn, x, T, FTBCConfig(passes=1, batch_size=len(x), select="last"))
        return [res.snapshots[-1]]
    if task == "rts":
        get_calibration("rts").run(snn, CalibrationData(x), T, None)
        return [evaluate_snn(snn, x, y, T, batch_size=batch, monitor=False).correct]
    get_calibration(task).run(snn, CalibrationData(x), T, None)
    return [_state(snn)]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--T", default="32", help="comma-separated step counts")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts")
    ap.add_argument("--images", type=int, default=128, help="training images (also the FTBC batch)")
    ap.add_argument("--batch-size", type=int, default=128, help="images per simulation batch")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the fastest of each is kept")
    ap.add_argument("--out", default="runs/bench/snn_engine.jsonl")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    if unknown := set(tasks) - set(TASKS):
        ap.error(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    prov = provenance()
    rows = []
    print(f"{prov['processor']}; {args.images} training images, simulation batches of {args.batch_size}")
    for model_name in args.models.split(","):
        model, spec = load_zoo_model(model_name)
        train, _ = split_holdout(load_dataset(spec.default_data, "train"), 1000)
        x, y = train.tensors(spec.mean, spec.std)
        snn = convert(model, x[:1000], ConvertConfig())
        xb, yb = x[1000 : 1000 + args.images], y[1000 : 1000 + args.images]
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for T in (int(t) for t in args.T.split(",")):
                for task in tasks:
                    wall, out = {"reference": [], "fast": []}, {}
                    for _ in range(args.repeats):  # interleaved, so both engines see the same machine load
                        for engine in ("reference", "fast"):
                            snn.engine = engine
                            _run(task, snn, xb[:2], yb[:2], 2, 2)  # warm-up: oneDNN primitives, kernel build
                            start = time.perf_counter()
                            out[engine] = _run(task, snn, xb, yb, T, args.batch_size)
                            wall[engine].append(time.perf_counter() - start)
                    wall = {k: min(v) for k, v in wall.items()}
                    same = _same(out["reference"], out["fast"])
                    rec = {"bench": "snn_engine", "model": model_name, "T": T, "threads": threads, "task": task,
                           "images": len(xb), "batch_size": args.batch_size, "repeats": args.repeats,
                           "seconds_reference": wall["reference"],
                           "seconds_fast": wall["fast"], "speedup": wall["reference"] / wall["fast"],
                           "images_per_s_reference": len(xb) / wall["reference"],
                           "images_per_s_fast": len(xb) / wall["fast"], "identical": same, **prov}
                    append_jsonl(args.out, rec)
                    row = [model_name, T, threads, task, f"{wall['reference']:.2f}", f"{wall['fast']:.2f}",
                           f"{rec['speedup']:.2f}", f"{rec['images_per_s_reference']:.1f}",
                           f"{rec['images_per_s_fast']:.1f}", same]
                    rows.append(row)
                    print(" | ".join(map(str, row)), flush=True)
        snn.engine = "fast"
    print()
    print(markdown_table(["model", "T", "threads", "task", "reference s", "fast s", "speed-up", "ref img/s",
                          "fast img/s", "identical"], rows))


if __name__ == "__main__":
    main()

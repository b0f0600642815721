"""Throughput of the prefetch simulator: active-neuron accesses simulated per second on one core.

Runs every policy family at a 25% DRAM budget over a trace with SmolLM2-135M's FFN geometry (30 layers
x 1536 neurons; synthetic at density 0.5 unless ``--trace`` is given), and the brute-force reference
cache on a slice of it for the speed-up. Prints a table and appends one JSON line per policy (with
machine, versions and commit) to ``runs/bench/bench_simulator.jsonl``.

    python benchmarks/bench_simulator.py [--tokens 600] [--trace runs/offload/trace.safetensors]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core, set before numpy loads BLAS

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from dormant.artifacts import append_jsonl  # noqa: E402
from dormant.offload import (  # noqa: E402
    FFNGeometry,
    ItemLayout,
    StorageLayout,
    parse_policy,
    perturb_trace,
    simulate,
    synthetic_trace,
    weight_format,
)
from dormant.offload.reference import reference_loads  # noqa: E402
from dormant.report import provenance  # noqa: E402
from dormant.traces import ActivationTrace  # noqa: E402

POLICIES = ["dense", "demand", "lru", "lfu", "window", "hot+lru", "prefetch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--out", default="runs/bench/bench_simulator.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.trace:
        tr = ActivationTrace.load(args.trace)
        tr = ActivationTrace(tr.packed[: args.tokens].clone(), tr.n_neurons, tr.model, tr.source)
    else:
        tr = synthetic_trace(args.tokens, 30, 1536, density=0.5, hidden_size=576, seed=0)
    pred = perturb_trace(tr, 0.05, 0.07)
    items = ItemLayout(FFNGeometry.from_trace(tr), weight_format("fp16"), StorageLayout())
    split = tr.n_tokens // 10
    prov = provenance()
    print(f"trace {tr.n_tokens} tokens x {tr.n_layers} layers x {tr.n_neurons} neurons, budget {args.budget:.0%}, "
          f"1 thread; {prov['processor']}")
    print(f"{'policy':10s} {'accesses':>10s} {'wall s':>7s} {'cpu s':>7s} {'M acc/s wall':>13s} {'M acc/s cpu':>12s}")
    for name in POLICIES:
        pol = parse_policy(name)
        c0, w0 = time.process_time(), time.perf_counter()
        st = simulate(tr, pol, args.budget, items, pred, split=split)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        rec = {"bench": "simulator", "policy": name, "budget": args.budget, "tokens": st.n_tokens,
               "layers": tr.n_layers, "neurons": tr.n_neurons, "accesses": st.accesses, "wall_s": wall, "cpu_s": cpu,
               "accesses_per_s_wall": st.accesses / wall, "accesses_per_s_cpu": st.accesses / cpu,
               "trace": args.trace or "synthetic", **prov}
        append_jsonl(args.out, rec)
        print(f"{name:10s} {st.accesses:10d} {wall:7.2f} {cpu:7.2f} {st.accesses / wall / 1e6:13.1f} "
              f"{st.accesses / cpu / 1e6:12.1f}")

    # the brute-force reference on a slice (one layer, few tokens), against the vectorised LRU on the same slice
    n_ref = min(60, tr.n_tokens)
    sl = ActivationTrace(tr.packed[:n_ref, :1].clone(), tr.n_neurons, {**tr.model, "n_layers": 1}, tr.source)
    it1 = ItemLayout(FFNGeometry.from_trace(sl), weight_format("fp16"), StorageLayout(align=1))
    masks = sl.masks().numpy()
    cap = int(args.budget * tr.n_neurons)
    w0 = time.perf_counter()
    reference_loads(masks, cap, "lru")
    t_ref = time.perf_counter() - w0
    w0 = time.perf_counter()
    simulate(sl, parse_policy("lru"), args.budget, it1)
    t_vec = time.perf_counter() - w0
    acc = int(masks.sum())
    append_jsonl(args.out, {"bench": "simulator-reference", "tokens": n_ref, "accesses": acc, "reference_s": t_ref,
                            "vectorised_s": t_vec, "speedup": t_ref / t_vec, **prov})
    print(f"reference LRU (1 layer, {n_ref} tokens): {acc / t_ref / 1e6:.2f} M acc/s; vectorised "
          f"{acc / t_vec / 1e6:.1f} M acc/s on the same slice ({t_ref / t_vec:.0f}x)")


if __name__ == "__main__":
    main()

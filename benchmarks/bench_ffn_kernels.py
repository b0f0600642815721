"""Decode latency of one FFN layer, dense torch vs the sparse kernels, measured side by side in one process.

For each FFN shape (from the models' ``config.json``), dtype and neuron sparsity ``s``, one token ``x``:

* ``dense``      -- ``down(silu(gate x) * up x)`` with ``F.linear`` (MKL/oneDNN on CPU, cuBLAS on GPU);
* ``kernel_all`` -- the sparse kernel with every neuron active (the kernel's own dense speed);
* ``given``      -- the kernel given a random ``1 - s`` fraction of the neurons as indices (the
  predictor/oracle mode: gate, up and down rows of the others are never read; bandwidth limit ``1/(1-s)``);
* ``gate_first`` -- the kernel with an ``ACT`` threshold that leaves a ``1 - s`` fraction active (CATS
  site: the gate is read in full, up and down rows of active neurons only; limit ``3 / (1 + 2(1-s))``).

Timing: variants run round-robin, the order rotated every round, so the load of a shared machine falls on
all of them alike; a variant's time is its median over rounds, and speed-ups are ``dense / variant``.
Wall time is the metric; process CPU time is recorded too (``cpu_*``): with one thread it leaves out the
time the process was descheduled, the main noise on a shared machine. The layer is replicated over enough copies (the model's layer count for small shapes,
else ``--llc-factor`` x the last-level cache) and successive calls walk the copies, so weights come from
DRAM as in real decode, not from cache. CUDA runs are synchronised around each timed group of calls.

Usage::

    python benchmarks/bench_ffn_kernels.py --threads 2                      # CPU, float32 + bfloat16
    python benchmarks/bench_ffn_kernels.py --device cuda --dtypes float16,bfloat16

Appends one JSON line per (shape, dtype, sparsity) to ``--out`` with :func:`dormant.report.provenance`,
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dormant.artifacts import append_jsonl
from dormant.config import add_config_args, config_from_args, field
from dormant.kernels import FFNThresholds, default_impl, pack_ffn, sparse_ffn_decode
from dormant.report import markdown_table, provenance

# (hidden D, intermediate I, decoder layers) from each model's config.json.
SHAPES = {
    "smollm2-135m": (576, 1536, 30),  # HuggingFaceTB/SmolLM2-135M
    "llama-3-8b": (4096, 14336, 32),  # meta-llama/Meta-Llama-3-8B
    "mistral-7b": (4096, 14336, 32),  # mistralai/Mistral-7B-v0.1
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchConfig:
    device: str = field("cpu", help="cpu | cuda")
    impl: str = field(
        "auto", help="kernel implementation: auto (cpu on CPU, triton on CUDA) | cpu | triton | reference"
    )
    threads: int = field(2, help="torch (and kernel) threads on the CPU")
    shapes: list[str] = field(default_factory=lambda: list(SHAPES), help="FFN shapes: " + ", ".join(SHAPES))
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"], help="weight dtypes")
    sparsity: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9], help="neuron sparsities"
    )
    seconds: float = field(20.0, help="time budget per (shape, dtype); sets the number of rounds")
    min_rounds: int = field(5, help="at least this many rounds")
    llc_factor: float = field(1.5, help="replicate the layer to cover this many times the last-level cache")
    max_copies: int = field(32, help="at most this many copies of the layer")
    seed: int = field(0, help="random seed for weights, token and masks")
    out: str = field("runs/bench/ffn_kernels.jsonl", help="JSONL file the results are appended to")


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 64 MiB if unknown."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or 64 << 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape(cfg: BenchConfig, name: str, dtype_name: str) -> list[dict]:
    D, I, n_layers = SHAPES[name]  # noqa: E741 -- the paper's names
    dtype, device = DTYPES[dtype_name], torch.device(cfg.device)
    impl = default_impl(device) if cfg.impl == "auto" else cfg.impl
    gen = torch.Generator().manual_seed(cfg.seed)
    gate = (torch.randn(I, D, generator=gen) / math.sqrt(D)).to(device, dtype)
    up = (torch.randn(I, D, generator=gen) / math.sqrt(D)).to(device, dtype)
    down = (torch.randn(D, I, generator=gen) / math.sqrt(I)).to(device, dtype)
    x = torch.randn(D, generator=gen).to(device, dtype)
    layer_bytes = 3 * D * I * gate.element_size()
    cache = llc_bytes() if device.type == "cpu" else torch.cuda.get_device_properties(device).L2_cache_size
    n_copies = max(1, min(cfg.max_copies, n_layers, math.ceil(cfg.llc_factor * cache / layer_bytes)))
    dense_w = [(gate.clone(), up.clone(), down.clone()) for _ in range(n_copies)]
    del gate, up, down
    packed = [pack_ffn(g, u, d) for g, u, d in dense_w]  # shares gate/up with dense_w, copies down

    # Gate-first thresholds: the s-quantile of |silu(gate x)| (same x, same weights in every copy).
    a = F.silu(F.linear(x.float(), dense_w[0][0].float())).abs()
    order = a.sort().values
    variants, meta = {}, {}
    x3 = x.view(1, 1, D)
    state = {"k": 0}

    def walk(fn):
        def call():
            state["k"] = (state["k"] + 1) % n_copies
            return fn(state["k"])

        return call

    variants["dense"] = walk(
        lambda k: F.linear(F.silu(F.linear(x3, dense_w[k][0])) * F.linear(x3, dense_w[k][1]), dense_w[k][2])
    )
    variants["kernel_all"] = walk(lambda k: sparse_ffn_decode(packed[k], x, None, None, impl))
    for s in cfg.sparsity:
        n_active = round((1 - s) * I)
        idx = torch.randperm(I, generator=gen)[:n_active].sort().values.to(device)
        variants[f"given@{s}"] = walk(lambda k, idx=idx: sparse_ffn_decode(packed[k], x, None, idx, impl))
        t = 0.0 if s == 0 else float((order[I - n_active - 1] + order[I - n_active]) / 2)
        thr = FFNThresholds(act=t)
        variants[f"gate_first@{s}"] = walk(
            lambda k, thr=thr: sparse_ffn_decode(packed[k], x, thr, None, impl)
        )
        meta[s] = {"given_active": n_active, "gate_first_active": int((a >= t).sum())}

    inner = 1 if device.type == "cpu" else 20  # calls per timed group (amortises the CUDA sync)
    names = list(variants)
    for fn in variants.values():  # warm-up: build the kernel, fault in pages, walk every copy once
        for _ in range(n_copies):
            fn()
    _sync(device)
    t0 = time.perf_counter()
    for fn in variants.values():
        fn()
    _sync(device)
    round_s = max(time.perf_counter() - t0, 1e-6) * inner
    rounds = max(cfg.min_rounds, int(cfg.seconds / round_s))
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                variants[n]()
            _sync(device)
            cpu_times[n].append((time.process_time() - c) / inner)
            times[n].append((time.perf_counter() - t) / inner)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    cmed = {n: statistics.median(v) * 1e3 for n, v in cpu_times.items()}
    rows = []
    for s in cfg.sparsity:
        g, f = med[f"given@{s}"], med[f"gate_first@{s}"]
        rows.append({
            # Process CPU time: on a shared machine it leaves out the time this process was descheduled
            # (with one thread it is the honest cost of a call; with more it also counts spinning threads).
            "cpu_dense_ms": cmed["dense"], "cpu_kernel_all_ms": cmed["kernel_all"], "cpu_given_ms": cmed[f"given@{s}"],
            "cpu_gate_first_ms": cmed[f"gate_first@{s}"], "cpu_speedup_given": cmed["dense"] / cmed[f"given@{s}"],
            "cpu_speedup_gate_first": cmed["dense"] / cmed[f"gate_first@{s}"],
            "cpu_given_vs_kernel_all": cmed["kernel_all"] / cmed[f"given@{s}"],
            "shape": name, "D": D, "I": I, "dtype": dtype_name, "device": str(device), "impl": str(getattr(impl, "value", impl)),
            "threads": torch.get_num_threads() if device.type == "cpu" else None, "sparsity": s,
            "dense_ms": med["dense"], "kernel_all_ms": med["kernel_all"], "given_ms": g, "gate_first_ms": f,
            "speedup_given": med["dense"] / g, "speedup_gate_first": med["dense"] / f,
            "given_vs_kernel_all": med["kernel_all"] / g, "limit_given": 1 / max(1 - s, 1e-9),
            "limit_gate_first": 3 / (1 + 2 * (1 - s)), "rounds": rounds, "copies": n_copies,
            "dense_GBps": layer_bytes / med["dense"] / 1e6, "kernel_all_GBps": layer_bytes / med["kernel_all"] / 1e6,
            **meta[s],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, BenchConfig)
    cfg = config_from_args(BenchConfig, parser.parse_args(argv))
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    prov = provenance()
    rows = []
    for name in cfg.shapes:
        for dtype_name in cfg.dtypes:
            with torch.inference_mode():
                new = bench_shape(cfg, name, dtype_name)
            for row in new:
                append_jsonl(cfg.out, {**row, "config": asdict(cfg), "provenance": prov})
            rows += new
            print(
                f"done {name} {dtype_name} ({new[0]['rounds']} rounds, {new[0]['copies']} copies)", flush=True
            )
    headers = ["shape", "dtype", "sparsity", "dense ms", "kernel all ms", "given ms", "x given", "x gate-first",
               "given/kernel_all", "x given (cpu time)", "x gate-first (cpu time)", "limit given"]  # fmt: skip
    print(
        f"\n{prov['processor']}, {prov['cpu_count']} CPUs, torch {prov['torch']}, threads {torch.get_num_threads()}, device {cfg.device}\n"
    )
    print(markdown_table(headers, [
        [r["shape"], r["dtype"], r["sparsity"], r["dense_ms"], r["kernel_all_ms"], r["given_ms"], r["speedup_given"],
         r["speedup_gate_first"], r["given_vs_kernel_all"], r["cpu_speedup_given"], r["cpu_speedup_gate_first"],
         r["limit_given"]] for r in rows
    ], digits=2))  # fmt: skip


if __name__ == "__main__":
    main()

"""How predictable are thresholded SwiGLU neurons at all? Density at a recall target for weight-based scores.

A predictor must rank neurons by how likely ``|silu(g) * u| >= T`` is. This script scores the held-out
pairs of a pair store with *training-free* approximations that read the model's own gate/up weights:

* ``intN``: ``|silu(x Qg^T) * (x Qu^T)|`` with gate/up rounded to N-bit symmetric per-row integers
  (``int1`` = sign times mean |w|); costs ``2 * N / 16`` of the FFN's gate+up fp16 bytes;
* ``svdR``: the same with rank-R SVD approximations of gate and up;
* ``gate``: ``|silu(x W_gate^T)|`` exactly (a gate-first executor's knowledge before touching ``up``),

and reports the predicted density at which held-out recall reaches the target (``tau`` chosen on the
same tokens, i.e. an optimistic bound). Compare with the trained predictors' held-out densities.

    python benchmarks/bench_predictors_bounds.py --pairs runs/predictors/smollm2_pairs --layers 1,15,29
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def _quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        return torch.sign(w) * w.abs().mean(1, keepdim=True)
    m = 2 ** (bits - 1) - 1
    s = w.abs().amax(1, keepdim=True) / m
    return (w / s).round().clamp(-m - 1, m) * s


def _lowrank(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, v = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ v[:r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", required=True, help="pair store collected under the thresholds of interest")
    ap.add_argument("--layers", default="1,15,29")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored per layer")
    ap.add_argument("--recall", type=float, default=0.99)
    ap.add_argument("--out", default="runs/bench/predictor_bounds.jsonl")
    args = ap.parse_args()

    from dormant.artifacts import append_jsonl
    from dormant.llm.adapters import ffn_layout
    from dormant.llm.models import load_model
    from dormant.llm.predictors import PairStore
    from dormant.llm.predictors.base import operating_point
    from dormant.report import provenance

    store = PairStore.open(args.pairs)
    model, _, info = load_model(args.model)
    layout = ffn_layout(model)
    torch.set_grad_enabled(False)
    for layer in (int(v) for v in args.layers.split(",")):
        w = layout.weights(layer)
        wg, wu = w.gate.float(), w.up.float()
        x = store.inputs(layer, "heldout")[: args.tokens].float()
        y = store.masks(layer, "heldout")[: args.tokens]
        rules = {f"int{b}": (_quant(wg, b), _quant(wu, b)) for b in (8, 4, 3, 2, 1)}
        rules.update({f"svd{r}": (_lowrank(wg, r), _lowrank(wu, r)) for r in (64, 256)})
        rec = {"layer": layer, "true_density": float(y.float().mean()), "recall": args.recall}
        for name, (g, u) in rules.items():
            s = (F.silu(x @ g.T) * (x @ u.T)).abs()
            rec[name] = operating_point(s, y, args.recall)["density"]
        rec["gate"] = operating_point(F.silu(x @ wg.T).abs(), y, args.recall)["density"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}))
        append_jsonl(args.out, {**rec, "model": info["id"], "pairs": args.pairs, "provenance": provenance()})


if __name__ == "__main__":
    main()

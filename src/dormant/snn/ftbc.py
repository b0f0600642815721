"""Forward Temporal Bias Correction (FTBC; Wu, Bojkovic, Gu, Suo, Zou, ECCV 2024, arXiv 2403.18388).

Every IF layer l gets a bias ``b_l[t, c]`` per step t and channel c, added to the membrane (see
:mod:`dormant.snn.neurons`). On training batches, layer by layer front to back and with forward passes only::

    e_l[t, c] = mean_{batch, space} ( o_l[t] - a_l )[c]        o: SNN output at step t, a: ANN activation
    b_l[t]   <- b_l[t] - alpha * e_l[t]

The SNN output in ``e`` is computed with the *current* biases (this layer's included), so repeated batches and
passes are a fixed-point iteration towards ``E[o_l[t]] = E[a_l]`` rather than an accumulation. Within a layer the
steps are visited in order, and after updating ``b_l[t]`` the step is taken again with the new bias, so later steps
and later layers see exactly the trajectory inference will produce. Weights never change.

Cost. The straightforward implementation (:func:`calibrate_ftbc` with ``implementation="reforward"``, like the
released code) re-runs the ANN and the SNN prefix for every layer: O(L^2) layer evaluations per batch. The cached
implementation runs the ANN once per batch (all targets recorded) and the SNN once, calibrating each layer at the
moment the forward pass reaches it: its input depends only on layers already calibrated on this batch. Both give
identical biases (tested; see ``benchmarks/bench_ftbc.py``).

Causality. The update of ``b[t]`` only involves steps <= t, so the biases from calibrating at T are the first T rows
of those from calibrating at any larger T: one calibration at the largest T serves every T. Snapshots after each
pass are kept; with a held-out split of the *training* data the snapshot is chosen per T on held-out accuracy after
step T (never on test data), which is again what a calibration at that T would select.

Data parallel. Under ``torchrun`` (:mod:`dormant.distributed`) each rank takes a contiguous share of every
calibration batch and of the held-out images; the per-step channel errors are float64 sums and counts summed across
ranks, so every rank applies the update one process computes for the whole batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dormant import distributed
from dormant.artifacts import ArtifactError, load_artifact, save_artifact
from dormant.snn.configs import FTBCConfig
from dormant.snn.network import SpikingNetwork
from dormant.snn.simulate import evaluate_snn

__all__ = ["FTBCConfig", "FTBCResult", "calibrate_ftbc", "ftbc_batch_cached", "ftbc_batch_reforward"]

log = logging.getLogger(__name__)


@dataclass
class FTBCResult:
    """Biases after every pass, with held-out accuracy per step. Version 1.

    Attributes:
        T: calibration horizon (biases exist for steps 1..T).
        snapshots: ``snapshots[k][neuron]`` = ``[T, C]`` biases after k passes (k = 0: all zeros).
        holdout_correct: ``[K+1, T]`` held-out images correct after each step for each snapshot, or ``None``.
        holdout_n: held-out images.
        seconds: calibration wall time (without the held-out evaluations).
        eval_seconds: wall time of the held-out evaluations.
        config: the :class:`FTBCConfig` as a dict, plus data sizes.
    """

    T: int
    snapshots: list[dict[str, torch.Tensor]]
    holdout_correct: torch.Tensor | None
    holdout_n: int
    seconds: float
    eval_seconds: float
    config: dict[str, Any]

    KIND = "dormant.FTBCResult"
    VERSION = 1

    def select(self, T: int) -> int:
        """Snapshot index used for ``T`` steps (best held-out accuracy after step T; ties go to later passes)."""
        if not 1 <= T <= self.T:
            raise ValueError(f"biases were calibrated for T <= {self.T}, asked for T={T}")
        if self.holdout_correct is None or self.config.get("select") == "last":
            return len(self.snapshots) - 1
        col = self.holdout_correct[:, T - 1]
        return int(torch.nonzero(col == col.max()).max())

    def biases(self, T: int, snapshot: int | None = None) -> dict[str, torch.Tensor]:
        """``{neuron: [T, C]}`` biases for ``T`` steps (the selected snapshot unless given)."""
        k = self.select(T) if snapshot is None else snapshot
        return {name: b[:T].clone() for name, b in self.snapshots[k].items()}

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int:
        """Install the biases for ``T`` steps into ``snn``; returns the snapshot index used."""
        k = self.select(T) if snapshot is None else snapshot
        neurons = snn.neurons
        for name, b in self.biases(T, k).items():
            neurons[name].step_bias = b.to(neurons[name].theta.device)
        return k

    def holdout_accuracy(self) -> torch.Tensor | None:
        return None if self.holdout_correct is None else self.holdout_correct.double() / self.holdout_n

    def save(self, path: str | Path) -> Path:
        tensors = {f"{k}/{name}": b for k, snap in enumerate(self.snapshots) for name, b in snap.items()}
        if self.holdout_correct is not None:
            tensors["holdout_correct"] = self.holdout_correct
        meta = {"T": self.T, "n_snapshots": len(self.snapshots), "holdout_n": self.holdout_n,
                "seconds": self.seconds, "eval_seconds": self.eval_seconds, "config": self.config}
        return save_artifact(path, self.KIND, self.VERSION, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> FTBCResult:
        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        try:
            snaps: list[dict[str, torch.Tensor]] = [{} for _ in range(meta["n_snapshots"])]
            for key, value in tensors.items():
                if key != "holdout_correct":
                    k, name = key.split("/", 1)
                    snaps[int(k)][name] = value
            return cls(meta["T"], snaps, tensors.get("holdout_correct"), meta["holdout_n"], meta["seconds"],
                       meta["eval_seconds"], meta["config"])
        except (KeyError, ValueError, IndexError) as e:
            raise ArtifactError(f"{path}: inconsistent FTBCResult ({e})") from e


@torch.no_grad()
def ftbc_batch_cached(snn: SpikingNetwork, x: torch.Tensor, T: int, alpha: float, clip: bool = False,
                      chunk: int | None = None) -> None:
    """One FTBC update of every layer on batch ``x`` ``[N, ...]``: one ANN and one SNN forward pass.

    The ANN targets of all layers are recorded in one forward; the SNN forward calibrates each neuron layer when
    the pass reaches it (its input only depends on layers before it, already calibrated on this batch).
    """
    names = list(snn.neurons)
    _, targets = snn.ann_forward(x, clip=clip, record=names)

    def hook(name, neuron, inp):
        return neuron.calibrate_ftbc_(inp, targets[name], alpha)

    snn.simulate(x, T, chunk=chunk, hook=hook)


@torch.no_grad()
def ftbc_batch_reforward(snn: SpikingNetwork, x: torch.Tensor, T: int, alpha: float, clip: bool = False) -> None:
    """The straightforward implementation of the same update: for every layer, run the ANN to get its target and
    the SNN (with the current biases) up to that layer to get its input, then update the layer."""
    for name, neuron in snn.neurons.items():
        _, rec = snn.ann_forward(x, clip=clip, record=[name])
        inp = snn.neuron_input(x, T, name)
        neuron.reset()
        neuron.calibrate_ftbc_(inp, rec[name], alpha)


def calibrate_ftbc(snn: SpikingNetwork, x: torch.Tensor, T: int, cfg: FTBCConfig | None = None, *,
                   holdout: tuple[torch.Tensor, torch.Tensor] | None = None, chunk: int | None = None,
                   eval_batch_size: int = 200, progress: bool = False) -> FTBCResult:
    """Calibrate FTBC biases for steps 1..T on calibration inputs ``x`` ``[N, ...]`` (training data).

    Args:
        snn: converted network; its FTBC biases are reset to zero first and, on return, hold the biases selected
            for ``T``. Weights, thresholds and other neuron state are not touched.
        x: normalised calibration inputs.
        T: calibration horizon.
        cfg: hyper-parameters.
        holdout: held-out *training* inputs and labels for selection / early stopping (``None``: last pass).
        chunk: steps per stateless call (memory bound only).
        eval_batch_size: batch size of the held-out evaluations.

    Returns:
        :class:`FTBCResult` with every pass's biases and held-out accuracies.
    """
    cfg = cfg or FTBCConfig()
    if cfg.select == "holdout" and holdout is None:
        raise ValueError("select='holdout' needs held-out training data (holdout=(x, y)); or use select='last'")
    dev = snn.device
    neurons = snn.neurons
    for nrn in neurons.values():
        nrn.step_bias = torch.zeros(T, nrn.channels, device=dev)
    n_batches = -(-len(x) // cfg.batch_size)
    if cfg.batches is not None:
        n_batches = min(n_batches, cfg.batches)
    batches = [x[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(n_batches)]
    shares = [distributed.shard(b) for b in batches]  # under torchrun each rank holds a share of every batch
    clip = cfg.target == "clip"

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: nrn.step_bias.detach().cpu().clone() for name, nrn in neurons.items()}

    eval_seconds = 0.0

    def held_out() -> torch.Tensor:
        nonlocal eval_seconds
        ev = evaluate_snn(snn, holdout[0], holdout[1], T, batch_size=eval_batch_size, chunk=chunk, monitor=False,
                          progress=progress, desc="held-out")
        eval_seconds += ev.seconds
        return ev.correct

    snaps = [snapshot()]
    correct = [held_out()] if holdout is not None else []
    best = correct[0].clone() if correct else None
    stale, seconds = 0, 0.0
    for p in range(cfg.passes):
        start = time.perf_counter()
        for xb in tqdm(shares, desc=f"FTBC pass {p + 1}/{cfg.passes}", disable=not progress or not distributed.is_main(),
                       leave=False):
            xb = xb.to(dev)
            if cfg.implementation == "reforward" and distributed.world() > 1:
                raise ValueError("implementation='reforward' is single-process; use 'cached' under torchrun")
            if cfg.implementation == "cached":
                ftbc_batch_cached(snn, xb, T, cfg.alpha, clip, chunk)
            else:
                ftbc_batch_reforward(snn, xb, T, cfg.alpha, clip)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        snaps.append(snapshot())
        if holdout is not None:
            c = held_out()
            correct.append(c)
            improved = bool((c > best).any())
            best = torch.maximum(best, c)
            stale = 0 if improved else stale + 1
            log.info("FTBC pass %d: held-out accuracy at T=%d %.4f (best %.4f)", p + 1, T,
                     float(c[-1]) / len(holdout[1]), float(best[-1]) / len(holdout[1]))
            if cfg.patience is not None and stale >= cfg.patience:
                log.info("FTBC: no held-out improvement for %d passes; stopping", stale)
                break
    conf = {**asdict(cfg), "calib_images": sum(len(b) for b in batches), "chunk": chunk,
            **({"world_size": distributed.world()} if distributed.world() > 1 else {})}
    result = FTBCResult(T, snaps, torch.stack(correct) if correct else None,
                        len(holdout[1]) if holdout is not None else 0, seconds, eval_seconds, conf)
    result.apply_(snn, T)
    return result

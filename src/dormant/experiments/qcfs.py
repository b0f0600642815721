"""``dormant snn train-qcfs``: fine-tune a pretrained ReLU CNN into a QCFS CNN (Bu et al., ICLR 2022), resumably.

SGD with momentum and weight decay, cosine learning rate per step, random crop (4-pixel zero padding) and
horizontal flip, on GPU when present. Each finished epoch writes its checkpoint (weights, thresholds, optimizer
momenta; :func:`dormant.snn.qcfs.save_qcfs_checkpoint`) and then appends its record to the run's ledger
(``epochs.jsonl``), so a record always has its checkpoint; a rerun with the same configuration resumes after the
last recorded epoch. A fixed part of the training data is held out and scored after every epoch (monitoring only:
the model kept is the last epoch's, nothing is selected on test data).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dormant.artifacts import ArtifactError, atomic_write_text, load_artifact
from dormant.experiments.configs import QCFSTrainConfig
from dormant.experiments.ledger import Ledger, config_key
from dormant.experiments.runtime import torch_threads
from dormant.snn.qcfs import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    QCFS,
    qcfs_from_relu,
    relu_activation_percentiles,
    save_qcfs_checkpoint,
)

__all__ = ["QCFSTrainConfig", "train_qcfs"]

log = logging.getLogger(__name__)


def _lr(cfg: QCFSTrainConfig, step: int, total: int) -> float:
    """Cosine decay from ``cfg.lr`` to 0 over ``total`` optimizer steps."""
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step, total) / total))


def train_qcfs(cfg: QCFSTrainConfig) -> Path:
    """Fine-tune the zoo model ``cfg.model`` (its pretrained ReLU weights, or ``cfg.weights``) into a QCFS network.

    Writes into ``cfg.out``: ``epoch_NNN.safetensors`` after every epoch, the ledger ``epochs.jsonl``,
    ``history.json`` and the final model ``qcfs.safetensors`` (load it with :func:`dormant.snn.qcfs.load_qcfs_model`).

    Returns:
        Path of ``qcfs.safetensors``.
    """
    with torch_threads(cfg.threads):
        return _train(cfg)


def _train(cfg: QCFSTrainConfig) -> Path:
    from tqdm.auto import tqdm

    from dormant.snn.datasets import augment_crop_flip, load_dataset, split_holdout
    from dormant.snn.models import load_zoo_model
    from dormant.snn.simulate import evaluate_ann, resolve_device

    out = Path(cfg.out)
    key = config_key(cfg.key_config())
    ledger = Ledger(out / "epochs.jsonl", key, cfg.key_config(), what="QCFS training")
    device = resolve_device(cfg.device)
    relu, spec = load_zoo_model(cfg.model, cfg.weights)
    data = load_dataset(cfg.data, "train", cfg.data_path)
    train, val = split_holdout(data, cfg.val_images, cfg.seed) if cfg.val_images else (data, None)
    if cfg.train_images is not None:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))
                             [: cfg.train_images], f"random {cfg.train_images}")
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    xv, yv = val.tensors(spec.mean, spec.std) if val is not None else (None, None)

    history = sorted(ledger.all(kind="epoch"), key=lambda r: r["epoch"])
    opt_state: dict[int, torch.Tensor] = {}
    if not history:
        xi, _ = train.head(cfg.init_images).tensors(spec.mean, spec.std)
        theta0 = relu_activation_percentiles(relu, xi, cfg.init_percentile)
        model = qcfs_from_relu(relu, cfg.levels, theta0)
        rec: dict[str, Any] = {"kind": "epoch", "epoch": 0, "theta_init": theta0, "relu_val_acc": None, "val_acc": None}
        if xv is not None:
            rec["relu_val_acc"] = evaluate_ann(relu, xv, yv, device=device)
            rec["val_acc"] = evaluate_ann(model, xv, yv, device=device)
            log.info("QCFS L=%d at init: held-out acc %.4f (ReLU net %.4f)", cfg.levels, rec["val_acc"],
                     rec["relu_val_acc"])
        save_qcfs_checkpoint(out / "epoch_000.safetensors", model, None, {"kind": "qcfs", "key": key, "epoch": 0,
                                                                         "model": cfg.model, "levels": cfg.levels})
        history.append(ledger.append(rec))
    start_epoch = history[-1]["epoch"]
    if start_epoch > cfg.epochs:
        raise ValueError(f"{out} already holds {start_epoch} epochs; --epochs {cfg.epochs} would train none")
    path = out / f"epoch_{start_epoch:03d}.safetensors"
    try:
        tensors, meta, _ = load_artifact(path, CHECKPOINT_KIND, (CHECKPOINT_VERSION,))
    except ArtifactError as e:
        raise ArtifactError(f"{ledger.path} records epoch {start_epoch} but its checkpoint is unreadable ({e}); "
                            "delete the folder to start over") from e
    if meta.get("key") != key:
        raise ArtifactError(f"{path} was trained with another configuration; use another --out")
    model = qcfs_from_relu(relu, cfg.levels)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = {int(k[4:]): v for k, v in tensors.items() if k.startswith("opt.")}
    if start_epoch:
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
        rec = {"kind": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "seconds": seconds, "lr_end": _lr(cfg, (epoch + 1) * steps_per_epoch, total),
               "theta": {n: float(m.theta.detach()) for n, m in model.named_modules() if isinstance(m, QCFS)}}
        if xv is not None:
            rec["val_acc"] = evaluate_ann(model, xv, yv, device=device)
        log.info("QCFS epoch %d/%d: loss %.4f train acc %.4f held-out acc %s (%.0f s)", epoch + 1, cfg.epochs,
                 rec["train_loss"], rec["train_acc"], rec.get("val_acc"), seconds)
        history.append({"key": key, **rec})
        # checkpoint first, then the record: a recorded epoch always has its checkpoint
        save_qcfs_checkpoint(out / f"epoch_{epoch + 1:03d}.safetensors", model, opt,
                             {**meta_base, "epoch": epoch + 1, "history": history})
        ledger.append(rec)
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    model = model.eval().cpu()
    final = out / "qcfs.safetensors"
    save_qcfs_checkpoint(final, model, None, {**meta_base, "epoch": cfg.epochs, "history": history})
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    return final

"""A small model zoo for ANN->SNN conversion (FTBC, Wu et al., ECCV 2024, arXiv 2403.18388).

* ``resnet20/32/44/56``: the CIFAR ResNets of He et al. (CVPR 2016, Sec. 4.2): depth 6n+2, three stages of n
  BasicBlocks with 16/32/64 channels, option-A shortcut (stride-2 subsampling + zero channel padding, no
  parameters), global average pooling, ``Linear(64, 10)``. Key names match the pretrained checkpoints of
  akamaster/pytorch_resnet_cifar10, which :func:`load_zoo_model` loads strictly.
* ``vgg16``: a CIFAR VGG-16 (13 conv+BN+ReLU, 5 pooling layers, FC-4096-FC-4096-FC as in the QCFS code base).
  No pretrained weights exist offline; it is there to be trained (or converted from a user checkpoint).
* ``lenet``: the ReLU LeNet with max pooling of ShrinkBench's MNIST checkpoint.

Every ReLU is its own ``nn.ReLU`` module and every shortcut is a module, so the conversion in
:mod:`dormant.snn.conversion` can see all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ZeroPadShortcut",
    "BasicBlock",
    "CifarResNet",
    "VGG16",
    "LeNet",
    "ModelSpec",
    "MODELS",
    "build_model",
    "load_zoo_model",
    "load_state_dict_strict",
]

log = logging.getLogger(__name__)

CIFAR_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # what akamaster's checkpoints expect
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
MNIST_NORM = ((0.1307,), (0.3081,))


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al.: ``y = pad_C(x[:, :, ::s, ::s])`` with zero channels on both sides.

    Linear and parameter-free, so it acts on spike trains exactly as on activations.

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of ``y`` (``out_channels - in_channels`` must be even).
        stride: spatial subsampling factor.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if (out_channels - in_channels) % 2:
            raise ValueError("option-A padding needs an even channel difference")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C_in, H, W]`` -> ``[N, C_out, ceil(H/s), ceil(W/s)]``."""
        p = (self.out_channels - self.in_channels) // 2
        return nn.functional.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity or option A."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = ZeroPadShortcut(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet of depth ``6n+2`` (input ``[N, 3, 32, 32]`` -> logits ``[N, num_classes]``)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


class VGG16(nn.Module):
    """CIFAR VGG-16: 13 conv3x3+BN+ReLU in 5 stages, each followed by 2x2 pooling, then FC-FC-FC.

    Args:
        num_classes: output classes.
        pool: ``"avg"`` (the usual choice for conversion) or ``"max"``.
        hidden: width of the two hidden FC layers.
    """

    CFG = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")

    def __init__(self, num_classes: int = 10, pool: str = "avg", hidden: int = 4096):
        super().__init__()
        pools = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}
        if pool not in pools:
            raise ValueError(f"pool must be one of {sorted(pools)}, got {pool!r}")
        layers: list[nn.Module] = []
        c = 3
        for v in self.CFG:
            if v == "P":
                layers.append(pools[pool](2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """ShrinkBench's MNIST LeNet: conv(1->20,5)-ReLU-maxpool2-conv(20->50,5)-ReLU-maxpool2-fc(800->500)-ReLU-fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(800, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry.

    Attributes:
        build: constructor of the (randomly initialised) architecture.
        dataset: the dataset family it classifies (a key prefix of :data:`dormant.snn.datasets.DATASETS`).
        input_shape: ``(C, H, W)`` of one input.
        mean, std: per-channel input normalisation the weights expect (applied to pixels scaled to [0, 1]).
        weights: :data:`dormant.data.SOURCES` key of the pretrained weights, or ``None``.
        default_data: the dataset used when none is given.
    """

    build: Callable[[], nn.Module]
    dataset: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str | None
    default_data: str


MODELS: dict[str, ModelSpec] = {
    **{
        f"resnet{d}": ModelSpec(
            (lambda d=d: CifarResNet(d)), "cifar10", (3, 32, 32), *CIFAR_IMAGENET_NORM, f"resnet{d}-cifar10",
            "cifar10-lossless",
        )
        for d in (20, 32, 44, 56)
    },
    "vgg16": ModelSpec(lambda: VGG16(), "cifar10", (3, 32, 32), *CIFAR_NORM, None, "cifar10-lossless"),
    "lenet": ModelSpec(lambda: LeNet(), "mnist", (1, 28, 28), *MNIST_NORM, "lenet-mnist", "mnist"),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str) -> nn.Module:
    """The architecture ``name`` with random weights, in eval mode."""
    return _spec(name).build().eval()


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``; every key must match both ways.

    The only tolerated difference is BatchNorm's ``num_batches_tracked`` counter, which older checkpoints
    (e.g. akamaster's) do not store and which does not affect inference. A ``module.`` prefix (DataParallel) is
    stripped when every key has it.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")


def load_zoo_model(name: str, weights: str | Path | None = None, pretrained: bool = True) -> tuple[nn.Module, ModelSpec]:
    """Build zoo model ``name`` and load its weights strictly.

    Args:
        name: a key of :data:`MODELS`.
        weights: explicit checkpoint path (a state dict, or a dict holding one under ``state_dict``); by default
            the spec's pretrained weights are resolved through :func:`dormant.data.resolve`.
        pretrained: ``False`` returns the randomly initialised architecture.

    Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, no
    arbitrary code from the pickle.
    """
    from dormant.data import resolve

    spec = _spec(name)
    model = spec.build()
    if weights is None and not pretrained:
        return model.eval(), spec
    if weights is None and spec.weights is None:
        raise ValueError(f"model {name!r} has no pretrained weights; train it or pass a checkpoint path")
    path = resolve(spec.weights, weights) if spec.weights else resolve("", weights)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(ckpt).__name__}")
    load_state_dict_strict(model, state, str(path))
    return model.eval(), spec

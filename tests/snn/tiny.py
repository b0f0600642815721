"""A tiny CNN with batch-norm, a residual block, average and max pooling, trained in ~1 s on a synthetic task."""

from __future__ import annotations

import functools

import torch
from torch import nn


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 4, pool: str = "avg"):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu3 = nn.ReLU()
        self.pool = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(y)) + x)
        return self.fc2(self.relu4(self.fc1(self.flatten(self.pool(x)))))


def synthetic(n: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 1, 8, 8]`` noisy class templates (fixed templates, seeded noise) and labels."""
    templates = torch.randn(classes, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 1.6 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


@functools.lru_cache(maxsize=2)
def trained(pool: str = "avg") -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet(pool=pool)
    x, y = synthetic(1024, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        i = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()

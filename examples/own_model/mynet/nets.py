"""A user's own small CNN, as lrexport sees one: its own layer names, a depthwise and a grouped conv."""

import torch
from torch import nn


class InvertedResidual(nn.Module):
    """1×1 expand, 3×3 depthwise, 1×1 project, with a residual (MobileNetV2's block)."""

    def __init__(self, channels: int):
        super().__init__()
        wide = 2 * channels
        self.expand = nn.Conv2d(channels, wide, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(wide)
        self.depthwise = nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(wide)
        self.project = nn.Conv2d(wide, channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.expand_bn(self.expand(x)))
        y = torch.relu(self.depthwise_bn(self.depthwise(y)))
        return x + self.project_bn(self.project(y))


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = InvertedResidual(width)
        self.grouped = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=4, bias=False)
        self.mixer = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def features(self, x):
        x = self.block(self.stem(x))
        return torch.relu(self.mixer(torch.relu(self.grouped(x))))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def build(num_classes: int = 10, width: int = 16, in_chans: int = 3) -> TinyNet:
    """The factory a recipe names: model.name = "mynet.nets:build"; model.kwargs are its keyword arguments."""
    return TinyNet(num_classes, width, in_chans)

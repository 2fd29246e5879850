"""Models for the benchmarks: torchvision ResNet-18 (CIFAR or ImageNet stem) and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet18", "SmallCNN", "build_model", "MODELS"]


def resnet18(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> nn.Module:
    """torchvision ResNet-18.

    Args:
        num_classes: outputs of the last layer.
        in_channels: 3 for CIFAR-10, 1 for Fashion-MNIST.
        stem: ``"cifar"``: 3x3 stride-1 first convolution and no max-pool (the usual variant for
            32x32 images); ``"imagenet"``: torchvision's 7x7 stride-2 convolution and max-pool.
    """
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem == "imagenet":
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        raise ValueError(f"Unknown stem {stem!r}; expected 'cifar' or 'imagenet'")
    return model


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU-pool) and a linear head; about 0.1M parameters at width 32.

    Fast enough on a laptop CPU for the demo and the notebook."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS = ("resnet18", "resnet18-imagenet", "small-cnn")


INITS = (None, "pytorch")


def build_model(name: str, num_classes: int, in_channels: int, width: int = 32, init: str | None = None) -> nn.Module:
    """``"resnet18"`` (CIFAR stem), ``"resnet18-imagenet"`` or ``"small-cnn"``.

    ``init="pytorch"`` re-initialises every convolution of a ResNet with PyTorch's layer default
    (Kaiming-uniform, a = sqrt(5)) instead of torchvision's Kaiming-normal (fan-out); batch norm and
    the last linear layer are the same under both."""
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; expected None or 'pytorch'")
    if name == "resnet18":
        model = resnet18(num_classes, in_channels, "cifar")
    elif name == "resnet18-imagenet":
        model = resnet18(num_classes, in_channels, "imagenet")
    elif name == "small-cnn":
        if init is not None:
            raise ValueError("init applies to the ResNets; the small CNN has PyTorch's default init")
        return SmallCNN(num_classes, in_channels, width)
    else:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}")
    if init == "pytorch":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
    return model

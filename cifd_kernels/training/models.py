# SPDX-License-Identifier: Apache-2.0
"""Teacher, TA and student networks.

Every model here has the same three-part interface, which the distillation
recipes rely on:

- ``features(x) -> [B, D]``: the penultimate embedding, after global pooling
  (the ``X`` that RDMs read, the ``W`` that the student's IBM sees);
- ``head``: ``nn.Linear(D, K)``;
- ``forward(x) == head(features(x))``: logits [B, K];
- ``embed_dim`` (D) and ``num_classes`` (K) as attributes.

The "simple CNN" study (CIFD section 5, after TAKD's plain CNNs) is sized here
for 28x28 inputs and a CPU: an L-layer CNN has L 3x3 conv layers (each conv ->
BatchNorm -> ReLU) in stages separated by 2x2 max-pooling, then global average
pooling and the linear head (not counted in L). ``cnn10`` is the teacher,
``cnn2`` the student, ``cnn8``/``cnn6``/``cnn4`` the TAs. Widths grow with
depth so that capacity (and accuracy) falls monotonically from cnn10 to cnn2.

torchvision's ResNet18/34/50 and MobileNetV2 are wrapped to the same interface
for the CIFAR-100 and ImageNet configurations; ``small_input=True`` swaps the
ResNet stem for a 3x3 stride-1 conv without max-pooling (the usual CIFAR stem).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

# conv widths per stage; a 2x2 max-pool separates consecutive stages.
# 28x28 input -> stages at 28, 14, 7, 3 pixels.
CNN_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "cnn10": ((16, 16), (32, 32, 32), (64, 64, 64), (128, 128)),
    "cnn8": ((16, 16), (32, 32, 32), (64, 64, 64)),
    "cnn6": ((16, 16), (32, 32), (64, 64)),
    "cnn4": ((16,), (32, 32), (64,)),
    "cnn2": ((16,), (32,)),
}


class SimpleCNN(nn.Module):
    """Plain CNN: ``stages`` of (3x3 conv, BN, ReLU), max-pool between stages,
    global average pooling, linear head. Input [B, C, H, W] float32."""

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, widths in enumerate(stages):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False),
                           nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.embed_dim, self.num_classes = c, num_classes
        self.num_conv_layers = sum(len(s) for s in stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TorchvisionNet(nn.Module):
    """A torchvision classifier split into ``features`` and ``head``.

    ``embed_dim`` > 0 adds a projection ``Linear(native, embed_dim) + BN1d +
    ReLU`` after pooling (so teachers of different widths can share RDM sizes);
    0 keeps the native width (512 ResNet18/34, 2048 ResNet50, 1280 MobileNetV2).
    ``dropout`` applies between ``features`` and ``head`` in training only.
    """

    def __init__(self, arch: str, num_classes: int, *, embed_dim: int = 0,
                 small_input: bool = False, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        import torchvision.models as tvm
        if arch.startswith("resnet"):
            net = getattr(tvm, arch)(weights=None)
            if small_input or in_channels != 3:
                net.conv1 = nn.Conv2d(in_channels, 64, 3 if small_input else 7,
                                      stride=1 if small_input else 2,
                                      padding=1 if small_input else 3, bias=False)
            if small_input:
                net.maxpool = nn.Identity()
            native = net.fc.in_features
            net.fc = nn.Identity()  # torchvision's forward then ends at the pooled embedding
            self.backbone = net
        elif arch == "mobilenet_v2":
            net = tvm.mobilenet_v2(weights=None)
            if small_input or in_channels != 3:
                first = net.features[0][0]
                net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3,
                                               stride=1 if small_input else 2,
                                               padding=1, bias=False)
            native = net.last_channel
            self.backbone = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten(1))
        else:
            raise ValueError(f"unknown torchvision arch {arch!r}")
        self.proj = (nn.Sequential(nn.Linear(native, embed_dim), nn.BatchNorm1d(embed_dim),
                                   nn.ReLU(inplace=True)) if embed_dim else nn.Identity())
        self.embed_dim = embed_dim or native
        self.num_classes = num_classes
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
ARCHS = tuple(CNN_STAGES) + TORCHVISION_ARCHS


def build_model(arch: str, num_classes: int, *, in_channels: int = 1, image_size: int = 28,
                embed_dim: int = 0) -> nn.Module:
    """Build ``arch`` (one of :data:`ARCHS`) for ``num_classes`` classes.

    ``image_size`` <= 64 selects the small-input stem of the torchvision nets.
    ``embed_dim`` (torchvision nets only) sets D through a projection; 0 = native.
    """
    if arch in CNN_STAGES:
        if embed_dim:
            raise ValueError(f"{arch}: embed_dim is fixed by the architecture "
                             f"({CNN_STAGES[arch][-1][-1]}); leave it 0")
        return SimpleCNN(CNN_STAGES[arch], num_classes, in_channels)
    if arch in TORCHVISION_ARCHS:
        return TorchvisionNet(arch, num_classes, embed_dim=embed_dim,
                              small_input=image_size <= 64, in_channels=in_channels,
                              dropout=0.2 if arch == "mobilenet_v2" else 0.0)
    raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

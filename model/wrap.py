"""The graph around the network: uint8 NHWC in, normalisation inside, probabilities out.

Training uses ``Normalize`` too, so the exported graph normalises exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """uint8[N, H, W, 3] RGB -> float32[N, 3, H, W], (x/255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean: Tensor
        self.std: Tensor
        # Folding /255 into mean and std leaves one subtract and one divide in the graph.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


class ServingModel(nn.Module):
    """What the ONNX file computes: (probabilities, logits) from raw uint8 crops."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(self.normalize(images))
        return logits.softmax(dim=1), logits

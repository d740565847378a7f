"""The graph around the network: uint8 NHWC in, normalisation inside, probabilities out.

Training uses ``Normalize`` too, so the exported graph normalises exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.resnet import ResNet


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
    """What the ONNX file computes from raw uint8 crops and a class id per image (-1: its top
    class), in core.contract's order: probabilities, logits, the embedding (the pooled features)
    and the class activation map of each image's class."""

    def __init__(self, net: ResNet, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(
        self, images: Tensor, class_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        maps = self.net.features(self.normalize(images))
        embedding = self.net.avgpool(maps).flatten(1)
        logits = self.net.fc(embedding)
        top = logits.argmax(dim=1)
        chosen = top if class_ids is None else torch.where(class_ids >= 0, class_ids, top)
        weights = self.net.fc.weight[chosen]  # [N, F]: each image's class's row
        n, _, h, w = maps.shape
        class_map = torch.bmm(weights.unsqueeze(1), maps.flatten(2)).view(n, h, w)
        return logits.softmax(dim=1), logits, embedding, class_map

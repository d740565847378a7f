"""Checkpoints: our own (a plain dict that rebuilds the model) and torchvision state_dicts."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.contract import Preprocessing
from core.errors import ModelError
from core.preprocess import Recipe
from model.files import atomic_path
from model.resnet import ARCHITECTURES, ResNet, build

FORMAT = "resnet-serve/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_RECIPE = Recipe(resize_size=256, crop_size=224, interpolation="bilinear")


@dataclass
class Checkpoint:
    arch: str
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    recipe: Recipe
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = "resnet50"
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def build_model(self) -> ResNet:
        net = build(self.arch, num_classes=len(self.labels))
        load_weights(net, self.state_dict, self.arch)
        return net.eval()


def imagenet_labels() -> list[str]:
    text = resources.files("model").joinpath("data/imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(net: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:4]
        raise ModelError(f"weights do not fit {arch}: {' '.join(first)[:600]}") from exc


def read_raw(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"checkpoint {path}: no such file")
    try:
        # weights_only: a checkpoint from the internet must not run code when loaded.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        ValueError,
    ) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"checkpoint {path}: not a readable PyTorch checkpoint ({reason})"
        ) from exc


def infer_arch(state_dict: dict[str, Any]) -> str:
    """Which torchvision ResNet a bare state_dict is, from its block counts."""
    counts = []
    for stage in range(1, 5):
        blocks = {k.split(".")[1] for k in state_dict if k.startswith(f"layer{stage}.")}
        counts.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    for arch, (block, layers) in ARCHITECTURES.items():
        if layers == counts and (block.expansion == 4) == bottleneck:
            return arch
    raise ModelError(
        f"state_dict is not a ResNet this project knows (blocks per stage {counts}, "
        f"{'bottleneck' if bottleneck else 'basic'} blocks; supported: {sorted(ARCHITECTURES)})"
    )


def load(path: Path) -> Checkpoint:
    """Our checkpoint dict, or a torchvision ImageNet state_dict (``resnet50-*.pth``)."""
    path = Path(path)
    data = read_raw(path)
    digest = sha256_file(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        preprocessing = Preprocessing.from_dict(data["preprocessing"])
        ckpt = Checkpoint(
            arch=data["arch"],
            state_dict=data["state_dict"],
            labels=list(data["labels"]),
            recipe=preprocessing.recipe,
            mean=preprocessing.mean,  # type: ignore[arg-type]
            std=preprocessing.std,  # type: ignore[arg-type]
            name=str(data.get("name", data["arch"])),
            metrics=dict(data.get("metrics", {})),
            extra={k: data[k] for k in ("epoch", "seed", "config") if k in data},
            sha256=digest,
        )
    elif (
        isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        ckpt = _torchvision(data, digest)
    else:
        raise ModelError(
            f"checkpoint {path}: neither a resnet-serve checkpoint nor a torchvision state_dict"
        )
    ckpt.build_model()  # fails here, naming the file, if the weights do not fit
    return ckpt


def _torchvision(state_dict: dict[str, torch.Tensor], digest: str) -> Checkpoint:
    if "fc.weight" not in state_dict:
        raise ModelError("state_dict has no 'fc.weight': not a torchvision ResNet classifier")
    arch = infer_arch(state_dict)
    num_classes = state_dict["fc.weight"].shape[0]
    labels = imagenet_labels() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    return Checkpoint(
        arch=arch,
        state_dict=state_dict,
        labels=labels,
        recipe=IMAGENET_RECIPE,
        name=f"{arch}-imagenet" if num_classes == 1000 else arch,
        sha256=digest,
    )


def save(payload: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)

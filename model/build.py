"""One command from inputs to the served artifact, cached on a hash of those inputs.

python -m model build                                   # digits demo: train + export
python -m model build --checkpoint resnet50-0676ba61.pth # torchvision ImageNet weights
python -m model build --data photos/ --checkpoint resnet50-0676ba61.pth  # fine-tune, export
python -m model build --also fp16   # fp32 at --out, fp16 beside it (model.fp16.onnx) for CUDA
python -m model build --checkpoint resnet50-0676ba61.pth --precision int8 --calib-data photos/
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from core.contract import PRECISIONS, variant_path
from core.errors import ModelError
from core.preprocess import IMAGE_SUFFIXES
from model import checkpoint
from model.data import DIGITS
from model.evalsets import calibration_for, eval_set_for
from model.export import EXPORT_FORMAT, export
from model.files import atomic_path
from model.train import TrainConfig, train

log = logging.getLogger(__name__)
# Options added after files were first built.
_LATER_OPTIONS = frozenset({"image_size", "lr", "batch_size", "val_fraction", "name"})


@dataclass
class BuildConfig:
    out: str = "artifacts/model.onnx"  # the ONNX file to write (a .build.json stamp goes beside it)
    checkpoint: str | None = None  # torchvision .pth or our .pt; with --data: fine-tune from it
    data: str | None = None  # ImageFolder to train on; default: the digits demo
    precision: str = "fp32"  # fp32 | fp16 (for CUDA) | int8 (for CPU)
    also: str | None = None  # more precisions, comma-separated, each beside --out: model.fp16.onnx
    calib_data: str | None = None  # int8: ImageFolder or 'digits' (default: the training set)
    epochs: int | None = None  # default: TrainConfig's
    image_size: int | None = None  # the crop trained and served; default: 16 digits, 224 photos
    lr: float | None = None  # peak learning rate; default: TrainConfig's
    batch_size: int | None = None  # images per optimiser step; default: TrainConfig's
    val_fraction: float | None = None  # share held out for validation; default: TrainConfig's
    seed: int = 0  # seeds data order, augmentation and initialisation
    name: str | None = None  # model_name in the metadata: its repository folder's name
    force: bool = False  # rebuild even when the inputs are unchanged

    def training(self) -> dict[str, Any]:
        """The training options given (TrainConfig's names), the rest left to its defaults."""
        given = {
            "epochs": self.epochs,
            "crop_size": self.image_size,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "val_fraction": self.val_fraction,
        }
        return {name: value for name, value in given.items() if value is not None}


def build(config: BuildConfig) -> Path:
    """Write every requested precision that is missing or stale; return ``config.out``."""
    out = Path(config.out)
    inputs = _inputs(config)
    targets = _targets(config, out)
    stale, fresh_sources = [], set()
    for precision, path in targets:
        # Keyed per file: adding --also fp16 later must not rebuild the fp32 file beside it.
        key = _key({**inputs, "precision": precision})
        stamp = path.with_name(path.name + ".build.json")
        written = _read_stamp(stamp)
        if not config.force and path.is_file() and written.get("key") == key:
            log.info("%s is up to date (inputs unchanged); nothing to do", path)
            fresh_sources.add(written.get("metadata", {}).get("source_sha256"))
        else:
            stale.append((precision, path, key))
    if not stale:
        return out
    source, trained = _source_checkpoint(config, out, fresh_sources)
    if trained:  # every file must come from the one checkpoint: the fresh ones are redone too
        stale = [(p, path, _key({**inputs, "precision": p})) for p, path in targets]
    ckpt = checkpoint.load(source)
    for precision, path, key in stale:
        calibration = calibration_for(ckpt, config.calib_data) if precision == "int8" else None
        log.info("exporting %s to ONNX (%s) and checking it against PyTorch", source, precision)
        metadata = export(
            ckpt,
            path,
            precision=precision,
            name=config.name,
            eval_set=eval_set_for(ckpt, None),
            calibration=calibration,
        )
        stamp = path.with_name(path.name + ".build.json")
        with atomic_path(stamp) as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "key": key,
                        "inputs": {**inputs, "precision": precision},
                        "metadata": metadata.to_dict(),
                    },
                    indent=2,
                )
            )
    return out


def _targets(config: BuildConfig, out: Path) -> list[tuple[str, Path]]:
    also = [p.strip() for p in (config.also or "").split(",") if p.strip()]
    for precision in [config.precision, *also]:
        if precision not in PRECISIONS:
            raise ModelError(f"precision {precision!r} is not one of {PRECISIONS}")
    if config.precision in also or len(set(also)) != len(also):
        raise ModelError(
            f"--also {config.also!r} repeats a precision (--precision is {config.precision})"
        )
    return [(config.precision, out), *((p, variant_path(out, p)) for p in also)]


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _source_checkpoint(
    config: BuildConfig, out: Path, fresh_sources: set[str]
) -> tuple[Path, bool]:
    """The checkpoint to export, and whether it was trained just now."""
    if config.data is None and config.checkpoint is not None:
        if config.training():
            given = ", ".join(sorted(config.training()))
            raise ModelError(
                f"{given}: options of training, and --checkpoint without --data only exports "
                "(add --data to fine-tune)"
            )
        return Path(config.checkpoint), False
    trained = out.with_name(out.stem + ".checkpoint.pt")
    # An up-to-date sibling was exported from this very checkpoint: export from it, not retrain.
    if trained.is_file() and checkpoint.sha256_file(trained) in fresh_sources:
        return trained, False
    train_config = TrainConfig(
        data=config.data or DIGITS,
        init=config.checkpoint,
        seed=config.seed,
        out=str(trained),
    )
    train_config = dataclasses.replace(train_config, **config.training())
    return train(train_config), True


def _inputs(config: BuildConfig) -> dict[str, Any]:
    skip = ("force", "also", "precision")  # precision: set per file by build()
    inputs: dict[str, Any] = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        # An option left unset is left out: files built before it existed stay up to date.
        if k not in skip and not (k in _LATER_OPTIONS and v is None)
    }
    # A file written by an older export lacks what servers now check (its reference): rebuilt.
    inputs["export_format"] = EXPORT_FORMAT
    try:
        inputs["resnet_serve"] = version("resnet-serve")
    except PackageNotFoundError:
        inputs["resnet_serve"] = "source"
    if config.checkpoint:
        path = Path(config.checkpoint)
        if not path.is_file():
            raise ModelError(f"checkpoint {path}: no such file")
        inputs["checkpoint_sha256"] = checkpoint.sha256_file(path)
    if config.data:
        inputs["data"] = _folder_fingerprint(Path(config.data))
    return inputs


def _folder_fingerprint(root: Path) -> str:
    """Names, sizes and mtimes: cheap, and changes whenever an image is added, removed or edited."""
    if not root.is_dir():
        raise ModelError(f"dataset {root}: not a directory")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_stamp(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}

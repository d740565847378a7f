from pathlib import Path

import pytest
import torch

from core.errors import ModelError
from model import checkpoint, train
from model.train import TrainConfig
from tests.helpers.training import write_color_folder


def test_training_keeps_the_best_checkpoint_and_it_rebuilds(tiny_checkpoint: Path) -> None:
    ckpt = checkpoint.load(tiny_checkpoint)
    history = torch.load(tiny_checkpoint.with_suffix(".last.pt"), weights_only=True)
    assert ckpt.arch == "resnet18"
    assert ckpt.labels == ["blue", "green", "red"]
    assert ckpt.recipe.crop_size == 32
    assert ckpt.extra["config"]["epochs"] == 3
    assert history["epoch"] == 3
    first = checkpoint.read_raw(tiny_checkpoint)
    assert first["metrics"]["val_top1"] >= 0.5
    net = ckpt.build_model()
    assert net.fc.out_features == 3


def test_loss_decreases_over_epochs(color_folder: Path, tmp_path: Path) -> None:
    losses = []
    for epochs in (1, 4):
        config = TrainConfig(
            data=str(color_folder),
            arch="resnet18",
            crop_size=32,
            resize_size=32,
            epochs=epochs,
            batch_size=8,
            lr=3e-3,
            out=str(tmp_path / f"e{epochs}.pt"),
        )
        train.train(config)
        last = checkpoint.read_raw(tmp_path / f"e{epochs}.last.pt")
        losses.append(last["metrics"]["train_loss"])
    assert losses[1] < losses[0]


def test_resume_reproduces_an_uninterrupted_run(
    color_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config(out: str, resume: str | None = None) -> TrainConfig:
        return TrainConfig(
            data=str(color_folder),
            arch="resnet18",
            crop_size=32,
            resize_size=32,
            epochs=2,
            batch_size=8,
            out=str(tmp_path / out),
            resume=resume,
        )

    train.train(config("whole.pt"))
    whole = checkpoint.read_raw(tmp_path / "whole.last.pt")

    real_epoch = train._train_epoch
    epochs_started: list[int] = []

    def crash_in_epoch_two(*args: object) -> tuple[float, float]:
        epochs_started.append(len(epochs_started) + 1)
        if epochs_started[-1] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "_train_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.train(config("split.pt"))
    monkeypatch.setattr(train, "_train_epoch", real_epoch)
    train.train(config("split.pt", resume=str(tmp_path / "split.last.pt")))
    resumed = checkpoint.read_raw(tmp_path / "split.last.pt")

    assert resumed["epoch"] == whole["epoch"] == 2
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_new_head_when_fine_tuning_to_other_classes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = write_color_folder(tmp_path / "two", per_class=3, seed=5, classes=("blue", "green"))
    config = TrainConfig(
        data=str(folder),
        arch="resnet18",
        init=str(tiny_checkpoint),
        crop_size=32,
        resize_size=32,
        epochs=1,
        batch_size=4,
        out=str(tmp_path / "ft.pt"),
    )
    ckpt = checkpoint.load(train.train(config))
    assert ckpt.labels == ["blue", "green"]
    assert ckpt.build_model().fc.out_features == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"init": "missing.pth"}, "missing.pth: no such file"),
    ],
    ids=["epochs", "val-fraction", "missing-init"],
)
def test_bad_training_options_are_named(
    options: dict[str, object], message: str, color_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=message):
        train.train(TrainConfig(data=str(color_folder), out=str(tmp_path / "x.pt"), **options))  # type: ignore[arg-type]

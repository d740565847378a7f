"""Every bad input: one clear line naming the file and the problem, exit 1, nothing written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.__main__ import main
from model.export import read_metadata
from model.resnet import build

Setup = dict[str, Path]


def corrupt_checkpoint(tmp: Path) -> list[str]:
    (tmp / "bad.pth").write_bytes(b"\x80\x02not really a pickle" * 10)
    return ["export", str(tmp / "bad.pth"), "--out", str(tmp / "out.onnx")]


def truncated_checkpoint(tmp: Path) -> list[str]:
    torch.save(build("resnet18", num_classes=2).state_dict(), tmp / "full.pth")
    (tmp / "cut.pth").write_bytes((tmp / "full.pth").read_bytes()[:5000])
    return ["export", str(tmp / "cut.pth"), "--out", str(tmp / "out.onnx")]


def other_architecture(tmp: Path) -> list[str]:
    weights = {
        "features.0.weight": torch.zeros(64, 3, 3, 3),
        "classifier.weight": torch.zeros(10, 64),
    }
    torch.save(weights, tmp / "vgg.pth")
    return ["export", str(tmp / "vgg.pth"), "--out", str(tmp / "out.onnx")]


def wrong_shapes(tmp: Path) -> list[str]:
    weights = build("resnet50", num_classes=10).state_dict()
    weights["layer2.0.conv2.weight"] = torch.zeros(128, 128, 5, 5)
    torch.save(weights, tmp / "odd.pth")
    return ["export", str(tmp / "odd.pth"), "--out", str(tmp / "out.onnx")]


def missing_checkpoint(tmp: Path) -> list[str]:
    return ["export", str(tmp / "nope.pth"), "--out", str(tmp / "out.onnx")]


def empty_dataset(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["train", "--data", str(tmp / "empty"), "--out", str(tmp / "out.pt")]


def class_without_images(tmp: Path) -> list[str]:
    (tmp / "ds" / "cat").mkdir(parents=True)
    (tmp / "ds" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp / "ds" / "cat" / "a.png")
    (tmp / "ds" / "dog" / "notes.txt").write_text("no images here")
    return ["train", "--data", str(tmp / "ds"), "--out", str(tmp / "out.pt")]


def unreadable_image(tmp: Path) -> list[str]:
    for name in ("cat", "dog"):
        (tmp / "ds" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp / "ds" / name / "ok.png")
    (tmp / "ds" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return ["train", "--data", str(tmp / "ds"), "--out", str(tmp / "out.pt")]


def unwritable_output(tmp: Path) -> list[str]:
    torch.save(build("resnet18", num_classes=1000).state_dict(), tmp / "r18.pth")
    (tmp / "file").write_text("a file, not a folder")
    return ["export", str(tmp / "r18.pth"), "--out", str(tmp / "file" / "model.onnx")]


CASES = [
    (missing_checkpoint, "nope.pth: no such file"),
    (corrupt_checkpoint, "bad.pth: not a readable PyTorch checkpoint"),
    (truncated_checkpoint, "cut.pth: not a readable PyTorch checkpoint"),
    (other_architecture, "not a torchvision ResNet"),
    (wrong_shapes, "weights do not fit resnet50"),
    (empty_dataset, "empty: no class folders"),
    (class_without_images, "class folder 'dog' has no images"),
    (unreadable_image, "cannot read image .*broken.jpg"),
    (unwritable_output, "cannot write .*model.onnx"),
]


@pytest.mark.parametrize(("make", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_one_line_exit_1_no_artifact(
    make: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = make(tmp_path)  # type: ignore[operator]
    before = set(tmp_path.rglob("*"))
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert set(tmp_path.rglob("*")) == before, "something was written"


def test_unknown_option_fails_loudly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epoch", "3"])
    assert exc.value.code == 2
    assert "--epoch" in capsys.readouterr().err


def test_process_exit_code_is_nonzero(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "model", "export", str(tmp_path / "missing.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: checkpoint {tmp_path / 'missing.pth'}: no such file"


def test_export_names_the_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "shapes.onnx"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--name", "shapes"]) == 0
    assert read_metadata(out).name == "shapes"

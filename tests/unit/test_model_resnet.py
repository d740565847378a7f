import pytest
import torch
from torch import nn

from model.resnet import BasicBlock, Bottleneck, build, resnet50

STAGES = [3, 4, 6, 3]
WIDTHS = [64, 128, 256, 512]


def torchvision_resnet50_layout() -> dict[str, tuple[int, ...]]:
    """The key -> shape table of torchvision's resnet50 state_dict, written from its definition."""
    layout: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.{name}"] = (c,)
        layout[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for stage, (blocks, width) in enumerate(zip(STAGES, WIDTHS, strict=True), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            layout[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{p}.bn1", width)
            layout[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            layout[f"{p}.conv3.weight"] = (width * 4, width, 1, 1)
            bn(f"{p}.bn3", width * 4)
            if b == 0:
                layout[f"{p}.downsample.0.weight"] = (width * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", width * 4)
            inplanes = width * 4
    layout["fc.weight"] = (1000, 2048)
    layout["fc.bias"] = (1000,)
    return layout


def test_resnet50_has_25_557_032_parameters() -> None:
    assert sum(p.numel() for p in resnet50().parameters()) == 25_557_032


def test_state_dict_matches_torchvision_layout() -> None:
    ours = {k: tuple(v.shape) for k, v in resnet50().state_dict().items()}
    assert ours == torchvision_resnet50_layout()


def test_torchvision_shaped_state_dict_loads_strictly() -> None:
    layout = torchvision_resnet50_layout()
    weights = {
        k: torch.zeros(s, dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(s)
        for k, s in layout.items()
    }
    resnet50().load_state_dict(weights, strict=True)


def test_fifty_layers_49_main_path_convolutions_and_one_fc() -> None:
    net = resnet50()
    convs = [
        n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n
    ]
    assert len(convs) == 49
    assert [n for n, m in net.named_modules() if isinstance(m, nn.Linear)] == ["fc"]
    assert all(isinstance(m, nn.BatchNorm2d) for n, m in net.named_modules() if n.endswith("bn3"))


def test_projection_shortcut_only_where_shape_changes() -> None:
    net = resnet50()
    for stage, blocks in enumerate(STAGES, start=1):
        layer = getattr(net, f"layer{stage}")
        kinds = ["projection" if blk.downsample is not None else "identity" for blk in layer]
        assert kinds == ["projection"] + ["identity"] * (blocks - 1)
        first = layer[0]
        assert isinstance(first, Bottleneck)
        # v1.5: the stride sits on the 3x3 conv, the 1x1 reduction keeps stride 1.
        assert first.conv1.stride == (1, 1)
        assert first.conv2.stride == ((1, 1) if stage == 1 else (2, 2))
        assert isinstance(first.downsample, nn.Sequential)
        assert isinstance(first.downsample[0], nn.Conv2d)
        assert isinstance(first.downsample[1], nn.BatchNorm2d)


@pytest.mark.parametrize(
    ("num_classes", "size"), [(1000, 224), (10, 32)], ids=["imagenet", "digits"]
)
def test_output_shape(num_classes: int, size: int) -> None:
    net = resnet50(num_classes=num_classes).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, size, size)).shape == (2, num_classes)


def test_zero_init_residual_starts_blocks_as_identity() -> None:
    net = resnet50(zero_init_residual=True)
    assert all(not m.bn3.weight.detach().any() for m in net.modules() if isinstance(m, Bottleneck))


@pytest.mark.parametrize(
    ("arch", "params"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet101", 44_549_160)],
)
def test_other_depths_match_torchvision_parameter_counts(arch: str, params: int) -> None:
    net = build(arch)
    assert sum(p.numel() for p in net.parameters()) == params
    assert isinstance(net.layer1[0], BasicBlock if params < 25_000_000 else Bottleneck)


@pytest.mark.parametrize(
    "kwargs",
    [{"arch": "resnet51"}, {"arch": "resnet50", "num_classes": 0}],
    ids=["arch", "classes"],
)
def test_rejects_bad_configuration_naming_the_value(kwargs: dict[str, object]) -> None:
    arch = str(kwargs.pop("arch"))
    with pytest.raises(ValueError, match=r"resnet51|num_classes"):
        build(arch, **kwargs)  # type: ignore[arg-type]

"""CRAFT's supporting pieces: the LPIPS metric (weights in the official and torchvision key layouts) and the
DiffusionForensics folder layout with its label convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unigendet.config.loader import ConfigError
from unigendet.data.layouts import LayoutError, index_layout
from unigendet.detectors.lpips import LPIPS, LPIPSConfig


def _alexnet_torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the key names and shapes of torchvision's ``alexnet().state_dict()``."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5), "features.6": (384, 192, 3, 3),
              "features.8": (256, 384, 3, 3), "features.10": (256, 256, 3, 3)}
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(shape, generator=g) * 0.05
        state[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    state["classifier.1.weight"] = torch.randn(8, 4, generator=g)  # the classifier part is not LPIPS's
    return state


def test_lpips_loads_official_linear_heads_and_a_torchvision_trunk(tmp_path):
    trunk = _alexnet_torchvision_state()
    widths = (64, 192, 384, 256, 256)
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(widths)}
    torch.save(trunk, tmp_path / "alexnet.pth")
    save_file(linear, str(tmp_path / "alex.safetensors"))
    metric = LPIPS.build(LPIPSConfig(net="alex", trunk_path=str(tmp_path / "alexnet.pth"),
                                     linear_path=str(tmp_path / "alex.safetensors"), backend="builtin"))
    torch.testing.assert_close(metric.features[3].weight, trunk["features.3.weight"])
    torch.testing.assert_close(metric.lin[4].weight, linear["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in metric.parameters())

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert metric(x, x).abs().max() < 1e-6
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(metric(y, x), d)
    # The definition: per tap, channel-normalised features, squared difference, 1x1 weights, spatial mean; summed.
    manual = 0
    for fx, fy, w in zip(metric.tap_features(x), metric.tap_features(y), linear.values()):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        manual = manual + ((nx - ny) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(d, manual)
    assert torch.allclose(metric.distance_map(x, y).mean(dim=(1, 2, 3)), d, rtol=0.5)

    linear["lin5.model.1.weight"] = torch.rand(1, 8, 1, 1)
    with pytest.raises(ConfigError, match="unexpected"):
        metric.load_linear(linear, "bad heads")
    with pytest.raises(ConfigError, match="features"):
        metric.load_trunk({"classifier.1.weight": torch.zeros(1)}, "no trunk")


def test_tiny_lpips_is_random_but_seeded_and_narrow():
    a = LPIPS.build(LPIPSConfig(width_divisor=16, backend="builtin"))
    b = LPIPS.build(LPIPSConfig(width_divisor=16, backend="builtin"))
    assert [lin.in_channels for lin in a.lin] == [4, 8, 16, 32, 32]
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(a(x, y), b(x, y))
    with pytest.raises(ConfigError, match="width_divisor"):
        LPIPSConfig(width_divisor=16, trunk_path="vgg16.pth").validate()


def _write(folder, n: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i}.png")


def test_diffusionforensics_layout_labels_groups_and_pairing(tmp_path):
    images = tmp_path / "DiffusionForensics" / "images"
    _write(images / "train" / "imagenet" / "real" / "n01440764")   # ImageNet reals sit in class folders
    _write(images / "train" / "imagenet" / "adm" / "0")
    _write(images / "test" / "celebahq" / "real", 3)
    _write(images / "test" / "celebahq" / "sdv2")
    _write(images / "test" / "celebahq" / "if")

    train = index_layout("diffusionforensics", tmp_path / "DiffusionForensics", splits=["train"])
    assert {(r.group, r.label) for r in train.records} == {("imagenet/real", 0), ("imagenet/adm", 1)}
    assert len(train.records) == 4 and train.root == images.resolve()

    paired = index_layout("diffusionforensics", images, splits=["test"], pair_reals=True)
    per_group = paired.summary()["per_split"]["test"]
    assert per_group == {"celebahq/if": {"real": 3, "fake": 2}, "celebahq/sdv2": {"real": 3, "fake": 2}}
    only = index_layout("diffusionforensics", images, splits=["test"], groups=["sdv2"])
    assert {r.group for r in only.records} == {"celebahq/sdv2", "celebahq/real"}

    with pytest.raises(LayoutError, match="domain"):
        index_layout("diffusionforensics", images, splits=["test"], domains=["lsun_bedroom"])
    _write(images / "val" / "imagenet" / "adm")
    with pytest.raises(LayoutError, match="'real' folder"):
        index_layout("diffusionforensics", images, splits=["val"])

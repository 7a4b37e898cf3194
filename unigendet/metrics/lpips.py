"""LPIPS v0.1 with the AlexNet trunk (``lpips.LPIPS(net="alex", version="0.1")``, the package default), in plain torch.

Nothing is downloaded: the user supplies torchvision's AlexNet file and lpips' v0.1 ``alex.pth`` heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ALEXNET_WEIGHTS_NAME = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_WEIGHTS_NAME = "alex.pth"
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
# Indices into AlexNet.features after which LPIPS taps a ReLU output.
_TAPS = (1, 4, 7, 9, 11)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``AlexNet.features`` layout (same indices, hence the same state-dict keys)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    )


class NetLinLayer(nn.Module):
    """lpips' per-layer head: dropout (a no-op in eval) then a bias-free 1×1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """``forward(x0, x1)`` on RGB in [-1, 1] ``[N, 3, H, W]`` -> distances ``[N]``.

    d(x0, x1) = Σ_l mean_hw( w_l · (n(f_l(s(x0))) − n(f_l(s(x1))))² ), where

    * ``s`` is the v0.1 scaling layer ``(x − shift) / scale`` with shift (−.030, −.088, −.188),
      scale (.458, .448, .450) on inputs in [-1, 1];
    * ``f_l`` are the five ReLU outputs of torchvision's AlexNet ``features`` (after conv1..conv5: 64, 192, 384,
      256, 256 channels);
    * ``n`` unit-normalises each spatial position over channels (``x / (‖x‖₂ + 1e-10)``);
    * ``w_l`` is the learned non-negative 1×1 convolution ("lin" layer) of layer l, then the spatial mean.
    """

    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        self.lins = nn.ModuleList(NetLinLayer(c) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised ReLU feature maps of scaled input ``x``."""
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(unit_normalize(x))
        return out

    def distance(self, taps0: list[torch.Tensor], taps1: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS ``[N]`` between two batches of :meth:`taps` (lets callers reuse one image's taps in many pairs)."""
        total = taps0[0].new_zeros(taps0[0].shape[0])
        for lin, f0, f1 in zip(self.lins, taps0, taps1):
            total = total + lin.model((f0 - f1) ** 2).mean(dim=(1, 2, 3))
        return total

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.distance(self.taps(x0), self.taps(x1))


def _load_tensors(path: str | Path, what: str, expected_name: str) -> dict[str, torch.Tensor]:
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found at {path}: supply the file {expected_name} (nothing is downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_lpips(alexnet_path: str | Path | None, lin_path: str | Path | None,
               device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS(alex, v0.1) from the torchvision AlexNet file and the lpips ``alex.pth`` heads (both strict).

    The trunk file is torchvision's ImageNet AlexNet ``alexnet-owt-7be5be79.pth``
    (``features.{0,3,6,8,10}.{weight,bias}``; its ``classifier.*`` entries are ignored); the heads file is lpips'
    ``weights/v0.1/alex.pth`` (``lin{0..4}.model.1.weight`` of shape ``[1, C, 1, 1]``; ``model.0`` is a
    parameter-free dropout).
    """
    trunk = _load_tensors(alexnet_path, "LPIPS AlexNet trunk weights", ALEXNET_WEIGHTS_NAME)
    heads = _load_tensors(lin_path, "LPIPS v0.1 linear-head weights", f"lpips/weights/v0.1/{LPIPS_LIN_WEIGHTS_NAME}")
    model = LPIPS()
    features = {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")}
    other = sorted(k for k in trunk if not k.startswith(("features.", "classifier.")))
    if other:
        raise ValueError(f"{alexnet_path}: unexpected entries {other[:5]} for a torchvision AlexNet")
    lins = {}
    for key, value in heads.items():
        index, _, rest = key.removeprefix("lin").partition(".")
        if not key.startswith("lin") or not index.isdigit():
            raise ValueError(f"{lin_path}: unexpected entry {key!r} for lpips linear heads (lin<k>.model.1.weight)")
        lins[f"{index}.{rest}"] = value
    try:
        model.features.load_state_dict(features, strict=True)
        model.lins.load_state_dict(lins, strict=True)
    except RuntimeError as err:
        raise ValueError(f"LPIPS weights do not match AlexNet / lpips v0.1 alex heads: {err}") from err
    return model.eval().to(device)

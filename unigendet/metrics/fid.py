"""Fréchet Inception Distance as pytorch-fid computes it (the UniGenDet FID protocol), in plain torch: the FID
Inception-v3, the official image preprocessing, activation statistics and the distance.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub names checkpoints "<name>-<first hex digits of the file's sha256>.<ext>".
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_INPUT_SIZE = 299
FID_DIMS = 2048
FID_NUM_CLASSES = 1008
# pytorch-fid's --dims choices (feature width of each output block).
FEATURE_DIMS = (64, 192, 768, 2048)


# --------------------------------------------------------------------------------------------------
# Network


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as TensorFlow), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1; 224 + ``pool_features`` channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b-e: factorised 7×7 branches with ``channels_7x7`` inner width; 768 channels out."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``) and Mixed_7c (``pool="max"``: the FID graph max-pools here): 2048 channels out."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``forward`` maps RGB in [0, 1] ``[N, 3, H, W]`` to pool3 features ``[N, 2048]``.

    This is the "2015-12-05" TensorFlow graph as pytorch-fid ports it: torchvision's Inception-v3 layout with 1008
    classes and no auxiliary head, whose Mixed_5b-d / 6b-e / 7b / 7c blocks pool differently from torchvision's:
    the branch-pool average pools skip padded zeros (``count_include_pad=False``, as TensorFlow) and Mixed_7c
    pools with a 3×3 *max* pool. Parameter names and shapes equal those of ``pt_inception-2015-12-05-6726825d.pth``
    (the file pytorch-fid downloads), so it loads with ``strict=True``; ``fc`` (2048 -> 1008) is in the file and
    in this module but unused. Inputs are bilinearly resized to 299×299 (``align_corners=False``) and scaled to
    [-1, 1]; features are the 2048-d global average pool of Mixed_7c ("pool3").
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        # The checkpoint's 1008-way classifier; kept so the official file loads strictly, never evaluated.
        self.fc = nn.Linear(FID_DIMS, FID_NUM_CLASSES)

    def forward(self, x: torch.Tensor, dims: int = FID_DIMS) -> torch.Tensor:
        """Features ``[N, dims]``: the global average pool of the block pytorch-fid picks for ``dims``
        (64: first max pool, 192: second max pool, 768: Mixed_6e, 2048: Mixed_7c = pool3); later blocks
        are not run."""
        if dims not in FEATURE_DIMS:
            raise ValueError(f"dims must be one of {FEATURE_DIMS}, got {dims}")
        x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for block in self._blocks()[: FEATURE_DIMS.index(dims) + 1]:
            for layer in block:
                x = layer(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

    def _blocks(self) -> list[list]:
        """pytorch-fid's four blocks, ending at 64, 192, 768 and 2048 channels."""
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, _max_pool_3x3_s2],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, _max_pool_3x3_s2],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d,
             self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]


def _max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_inception_weights(weights_path: str | Path | None) -> Path:
    """``weights_path`` as a Path; FileNotFoundError naming the expected file when it is not there."""
    if weights_path is None or not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {weights_path}: pass --inception-weights PATH to the file "
            f"{FID_WEIGHTS_NAME} (pytorch-fid's 'fid_weights' release asset; nothing is downloaded)"
        )
    return Path(weights_path)


def load_fid_inception(weights_path: str | Path | None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with the weights file ``weights_path`` (strict load), in eval mode on ``device``.

    No download ever happens: the file must be supplied (pytorch-fid's release asset ``pt_inception-2015-12-05-
    6726825d.pth``)."""
    require_inception_weights(weights_path)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path} does not have the layout of {FID_WEIGHTS_NAME}: {err}") from err
    return model.eval().to(device)


def weights_record(weights_path: str | Path) -> dict:
    """Provenance of an Inception weights file: its sha256 and whether it matches the official file's."""
    sha = file_sha256(weights_path)
    official = sha.startswith(FID_WEIGHTS_SHA256_PREFIX)
    if not official:
        logger.warning("%s is not %s (sha256 %s…): FID values are not comparable with the paper's",
                       weights_path, FID_WEIGHTS_NAME, sha[:8])
    return {"path": str(weights_path), "sha256": sha, "official_pytorch_fid_weights": official}


# --------------------------------------------------------------------------------------------------
# Images -> activations -> statistics


def fid_preprocess(image: Image.Image) -> Image.Image:
    """RGB, centre square crop (short side) if not square, 299×299 LANCZOS if not that size, as the official
    ``fid_compute.py`` does (the crop box is a float box that PIL rounds itself)."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height:
        side = min(width, height)
        # The official float box; PIL rounds it the same way here as there.
        image = image.crop(((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2))
    if image.size != (FID_INPUT_SIZE, FID_INPUT_SIZE):
        image = image.resize((FID_INPUT_SIZE, FID_INPUT_SIZE), Image.LANCZOS)
    return image


def image_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB -> float ``[3, H, W]`` in [0, 1] (``ToTensor``, what pytorch-fid applies to the saved,
    lossless PNG)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)


def _batches(images: Iterable[Image.Image], batch_size: int) -> Iterator[list[Image.Image]]:
    batch: list[Image.Image] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def inception_activations(model: FIDInceptionV3, images: Iterable[Image.Image], batch_size: int = 50,
                          dims: int = FID_DIMS, preprocess: bool = True) -> np.ndarray:
    """Activations ``[N, dims]`` (float64, as pytorch-fid's array; pool3 for 2048) of PIL ``images``, in order.
    ``preprocess`` applies :func:`fid_preprocess` (crop + 299 LANCZOS) first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters())
    rows = []
    for batch in _batches(images, batch_size):
        prepared = [fid_preprocess(im) if preprocess else im for im in batch]
        x = torch.stack([image_to_unit_tensor(im) for im in prepared]).to(param.device, param.dtype)
        rows.append(model(x, dims).double().cpu().numpy())
    if not rows:
        return np.empty((0, dims))
    return np.concatenate(rows)


def activation_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of activations ``[N, D]`` (``np.mean`` / ``np.cov(rowvar=False)`` in float64); Σ needs N >= 2."""
    activations = np.asarray(activations, dtype=np.float64)
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(f"need at least 2 activation rows [N, D] for a covariance, got shape {activations.shape}")
    return activations.mean(axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1Σ2)^½).

    As pytorch-fid: a non-finite square root (near-singular product) is retried with ``eps·I`` added to both
    covariances; an imaginary part from round-off is dropped when the diagonal's is below 1e-3, otherwise
    ValueError."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the mean length {mu1.shape[0]}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: square root has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_activations(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*activation_statistics(real), *activation_statistics(fake))


# --------------------------------------------------------------------------------------------------
# Cache


def save_activations(path: str | Path, activations: np.ndarray, fingerprint: str) -> None:
    """Write activations, their statistics and the ``fingerprint`` (what they were computed from) to ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = activation_statistics(activations)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, activations=activations, mu=mu, sigma=sigma, fingerprint=np.array(fingerprint))
    tmp.replace(path)


def load_cached_activations(path: str | Path, fingerprint: str) -> np.ndarray | None:
    """The cached activations if ``path`` exists and was computed from the same ``fingerprint``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as cached:
        if str(cached["fingerprint"]) != fingerprint:
            logger.info("%s is stale (different images or weights); recomputing", path)
            return None
        return cached["activations"]


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) from an ``.npz`` with ``mu`` and ``sigma`` (ours or pytorch-fid's)."""
    with np.load(path) as f:
        return f["mu"][:], f["sigma"][:]

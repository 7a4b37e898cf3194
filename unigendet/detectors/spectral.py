"""Spectral detector: 2-D FFT log-magnitude map of the grayscale image, scored by a small learned model or by
distance to a reference distribution of real images.

Map (float32 throughout, never float16, which would flatten the weak high-frequency peaks that generators
leave): grayscale in [0, 255] -> subtract the mean (DC) -> ``fft2`` -> ``fftshift`` -> ``log1p(|.|)``. With
``fft_norm: ortho`` (default) the transform is scaled by 1/sqrt(H W), so maps of different image sizes are
comparable; ``backward`` is the unscaled transform. Images larger than ``max_side`` are centre-cropped (never
resized: resampling would move and blur the very peaks being looked for).

Features (``radial_bins`` + 2): the azimuthal mean of the map in ``radial_bins`` rings of normalised radius
(1 = the Nyquist frequency along the shorter axis; corners beyond it are left out), and the max and the
``peak_quantile`` quantile of the residual ``map - median_filter(map)`` outside radius ``hf_radius``: periodic
artefacts (an 8-pixel grid, upsampling) are isolated bright bins.

Scores: ``mode: learned`` standardises the features (statistics from :meth:`SpectralDetector.fit_statistics`)
and applies a logistic regression (``hidden: 0``) or a one-hidden-layer MLP, trained with BCE like any head
(or at once with :meth:`SpectralDetector.fit`); ``mode: reference`` measures the Mahalanobis distance (shrunk
covariance) of the standardised features to real images' statistics and maps it through the empirical CDF of
real images' distances (nothing trains). ``reference_features: all`` (default) uses the profile and the peak
statistics; ``profile`` the radial profile alone, where ring averages dilute a few periodic peaks.

Works on PIL images of any size; :meth:`SpectralDetector.analyze` returns the map with the score for audit
records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import Detector, register_detector

logger = logging.getLogger(__name__)


@dataclass
class SpectralConfig:
    mode: Literal["learned", "reference"] = "learned"
    max_side: int | None = 512
    fft_norm: Literal["ortho", "backward"] = "ortho"
    radial_bins: int = 32
    hf_radius: float = 0.25
    median_kernel: int = 5
    peak_quantile: float = 0.99
    hidden: int = 0
    l2: float = 1e-3
    shrinkage: float = 0.1
    reference_features: Literal["all", "profile"] = "all"
    init_seed: int = 0

    def validate(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"max_side must be >= 8 pixels or null, got {self.max_side}")
        if self.radial_bins < 2:
            raise ConfigError(f"radial_bins must be >= 2, got {self.radial_bins}")
        if not 0.0 <= self.hf_radius < 1.0:
            raise ConfigError(f"hf_radius must be in [0, 1), got {self.hf_radius}")
        if self.median_kernel < 3 or self.median_kernel % 2 == 0:
            raise ConfigError(f"median_kernel must be odd and >= 3, got {self.median_kernel}")
        if not 0.0 < self.peak_quantile <= 1.0:
            raise ConfigError(f"peak_quantile must be in (0, 1], got {self.peak_quantile}")
        if self.hidden < 0 or self.l2 < 0 or not 0.0 <= self.shrinkage <= 1.0:
            raise ConfigError("hidden and l2 must be >= 0 and shrinkage in [0, 1]")

    @property
    def num_features(self) -> int:
        return self.radial_bins + 2

    @property
    def num_reference_features(self) -> int:
        return self.num_features if self.reference_features == "all" else self.radial_bins


@dataclass
class SpectralAnalysis:
    """One image's spectral map (float32 [H, W], DC at (H // 2, W // 2)), its features and p(fake)."""

    map: torch.Tensor
    features: torch.Tensor
    score: float


# ---------------------------------------------------------------------------------------------- map and features
def grayscale(image: Image.Image, max_side: int | None = None) -> torch.Tensor:
    """Luma in [0, 255] as float32 [H, W]; centre-cropped to ``max_side`` when larger."""
    gray = image.convert("L")
    w, h = gray.size
    if max_side is not None and (w > max_side or h > max_side):
        cw, ch = min(w, max_side), min(h, max_side)
        left, top = (w - cw) // 2, (h - ch) // 2
        gray = gray.crop((left, top, left + cw, top + ch))
    return torch.from_numpy(np.asarray(gray, dtype=np.float32).copy())


def spectral_map(gray: torch.Tensor, norm: str = "ortho") -> torch.Tensor:
    """log1p |fftshift(fft2(gray - mean))| as float32 [H, W]; the input must be float32."""
    if gray.dtype != torch.float32:
        raise TypeError(f"spectral maps are computed in float32, got {gray.dtype}")
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray - gray.mean(), norm=norm))
    return torch.log1p(spectrum.abs())


def normalised_radius(height: int, width: int) -> torch.Tensor:
    """Frequency radius of each shifted FFT bin, 1 = Nyquist along the shorter axis -> [H, W]."""
    fy = (torch.arange(height, dtype=torch.float32) - height // 2) / height
    fx = (torch.arange(width, dtype=torch.float32) - width // 2) / width
    yy, xx = torch.meshgrid(fy, fx, indexing="ij")
    return torch.sqrt(yy ** 2 + xx ** 2) / 0.5


def radial_profile(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Mean of ``values`` [H, W] in ``bins`` rings of normalised radius over [0, 1) -> [bins] (empty rings: 0)."""
    radius = normalised_radius(*values.shape)
    index = (radius * bins).floor().long()
    inside = index < bins
    sums = torch.zeros(bins).index_add_(0, index[inside], values[inside])
    counts = torch.zeros(bins).index_add_(0, index[inside], torch.ones_like(values[inside]))
    return sums / counts.clamp_min(1.0)


def median_filter(values: torch.Tensor, kernel: int) -> torch.Tensor:
    """k x k median of [H, W] with reflected borders (replicated where the image is smaller than the kernel)."""
    pad = kernel // 2
    mode = "reflect" if min(values.shape) > pad else "replicate"
    padded = F.pad(values[None, None], (pad, pad, pad, pad), mode=mode)
    patches = F.unfold(padded, kernel)  # [1, k*k, H*W]
    return patches.median(dim=1).values.view(values.shape)


def peak_features(values: torch.Tensor, kernel: int, hf_radius: float, quantile: float) -> torch.Tensor:
    """[max, quantile] of ``values - median_filter(values)`` at normalised radius > ``hf_radius`` -> [2]."""
    residual = values - median_filter(values, kernel)
    outside = residual[normalised_radius(*values.shape) > hf_radius]
    if outside.numel() == 0:
        return torch.zeros(2)
    return torch.stack([outside.max(), torch.quantile(outside, quantile)])


def spectral_features(values: torch.Tensor, cfg: SpectralConfig) -> torch.Tensor:
    """Radial profile + high-frequency peak statistics of one map -> [radial_bins + 2] float32."""
    return torch.cat([radial_profile(values, cfg.radial_bins),
                      peak_features(values, cfg.median_kernel, cfg.hf_radius, cfg.peak_quantile)])


def spectral_map_image(values) -> Image.Image:
    """A 2-D map (tensor or array) as a grey 8-bit image, its finite range scaled to 0-255 (a flat map: all 0);
    for looking at a map, or for showing it to a model that reads images."""
    array = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"a spectral map is 2-D, got shape {array.shape}")
    finite = np.isfinite(array)
    low, high = (array[finite].min(), array[finite].max()) if finite.any() else (0.0, 0.0)
    scaled = np.zeros_like(array) if high <= low else (np.where(finite, array, low) - low) / (high - low)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L")


def _mahalanobis(profiles: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    centred = profiles - mean
    return torch.sqrt(torch.einsum("bi,ij,bj->b", centred, precision, centred).clamp_min(0.0))


# ---------------------------------------------------------------------------------------------- detector
@register_detector("spectral")
class SpectralDetector(Detector):
    config_class = SpectralConfig
    default_lr = 1e-2

    def __init__(self, config: SpectralConfig):
        super().__init__(config)
        n = config.num_features
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        if config.mode == "learned":
            self.scorer = (nn.Linear(n, 1) if config.hidden == 0 else
                           nn.Sequential(nn.Linear(n, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1)))
        else:
            m = config.num_reference_features
            self.register_buffer("reference_mean", torch.zeros(m))
            self.register_buffer("reference_precision", torch.eye(m))
            self.register_buffer("reference_distances", torch.zeros(0))

    @classmethod
    def build(cls, config: SpectralConfig) -> SpectralDetector:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            return cls(config)

    # ----------------------------------------------------------------------------------------------- features
    def spectral_map(self, image: Image.Image) -> torch.Tensor:
        """The float32 log-magnitude map of ``image`` (after the ``max_side`` centre crop)."""
        return spectral_map(grayscale(image, self.config.max_side), self.config.fft_norm)

    def preprocess(self, images: Sequence[Image.Image], *, train: bool = False,
                   **extras: Any) -> dict[str, torch.Tensor]:
        if extras:
            raise TypeError(f"the spectral detector takes no per-image extras, got {sorted(extras)}")
        rows = [spectral_features(self.spectral_map(image), self.config) for image in images]
        return {"spectral_features": torch.stack(rows) if rows else torch.zeros(0, self.config.num_features)}

    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["spectral_features"].to(self.device)

    def feature_settings(self, train: bool) -> dict[str, Any]:
        settings = asdict(self.config)
        for name in ("mode", "hidden", "l2", "shrinkage", "init_seed"):
            settings.pop(name)
        return settings

    # ----------------------------------------------------------------------------------------------- scoring
    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "learned":
            standard = (features - self.feature_mean) / self.feature_std
            return self.scorer(standard).squeeze(-1)
        return torch.logit(self.reference_score(features), eps=1e-6)

    def reference_score(self, features: torch.Tensor) -> torch.Tensor:
        """Empirical CDF, over the reference reals, of the Mahalanobis distance of each radial profile."""
        if self.reference_distances.numel() == 0:
            raise RuntimeError("reference mode needs fit_statistics() with real images first")
        distance = self.mahalanobis(self._reference_view(features))
        ranks = torch.searchsorted(self.reference_distances, distance.contiguous(), right=True)
        return ranks.float() / self.reference_distances.numel()

    def _reference_view(self, features: torch.Tensor) -> torch.Tensor:
        """The features the reference distribution is over, standardised (``all``: profile and peaks)."""
        standard = (features - self.feature_mean) / self.feature_std
        return standard[:, : self.config.num_reference_features]

    def mahalanobis(self, profiles: torch.Tensor) -> torch.Tensor:
        return _mahalanobis(profiles, self.reference_mean, self.reference_precision)

    def fit_statistics(self, images: Sequence[Image.Image], labels: Sequence[int]) -> None:
        """Feature standardisation (learned mode) or the real-image reference distribution (reference mode)."""
        features = self.preprocess(images)["spectral_features"]
        self.set_statistics(features, torch.as_tensor(list(labels)))

    @torch.no_grad()
    def set_statistics(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Standardisation from all images (learned mode) or from the real ones only (reference mode: fakes never
        shape the reference), then the reference distribution."""
        features = features.float().cpu()
        if self.config.mode == "reference":
            features = features[labels.cpu() == 0]
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(features[0]))
        if self.config.mode == "reference":
            self._fit_reference(self._reference_view(features))

    def _gaussian(self, profiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and shrunk-covariance precision of radial profiles."""
        mean = profiles.mean(0)
        covariance = torch.cov(profiles.T).reshape(len(mean), len(mean))
        shrink = self.config.shrinkage
        target = torch.eye(len(mean)) * covariance.diagonal().mean().clamp_min(1e-8)
        return mean, torch.linalg.pinv((1 - shrink) * covariance + shrink * target)

    def _fit_reference(self, profiles: torch.Tensor) -> None:
        """Statistics from all reals; the CDF from cross-fitted distances (each half scored with the other half's
        statistics), because in-sample Mahalanobis distances are too small and would put most unseen reals at
        the top of the CDF."""
        if len(profiles) < 4:
            raise ValueError(f"reference mode needs at least 4 real images, got {len(profiles)}")
        halves = (profiles[0::2], profiles[1::2])
        distances = []
        for fit, held_out in (halves, halves[::-1]):
            distances.append(_mahalanobis(held_out, *self._gaussian(fit)))
        mean, precision = self._gaussian(profiles)
        self.reference_mean.copy_(mean)
        self.reference_precision.copy_(precision)
        self.reference_distances = torch.cat(distances).sort().values.to(self.feature_mean.device)

    def prepare_for_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.config.mode == "reference" and "reference_distances" in state:
            self.reference_distances = torch.zeros_like(state["reference_distances"]).to(self.feature_mean.device)

    def fit(self, images: Sequence[Image.Image], labels: Sequence[int], steps: int = 200) -> dict[str, float]:
        """Statistics, then (learned mode) full-batch L-BFGS on BCE + ``l2`` * ||weights||^2. Returns the final loss."""
        features = self.preprocess(images)["spectral_features"]
        targets = torch.as_tensor(list(labels), dtype=torch.float32)
        self.set_statistics(features, targets)
        if self.config.mode == "reference":
            return {"loss": math.nan}
        return self.fit_features(features.to(self.device), targets.to(self.device), steps)

    def fit_features(self, features: torch.Tensor, targets: torch.Tensor, steps: int = 200) -> dict[str, float]:
        params = [p for _, p in self.trainable_parameters()]
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
        self.train()

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(self.head_logits(features), targets)
            loss = loss + self.config.l2 * sum(p.pow(2).sum() for n, p in self.named_parameters()
                                               if p.requires_grad and n.endswith("weight"))
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        self.eval()
        return {"loss": float(loss.detach())}

    def analyze(self, image: Image.Image) -> SpectralAnalysis:
        """Map, features and p(fake) of one image (for a cascade's audit record)."""
        values = self.spectral_map(image)
        features = spectral_features(values, self.config)
        with torch.no_grad():
            was_training = self.training
            self.eval()
            score = float(torch.sigmoid(self.head_logits(features[None].to(self.device)))[0])
            self.train(was_training)
        return SpectralAnalysis(map=values, features=features, score=score)

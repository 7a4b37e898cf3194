"""CoRIT, Contrastive Regional Injection Transformer, on a frozen CLIP ViT; only a small head trains (with SAM).

Per image x (and its self-blended counterpart x~, see :mod:`unigendet.detectors.corit_regions`), with K regions
R_1..R_K of the patch grid and hidden states X^l (patches), c^l (CLS) of CLIP layer l = 0..L:

* contrastive gradient proxy ``g_i^l = x_i^l - x~_i^l`` (two frozen passes, no gradients);
* region anchor ``a_k^l`` = mean of g over R_k, direction ``a^_k = a_k / ||a_k||``;
* refinement mask ``M_ki^l = [i in R_k] * [<g_i, a^_k> >= tau * ||a_k||]``: the mean projection over the
  region is ||a_k||, so tau is relative to it (tau = -inf: the whole region; huge tau: nothing);
* region pooling ``r_k^l`` = average (or max) of the image's own tokens x_i^l under M_k (empty -> 0);
* region tokens, injected layer by layer: ``R^0 = r^0``; ``R^l = Block_l(R^{l-1} | c, X)``, then
  ``R^l += r^l``. ``region_attn: one_way`` (default): region tokens attend to everything, CLIP's own tokens do
  not see them, so those stay exactly the vanilla pass's; ``joint``: full attention, and the counterpart runs
  with its own region tokens in lock-step;
* hierarchical integration: ``z^l = [c^l; R^l_1..K]`` from layers l_m and L -> [B, 2(K+1), D];
* head: CLIP's frozen ``post_layernorm`` on each token (then the visual projection when ``head_space:
  projection``), flattened, one linear layer (or an MLP) -> logit of "fake"; ``fusion: xattn`` instead lets the
  layer-L tokens attend over the layer-l_m tokens first.

Ablations: ``use_rsi`` (off: no region tokens), ``use_rrm`` (off: pool over the whole region, no counterpart
needed), ``use_hri`` (off: layer L only), ``regions`` (any of F/Bd/Bg, or ``[random]``), ``pool``, ``tau``,
``l_m``, ``fusion``, ``region_attn``. With the first three off the model is a UniFD-style linear probe:
``Linear(post_layernorm(CLS^L))``.

Regions come from a foreground mask or face landmarks passed to ``preprocess`` (``masks=`` / ``landmarks=``,
one per image, None where absent), else from the ``saliency_top`` most CLS-attended tokens of block
``saliency_layer`` (``region_source: saliency`` forces it; ``ellipse`` uses a centred ellipse).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import Detector, register_detector, revalidate
from unigendet.detectors.clip_backbone import CLIPBackboneConfig, FrozenCLIP
from unigendet.detectors.corit_regions import (
    REGION_NAMES,
    SBIConfig,
    ellipse_hull,
    landmark_hull_mask,
    partition_from_hull,
    random_membership,
    saliency_hull,
    self_blend,
    token_membership,
)
from unigendet.detectors.images import (
    ImagePrepConfig,
    content_hash,
    mask_to_tensor,
    normalize,
    prepare_square,
    seed_from_hash,
    to_tensor01,
)
from unigendet.detectors.sam import SAM

logger = logging.getLogger(__name__)

_HEAD_ONLY_FIELDS = ("head_space", "head", "mlp_hidden", "fusion", "xattn_heads", "sam_rho", "init_seed")


def _corit_image_defaults() -> ImagePrepConfig:
    # CLIP's own preparation: shorter side to 224 (bicubic), centre crop; no augmentation.
    return ImagePrepConfig(resize=224, train_resize=224, resample="bicubic")


@dataclass
class CoRITConfig:
    """CoRIT detector; ``l_m`` and ``saliency_layer`` are 1-based CLIP layer indices (hidden state numbers)."""

    backbone: CLIPBackboneConfig = field(default_factory=CLIPBackboneConfig)
    image: ImagePrepConfig = field(default_factory=_corit_image_defaults)
    regions: list[str] = field(default_factory=lambda: list(REGION_NAMES))
    random_regions: int = 3
    region_source: Literal["auto", "saliency", "ellipse"] = "auto"
    saliency_layer: int | None = None
    saliency_top: float = 0.4
    boundary_px: int | None = None
    tau: float = 0.1
    l_m: int = 18
    use_rsi: bool = True
    use_rrm: bool = True
    use_hri: bool = True
    pool: Literal["avg", "max"] = "avg"
    region_attn: Literal["one_way", "joint"] = "one_way"
    fusion: Literal["concat", "xattn"] = "concat"
    xattn_heads: int = 8
    head_space: Literal["post_ln", "projection"] = "post_ln"
    head: Literal["linear", "mlp"] = "linear"
    mlp_hidden: int = 512
    eps: float = 1e-6
    sam_rho: float = 0.05
    sbi: SBIConfig = field(default_factory=SBIConfig)
    init_seed: int = 0

    def validate(self) -> None:
        layers = self.backbone.num_hidden_layers
        if self.regions != ["random"]:
            unknown = [r for r in self.regions if r not in REGION_NAMES]
            if not self.regions or unknown or len(set(self.regions)) != len(self.regions):
                raise ConfigError(f"regions must be distinct names from {list(REGION_NAMES)} or ['random'], "
                                 f"got {self.regions}")
        if self.random_regions < 1:
            raise ConfigError(f"random_regions must be >= 1, got {self.random_regions}")
        if self.use_hri and not 1 <= self.l_m < layers:
            raise ConfigError(f"l_m must be a layer in [1, {layers - 1}] (1-based, below the last), got {self.l_m}")
        saliency = self.resolved_saliency_layer
        if not 1 <= saliency <= layers:
            raise ConfigError(f"saliency_layer must be in [1, {layers}], got {saliency}")
        if not 0.0 < self.saliency_top <= 1.0:
            raise ConfigError(f"saliency_top must be in (0, 1], got {self.saliency_top}")
        if self.fusion == "xattn" and not self.use_hri:
            raise ConfigError("fusion: xattn needs use_hri (it attends from layer L over layer l_m)")
        if self.fusion == "xattn" and self.head_width % self.xattn_heads:
            raise ConfigError(f"xattn_heads {self.xattn_heads} must divide the head width {self.head_width}")
        if self.image.random_at_train():
            raise ConfigError("CoRIT regions follow the image geometry exactly: image.train_random_crop and "
                             "image.train_hflip must be false")
        if math.isnan(self.tau):
            raise ConfigError("tau must be a number (-.inf allowed)")

    @property
    def num_regions(self) -> int:
        return self.random_regions if self.regions == ["random"] else len(self.regions)

    @property
    def resolved_saliency_layer(self) -> int:
        return self.saliency_layer if self.saliency_layer is not None else max(1, self.backbone.num_hidden_layers // 2)

    @property
    def head_width(self) -> int:
        return self.backbone.projection_dim if self.head_space == "projection" else self.backbone.hidden_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image fed to the head: (1 + K) per integrated layer (1 without region tokens)."""
        per_layer = 1 + (self.num_regions if self.use_rsi else 0)
        return per_layer * (2 if self.use_hri else 1)

    @property
    def needs_counterpart(self) -> bool:
        return self.use_rsi and self.use_rrm


# ---------------------------------------------------------------------------------------------- CGP steps
def contrastive_gradient_proxy(tokens: torch.Tensor, counterpart: torch.Tensor) -> torch.Tensor:
    """g = x - x~ per token, float32 [B, N, D]."""
    return tokens.float() - counterpart.float()


def region_anchors(proxy: torch.Tensor, membership: torch.Tensor, eps: float = 1e-6
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [B, K, D] = mean of g over each region, a / ||a|| (zero where a is zero))."""
    weights = membership.float()
    anchor = (weights @ proxy) / weights.sum(-1, keepdim=True).clamp_min(1.0)
    norm = anchor.norm(dim=-1, keepdim=True)
    return anchor, torch.where(norm > eps, anchor / norm.clamp_min(eps), torch.zeros_like(anchor))


def refinement_masks(proxy: torch.Tensor, membership: torch.Tensor, tau: float, eps: float = 1e-6) -> torch.Tensor:
    """[B, K, N] 0/1: region members whose projection on the anchor direction is >= tau * ||anchor||."""
    anchor, direction = region_anchors(proxy, membership, eps)
    projection = torch.einsum("bnd,bkd->bkn", proxy, direction)
    threshold = torch.nan_to_num(tau * anchor.norm(dim=-1, keepdim=True), nan=0.0)
    return (membership & (projection >= threshold)).float()


def region_pool(tokens: torch.Tensor, masks: torch.Tensor, mode: str = "avg", eps: float = 1e-6) -> torch.Tensor:
    """Pool [B, N, D] tokens under [B, K, N] masks -> [B, K, D] (an empty mask pools to zeros)."""
    tokens = tokens.float()
    if mode == "avg":
        return (masks @ tokens) / (masks.sum(-1, keepdim=True) + eps)
    masked = tokens.unsqueeze(1).masked_fill(~masks.bool().unsqueeze(-1), float("-inf"))
    pooled = masked.amax(dim=2)
    return torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))


def linear_head_gsnr(inputs: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Gradient signal-to-noise ratio ``||E g||^2 / E||g - E g||^2`` of a logistic linear head, from the
    closed-form per-sample gradients ``g = (sigmoid(w.z + b) - y) * [z, 1]``."""
    z = torch.cat([inputs.float(), torch.ones(inputs.shape[0], 1, device=inputs.device)], dim=1)
    w = torch.cat([weight.detach().reshape(-1).float(), bias.detach().reshape(-1).float()])
    residual = torch.sigmoid(z @ w) - labels.float()
    grads = residual[:, None] * z
    mean = grads.mean(0)
    noise = (grads - mean).pow(2).sum(1).mean()
    return float(mean.pow(2).sum() / noise.clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- detector
@register_detector("corit")
class CoRITDetector(Detector):
    config_class = CoRITConfig
    default_lr = 1e-4

    def __init__(self, config: CoRITConfig, backbone: FrozenCLIP):
        super().__init__(config)
        self.backbone = backbone
        width = config.head_width
        self.cross_attention = (nn.MultiheadAttention(width, config.xattn_heads, batch_first=True)
                                if config.fusion == "xattn" else None)
        fused_tokens = config.num_tokens // 2 if config.fusion == "xattn" else config.num_tokens
        in_features = fused_tokens * width
        if config.head == "linear":
            self.classifier = nn.Linear(in_features, 1)
        else:
            self.classifier = nn.Sequential(nn.Linear(in_features, config.mlp_hidden), nn.GELU(),
                                            nn.Linear(config.mlp_hidden, 1))

    @classmethod
    def build(cls, config: CoRITConfig) -> CoRITDetector:
        backbone = FrozenCLIP.build(config.backbone, with_projection=config.head_space == "projection")
        revalidate(config, config.backbone.path or "the random backbone")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            return cls(config, backbone)

    def make_optimizer(self, lr: float | None = None, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """SAM (radius ``sam_rho``) around Adam over the head."""
        params = [p for _, p in self.trainable_parameters()]
        return SAM(params, torch.optim.Adam, rho=self.config.sam_rho, lr=self.default_lr if lr is None else lr,
                   weight_decay=weight_decay)

    # ----------------------------------------------------------------------------------------------- data
    def preprocess(self, images: Sequence[Image.Image], *, train: bool = False,
                   masks: Sequence[Any] | None = None, landmarks: Sequence[Any] | None = None
                   ) -> dict[str, torch.Tensor]:
        """Pixels [B, 3, S, S] in [0, 1]; hulls [B, 1, S, S] from ``masks`` (foreground, image-sized, > 0 =
        inside) or ``landmarks`` ([M, 2] pixel x, y), ``has_hull`` [B]; per-image ``seeds`` [B] (content hash)."""
        images = list(images)
        masks = list(masks) if masks is not None else [None] * len(images)
        landmarks = list(landmarks) if landmarks is not None else [None] * len(images)
        if len(masks) != len(images) or len(landmarks) != len(images):
            raise ValueError(f"{len(images)} images but {len(masks)} masks and {len(landmarks)} landmark sets")
        size = self.config.backbone.image_size
        pixels, hulls, has_hull, seeds = [], [], [], []
        for image, mask, points in zip(images, masks, landmarks):
            pixels.append(to_tensor01(prepare_square(image, size, self.config.image, train=train)))
            hull = self._hull_image(image, mask, points)
            has_hull.append(hull is not None)
            hulls.append(mask_to_tensor(prepare_square(hull, size, self.config.image, train=train, resample="nearest"))
                         if hull is not None else torch.zeros(1, size, size))
            seeds.append(seed_from_hash(content_hash(image, mask, points)))
        return {"pixels": torch.stack(pixels), "hull": torch.stack(hulls),
                "has_hull": torch.tensor(has_hull), "seeds": torch.tensor(seeds, dtype=torch.int64)}

    def _hull_image(self, image: Image.Image, mask: Any, points: Any) -> Image.Image | None:
        if self.config.region_source != "auto":
            return None
        if mask is not None:
            if not isinstance(mask, Image.Image):
                mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
            if mask.size != image.size:
                raise ValueError(f"foreground mask size {mask.size} differs from the image size {image.size}")
            return mask
        if points is not None:
            return landmark_hull_mask(np.asarray(points), *image.size)
        return None

    def feature_settings(self, train: bool) -> dict[str, Any]:
        settings = asdict(self.config)
        for name in _HEAD_ONLY_FIELDS:
            settings.pop(name)
        settings["backbone"] = {k: v for k, v in settings["backbone"].items() if k not in ("path", "init_seed")}
        return settings

    # ----------------------------------------------------------------------------------------------- regions
    def resolve_hulls(self, batch: dict[str, torch.Tensor], states: list[torch.Tensor] | None) -> torch.Tensor:
        """Hulls [B, 1, S, S]: given ones, the rest from saliency (``states`` of a vanilla pass) or the ellipse."""
        cfg = self.config
        hull = batch["hull"].to(self.device).float()
        has = batch["has_hull"].to(self.device).bool()
        if bool(has.all()):
            return hull
        size = cfg.backbone.image_size
        if cfg.region_source == "ellipse":
            fallback = ellipse_hull(size).to(self.device).expand(hull.shape[0], -1, -1, -1)
        else:
            layer = cfg.resolved_saliency_layer
            attention = self.backbone.cls_attention(layer, states[layer - 1])
            fallback = saliency_hull(attention, self.backbone.grid, size, cfg.saliency_top)
        return torch.where(has.view(-1, 1, 1, 1), hull, fallback)

    def membership(self, hulls: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """[B, K, N] bool token membership of the configured regions."""
        cfg = self.config
        grid = self.backbone.grid
        if cfg.regions == ["random"]:
            return random_membership(seeds.tolist(), cfg.random_regions, grid * grid).to(hulls.device)
        radius = cfg.boundary_px if cfg.boundary_px is not None else cfg.backbone.patch_size
        partition = partition_from_hull(hulls, radius)
        chosen = [REGION_NAMES.index(name) for name in cfg.regions]
        return token_membership(partition[:, chosen], cfg.backbone.patch_size)

    def layer_masks(self, tokens: torch.Tensor, counterpart: torch.Tensor | None, membership: torch.Tensor
                    ) -> torch.Tensor:
        """Pooling masks of one layer: refined by the CGP (``use_rrm``) or the whole regions."""
        if counterpart is None:
            return membership.float()
        proxy = contrastive_gradient_proxy(tokens, counterpart)
        return refinement_masks(proxy, membership, self.config.tau, self.config.eps)

    def _pool(self, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return region_pool(tokens, masks, self.config.pool, self.config.eps).to(tokens.dtype)

    # ----------------------------------------------------------------------------------------------- features
    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """HRI tokens before the head's LayerNorm: [B, num_tokens, D] = [z^{l_m}; z^L] (or z^L)."""
        cfg = self.config
        pixels = batch["pixels"].to(self.device)
        x = normalize(pixels, cfg.image.mean, cfg.image.std)
        needs_vanilla = cfg.region_attn == "one_way" or not cfg.use_rsi or not bool(batch["has_hull"].all())
        states = self.backbone.hidden_states(x) if needs_vanilla else None
        if not cfg.use_rsi:
            return self._integrate({l: states[l][:, :1] for l in self._integrated_layers()})
        hulls = self.resolve_hulls(batch, states)
        membership = self.membership(hulls, batch["seeds"])
        counterpart = None
        if cfg.needs_counterpart:
            blended = self_blend(pixels.float(), hulls, batch["seeds"].tolist(), cfg.sbi)
            counterpart = normalize(blended, cfg.image.mean, cfg.image.std)
        if cfg.region_attn == "one_way":
            return self._one_way(states, counterpart, membership)
        return self._joint(x, counterpart, membership)

    def _integrated_layers(self) -> list[int]:
        last = self.backbone.num_layers
        return [self.config.l_m, last] if self.config.use_hri else [last]

    def _integrate(self, per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([per_layer[l] for l in self._integrated_layers()], dim=1).float()

    def _one_way(self, states: list[torch.Tensor], counterpart: torch.Tensor | None,
                 membership: torch.Tensor) -> torch.Tensor:
        """Region tokens advanced through every block next to the (unchanged) vanilla tokens of ``states``."""
        tilde = self.backbone.hidden_states(counterpart) if counterpart is not None else None

        def masks(l: int) -> torch.Tensor:
            return self.layer_masks(states[l][:, 1:], None if tilde is None else tilde[l][:, 1:], membership)

        wanted = set(self._integrated_layers())
        regions = self._pool(states[0][:, 1:], masks(0))
        kept = {}
        for l in range(1, self.backbone.num_layers + 1):
            regions = self.backbone.extra_token_step(l, states[l - 1], regions)
            regions = regions + self._pool(states[l][:, 1:], masks(l))
            if l in wanted:
                kept[l] = torch.cat([states[l][:, :1], regions], dim=1)
        return self._integrate(kept)

    def _joint(self, x: torch.Tensor, counterpart: torch.Tensor | None, membership: torch.Tensor) -> torch.Tensor:
        """Full attention between all tokens; the counterpart runs with its own region tokens in lock-step."""
        hidden = self.backbone.embed(x)
        tilde = self.backbone.embed(counterpart) if counterpart is not None else None
        n_ctx = hidden.shape[1]

        def inject(seq: torch.Tensor, tilde_seq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
            m = self.layer_masks(seq[:, 1:n_ctx], None if tilde_seq is None else tilde_seq[:, 1:n_ctx], membership)
            pooled = self._pool(seq[:, 1:n_ctx], m)
            pooled_tilde = None if tilde_seq is None else self._pool(tilde_seq[:, 1:n_ctx], m)
            return pooled, pooled_tilde

        regions, regions_tilde = inject(hidden, tilde)
        seq = torch.cat([hidden, regions], dim=1)
        seq_tilde = None if tilde is None else torch.cat([tilde, regions_tilde], dim=1)
        wanted = set(self._integrated_layers())
        kept = {}
        for l in range(1, self.backbone.num_layers + 1):
            seq = self.backbone.layer(l, seq)
            seq_tilde = None if seq_tilde is None else self.backbone.layer(l, seq_tilde)
            pooled, pooled_tilde = inject(seq, seq_tilde)
            seq = torch.cat([seq[:, :n_ctx], seq[:, n_ctx:] + pooled], dim=1)
            if seq_tilde is not None:
                seq_tilde = torch.cat([seq_tilde[:, :n_ctx], seq_tilde[:, n_ctx:] + pooled_tilde], dim=1)
            if l in wanted:
                kept[l] = torch.cat([seq[:, :1], seq[:, n_ctx:]], dim=1)
        return self._integrate(kept)

    # ----------------------------------------------------------------------------------------------- head
    def head_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Frozen part of the head: post-LayerNorm (and projection) of each token -> [B, T, width], float32."""
        with torch.no_grad():
            tokens = self.backbone.post_layernorm(features.to(self.backbone.dtype))
            if self.config.head_space == "projection":
                tokens = self.backbone.project(tokens)
        return tokens.float()

    def head_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the classifier sees, [B, F]: fused (when ``fusion: xattn``) and flattened tokens."""
        tokens = self.head_tokens(features)
        if self.cross_attention is not None:
            half = tokens.shape[1] // 2
            middle, last = tokens[:, :half], tokens[:, half:]
            tokens, _ = self.cross_attention(last, middle, middle, need_weights=False)
        return tokens.flatten(1)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_inputs(features)).squeeze(-1)

    def gsnr(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """GSNR of the linear classifier's parameters on these (cached) features; linear head only."""
        if not isinstance(self.classifier, nn.Linear):
            raise ValueError("the GSNR diagnostic is defined for the linear head")
        with torch.no_grad():
            inputs = self.head_inputs(features.to(self.device))
        return linear_head_gsnr(inputs, labels.to(self.device), self.classifier.weight, self.classifier.bias)

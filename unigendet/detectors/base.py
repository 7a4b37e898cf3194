"""The contract every baseline detector follows, its registry by name, and its on-disk format.

A detector is a ``torch.nn.Module`` in two parts: a frozen *feature* part (a CLIP encoder, a Fourier
transform) and a small trainable *head*. Each detector class has its own config dataclass (``config_class``,
with ``validate()``; built from YAML/dicts by :func:`unigendet.config.loader.from_dict`) and implements

* ``build(config)`` (classmethod): random weights at any size, or real weights from local directories named
  in the config;
* ``preprocess(images, train=False, **extras) -> dict[str, Tensor]``: PIL images (plus per-image extras such
  as face landmarks) to a batch of tensors;
* ``extract_features(batch) -> Tensor``: the frozen part, run without gradients;
* ``head_logits(features) -> Tensor [B]``: the trainable part, a logit of "fake".

From these the base class provides ``forward``, ``loss`` (binary cross-entropy, labels internal: 1 = fake),
``predict_proba`` (p(fake) per image), ``training_step`` (plain or SAM), ``trainable_parameters``,
``save_pretrained`` / ``from_pretrained`` (``detector.json`` + ``model.safetensors``, strict key check) and a
feature fingerprint for on-disk feature caches. A batch may carry precomputed ``"features"``; then the frozen
part is skipped. A detector whose whole pipeline trains (CRAFT) overrides ``forward``/``loss`` itself, may give
per-module learning rates through ``param_groups``, and sets ``features_replace_inputs = False`` when it reads
its inputs next to cached features.

Detectors register under a name (:func:`register_detector`); :func:`build_detector` and :func:`load_detector`
find the class by that name (the built-in ones are imported on first use).
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from unigendet.config.loader import ConfigError, apply_overrides, from_dict, load_config, to_dict
from unigendet.detectors.clip_backbone import state_fingerprint
from unigendet.detectors.sam import SAM

logger = logging.getLogger(__name__)

FORMAT_NAME = "unigendet-detector"
FORMAT_VERSION = 1
META_FILE = "detector.json"
WEIGHTS_FILE = "model.safetensors"
BACKBONE_PREFIX = "backbone."


class CheckpointKeyError(ValueError):
    """A weights file does not match the model: the message names the missing and unexpected keys."""


def check_state_keys(expected: dict[str, tuple[int, ...]], got: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointKeyError unless ``got`` has exactly the keys (and shapes) of ``expected``."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(got[k].shape)} vs model {expected[k]}"
                        for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        raise CheckpointKeyError(f"{where}: " + "; ".join(parts))


class Detector(nn.Module, abc.ABC):
    """Base class of the baseline detectors (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    default_lr: ClassVar[float] = 1e-4
    # Whether cached features replace the preprocessed inputs in a training batch (False: the detector reads both,
    # e.g. CRAFT compares its reconstruction of a cached latent with the input pixels).
    features_replace_inputs: ClassVar[bool] = True

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # ----------------------------------------------------------------------------------------------- to implement
    @classmethod
    @abc.abstractmethod
    def build(cls, config: Any) -> Detector:
        """A detector from its validated config (random init, or weights from the paths the config names)."""

    @abc.abstractmethod
    def preprocess(self, images: Sequence[Image.Image], *, train: bool = False,
                   **extras: Any) -> dict[str, torch.Tensor]:
        """The tensors ``extract_features`` reads, for a batch of PIL images."""

    @abc.abstractmethod
    def extract_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen part of the forward: features the head reads (cacheable when deterministic)."""

    @abc.abstractmethod
    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable part: one logit of "fake" per image, shape ``[B]``."""

    @abc.abstractmethod
    def feature_settings(self, train: bool) -> dict[str, Any]:
        """The settings (besides backbone weights) that change ``extract_features(preprocess(x, train))``."""

    def features_are_deterministic(self, train: bool) -> bool:
        """Whether the features of an image are a pure function of it (then they may be cached on disk)."""
        return True

    # ----------------------------------------------------------------------------------------------- provided
    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def backbone_module(self) -> nn.Module | None:
        return getattr(self, "backbone", None)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch["features"]`` when present (a cache hit), else the frozen part's output; float32, no grad."""
        if "features" in batch:
            return batch["features"].to(self.device, torch.float32)
        with torch.no_grad():
            return self.extract_features(batch).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of "fake", [B]."""
        return self.head_logits(self.features(batch))

    def collate(self, images: Sequence[Image.Image], labels: Sequence[int], *, train: bool = False,
                **extras: Any) -> dict[str, torch.Tensor]:
        """A training batch: ``preprocess`` output plus ``labels`` (internal: 0 = real, 1 = fake)."""
        batch = self.preprocess(images, train=train, **extras)
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.float32)
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Binary cross-entropy of the logits against ``batch["labels"]`` (1 = fake); also logits and accuracy."""
        logits = self(batch)
        labels = batch["labels"].to(logits.device, torch.float32)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        accuracy = ((logits.detach() >= 0).float() == labels).float().mean()
        return {"loss": loss, "logits": logits.detach(), "accuracy": accuracy}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything that trains (the frozen feature part never does)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups with their own learning rates (``lr`` keys), or None for the engine's default
        grouping at one learning rate (detectors with per-module learning rates override this)."""
        return None

    def make_optimizer(self, lr: float | None = None, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (detectors with another recipe override this)."""
        params = [p for _, p in self.trainable_parameters()]
        return torch.optim.AdamW(params, lr=self.default_lr if lr is None else lr, weight_decay=weight_decay)

    def training_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One optimiser update on ``batch``; with :class:`SAM`, the two-gradient update. Returns the loss at the
        weights before the update and the batch accuracy."""
        self.train()
        optimizer.zero_grad(set_to_none=True)
        out = self.loss(batch)
        out["loss"].backward()
        if isinstance(optimizer, SAM):
            def closure() -> torch.Tensor:
                second = self.loss(batch)["loss"]
                second.backward()
                return second
            optimizer.step(closure)
        else:
            optimizer.step()
        return {"loss": float(out["loss"].detach()), "accuracy": float(out["accuracy"])}

    def fit_statistics(self, images: Sequence[Image.Image], labels: Sequence[int]) -> None:
        """Data-dependent state that is not learned by gradient (feature scaling, reference distributions),
        computed once from a sample of the training split before training. Nothing by default."""

    @torch.no_grad()
    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 32, **extras: Any) -> list[float]:
        """p(fake) per image, in evaluation mode (the previous mode is restored)."""
        images = list(images)
        was_training = self.training
        self.eval()
        try:
            scores: list[float] = []
            for start in range(0, len(images), batch_size):
                chunk_extras = {k: list(v)[start:start + batch_size] for k, v in extras.items()}
                batch = self.to_device(self.preprocess(images[start:start + batch_size], **chunk_extras))
                scores.extend(torch.sigmoid(self(batch)).float().cpu().tolist())
            return scores
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------------------------------------- identity
    def feature_fingerprint(self, train: bool = False) -> str:
        """Identifies ``extract_features(preprocess(x, train))`` for any image x: backbone weights + settings."""
        backbone = self.backbone_module
        settings = {"detector": self.name, "train": train, **self.feature_settings(train),
                    "backbone_weights": backbone.fingerprint() if backbone is not None else None}
        return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()

    def weights_fingerprint(self) -> str:
        """Digest of every weight: the (memoised) backbone digest plus the rest of the state."""
        backbone = self.backbone_module
        head = state_fingerprint({k: v for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)})
        if backbone is None:
            return head
        return hashlib.blake2b(f"{backbone.fingerprint()}:{head}".encode(), digest_size=16).hexdigest()

    def describe(self) -> dict[str, Any]:
        """Settings that change this detector's outputs (part of evaluation job fingerprints)."""
        return {"detector": self.name, "config": to_dict(self.config), "weights": self.weights_fingerprint()}

    # ----------------------------------------------------------------------------------------------- persistence
    def expected_state(self, include_backbone: bool = True) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()
                if include_backbone or not k.startswith(BACKBONE_PREFIX)}

    def prepare_for_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resize data-dependent buffers to a saved state before it is loaded (nothing by default)."""

    def load_state_strict(self, state: dict[str, torch.Tensor], where: str, include_backbone: bool = True) -> None:
        self.prepare_for_state(state)
        check_state_keys(self.expected_state(include_backbone), state, where)
        own = self.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].dtype))
        backbone = self.backbone_module
        if backbone is not None and include_backbone:
            backbone.forget_fingerprint()

    def save_pretrained(self, directory: str | Path, include_backbone: bool = True) -> Path:
        """Write ``detector.json`` (name, config, format) and ``model.safetensors``.

        ``include_backbone=False`` leaves the frozen backbone out (it is then re-read from ``backbone.path`` at
        load time and checked against the recorded fingerprint).
        """
        directory = Path(directory)
        backbone = self.backbone_module
        if backbone is not None and not include_backbone and self.config.backbone.path is None:
            raise ValueError("include_backbone=False needs a backbone read from backbone.path (this one is random "
                             "or came from a checkpoint, so it could not be found again)")
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()
                 if include_backbone or not k.startswith(BACKBONE_PREFIX)}
        config = to_dict(self.config)
        if backbone is not None and include_backbone:
            config["backbone"]["path"] = None
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "detector": self.name,
            "config": config,
            "backbone_included": backbone is None or include_backbone,
            "backbone_fingerprint": backbone.fingerprint() if backbone is not None else None,
        }
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "detector": self.name})
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        logger.info("saved %s detector to %s (%d tensors%s)", self.name, directory, len(state),
                    "" if meta["backbone_included"] else ", backbone not included")
        return directory

    @classmethod
    def config_for_loading(cls, config: Any) -> Any:
        """``config`` with every field that loads external weights at build time cleared (the saved weights
        replace them). Detectors with such fields override this."""
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone_path: str | None = None) -> Detector:
        """Load a directory written by :meth:`save_pretrained` (any registered detector when called on the base)."""
        directory = Path(directory)
        meta = read_meta(directory)
        detector_cls = detector_class(meta["detector"])
        if cls is not Detector and detector_cls is not cls:
            raise ConfigError(f"{directory} holds a {meta['detector']!r} detector, not {cls.name!r}")
        config = detector_cls.config_for_loading(from_dict(detector_cls.config_class, meta["config"]))
        backbone_cfg = getattr(config, "backbone", None)
        if backbone_cfg is not None:
            backbone_cfg.path = None if meta["backbone_included"] else (backbone_path or backbone_cfg.path)
            if backbone_cfg.path is None and not meta["backbone_included"]:
                raise ConfigError(f"{directory}: the backbone was saved separately; pass its directory")
        detector = detector_cls.build(config)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise ConfigError(f"{directory}: no {WEIGHTS_FILE}")
        state = load_file(str(weights))
        detector.load_state_strict(state, str(weights), include_backbone=meta["backbone_included"])
        backbone = detector.backbone_module
        if backbone is not None and meta.get("backbone_fingerprint") not in (None, backbone.fingerprint()):
            raise ConfigError(f"{directory}: the backbone at {backbone_cfg.path} is not the one this detector was "
                              f"trained with (fingerprint {backbone.fingerprint()} != {meta['backbone_fingerprint']})")
        detector.eval()
        return detector


def revalidate(config: Any, where: str) -> None:
    """Run ``config.validate()`` again once the backbone's real geometry is known (read from its directory)."""
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{err} (with the backbone geometry of {where})") from err


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise ConfigError(f"{directory}: not a saved detector (no {META_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: format {meta.get('format')!r} v{meta.get('version')!r}, expected "
                          f"{FORMAT_NAME!r} v{FORMAT_VERSION}")
    return meta


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Detector]] = {}
_BUILTIN_MODULES = {
    "ltd": "unigendet.detectors.ltd",
    "corit": "unigendet.detectors.corit",
    "spectral": "unigendet.detectors.spectral",
    "resnet": "unigendet.detectors.resnet",
    "craft": "unigendet.detectors.craft",
}


def register_detector(name: str):
    """Class decorator: make a :class:`Detector` subclass reachable as ``name``."""
    def decorate(cls: type[Detector]) -> type[Detector]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"detector name {name!r} is already registered by {_REGISTRY[name].__name__}")
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"{cls!r} is not a Detector subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def available_detectors() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def detector_class(name: str) -> type[Detector]:
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ConfigError(f"unknown detector {name!r}; known: {', '.join(available_detectors())}")
    return _REGISTRY[name]


def detector_config(name: str, data: dict[str, Any] | str | Path | None = None,
                    overrides: Sequence[str] = ()) -> Any:
    """The config dataclass of detector ``name`` from a dict, or a YAML file plus dotted overrides."""
    cls = detector_class(name)
    if isinstance(data, dict):
        return from_dict(cls.config_class, apply_overrides(json.loads(json.dumps(data)), list(overrides)))
    return load_config(cls.config_class, data, list(overrides))


def build_detector(name: str, config: Any = None) -> Detector:
    """Build detector ``name`` from its config (dataclass, dict, YAML path or None for the defaults)."""
    cls = detector_class(name)
    if not isinstance(config, cls.config_class):
        config = detector_config(name, config if config is not None else {})
    return cls.build(config)


def load_detector(directory: str | Path, backbone_path: str | None = None) -> Detector:
    """Load any saved detector; its class is read from ``detector.json``."""
    return Detector.from_pretrained(directory, backbone_path=backbone_path)


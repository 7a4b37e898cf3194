"""Loading the LTD authors' released checkpoint (the ``yywencs/LTD`` training code's ``.pth`` files).

Their trainer saves ``torch.save({"model": CLIPModel.state_dict(), "optimizer": ..., "total_steps": ...})``.
The model's state dict holds, by the names of their ``models/clip_models.py``:

* ``model.*``: the whole OpenAI CLIP of the ``clip`` package, vision tower under ``model.visual.*`` (used) and
  text tower (``model.transformer.*``, ``model.token_embedding.weight``, ``model.positional_embedding``,
  ``model.ln_final.*``, ``model.text_projection``, ``model.logit_scale``: recognised and ignored);
* ``selector.logits`` [C - n + 1] (window logits);
* ``origin_cls`` / ``delta_cls`` [1, 1, D] and ``origin_pos_embedding.weight`` [n, D] /
  ``delta_pos_embedding.weight`` [n - 1, D]: the raw and difference branches;
* ``encoder.layers.0.*``: the shared ``nn.TransformerEncoderLayer`` inside a one-layer ``nn.TransformerEncoder``;
* ``classification_head.0.*`` (LayerNorm 2D) and ``classification_head.1.*`` (Linear 2D -> 1).

The mapping is strict: a key that is neither mapped nor a known text-tower key, or a mapped key that is
absent, is an error naming it. The checkpoint's vision tower becomes the backbone (converted from OpenAI's
layout); a checkpoint stripped of it needs the backbone from ``backbone.path`` instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from unigendet.config.loader import ConfigError
from unigendet.detectors.base import BACKBONE_PREFIX, CheckpointKeyError, check_state_keys
from unigendet.detectors.clip_backbone import openai_visual_geometry, openai_visual_to_hf

logger = logging.getLogger(__name__)

OFFICIAL_BACKBONE_PREFIX = "model.visual."
_TEXT_TOWER_PREFIXES = ("model.transformer.", "model.ln_final.")
_TEXT_TOWER_KEYS = {"model.token_embedding.weight", "model.positional_embedding", "model.text_projection",
                    "model.logit_scale"}

# official name -> our name (parameters of the trainable head)
_HEAD_KEYS = {
    "selector.logits": "selector_logits",
    "origin_cls": "cls_raw",
    "delta_cls": "cls_ltd",
    "origin_pos_embedding.weight": "pos_raw.weight",
    "delta_pos_embedding.weight": "pos_ltd.weight",
    "classification_head.0.weight": "head_norm.weight",
    "classification_head.0.bias": "head_norm.bias",
    "classification_head.1.weight": "head.weight",
    "classification_head.1.bias": "head.bias",
}
_ENCODER_PREFIX = ("encoder.layers.0.", "encoder.")


def official_to_ours(name: str) -> str | None:
    """Our key for an official head key, or None when it is not a head key."""
    if name in _HEAD_KEYS:
        return _HEAD_KEYS[name]
    if name.startswith(_ENCODER_PREFIX[0]):
        return _ENCODER_PREFIX[1] + name[len(_ENCODER_PREFIX[0]):]
    return None


def ours_to_official(name: str) -> str:
    """The official key of one of our head keys (the inverse of :func:`official_to_ours`)."""
    for official, ours in _HEAD_KEYS.items():
        if ours == name:
            return official
    if name.startswith(_ENCODER_PREFIX[1]):
        return _ENCODER_PREFIX[0] + name[len(_ENCODER_PREFIX[1]):]
    raise KeyError(f"{name} has no counterpart in the official LTD checkpoint")


def is_text_tower_key(name: str) -> bool:
    return name in _TEXT_TOWER_KEYS or name.startswith(_TEXT_TOWER_PREFIXES)


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an official ``.pth`` (``{"model": ...}`` or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"official_checkpoint {path}: no such file")
    blob: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"official_checkpoint {path}: expected a state dict under 'model'")
    return state


def split_official_state(state: dict[str, torch.Tensor], where: str
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(head state in our names, OpenAI vision-tower state with ``visual.`` keys); unknown keys raise."""
    head: dict[str, torch.Tensor] = {}
    visual: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        ours = official_to_ours(name)
        if ours is not None:
            head[ours] = tensor
        elif name.startswith(OFFICIAL_BACKBONE_PREFIX):
            visual["visual." + name[len(OFFICIAL_BACKBONE_PREFIX):]] = tensor
        elif not is_text_tower_key(name):
            unknown.append(name)
    if unknown:
        raise CheckpointKeyError(f"{where}: unexpected keys {sorted(unknown)} (not part of the official LTD model)")
    return head, visual


def _check_geometry(visual: dict[str, torch.Tensor], config, where: str) -> None:
    """A clear error when the checkpoint's vision tower is not the configured backbone (instead of a shape
    mismatch for every key)."""
    try:
        found = openai_visual_geometry(visual)
    except KeyError as err:
        raise CheckpointKeyError(f"{where}: vision tower incomplete, missing {err}") from err
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size")
    differ = [f"{n} {getattr(found, n)} (config {getattr(config, n)})" for n in names
              if getattr(found, n) != getattr(config, n)]
    if differ:
        raise ConfigError(f"{where}: its CLIP vision tower has {', '.join(differ)}; set backbone.* to match")


def load_official_weights(detector, path: str | Path) -> None:
    """Load an official LTD checkpoint into ``detector`` (an ``LTDDetector`` built with the matching config:
    the released models use ViT-L/14, blocks 11..19, window 5, both branches, positions on, Gumbel selection).
    """
    where = f"official LTD checkpoint {path}"
    head, visual = split_official_state(read_official_state(path), where)
    expected_head = {ours_to_official(k): v for k, v in detector.expected_state().items()
                     if not k.startswith(BACKBONE_PREFIX)}
    check_state_keys(expected_head, {ours_to_official(k): v for k, v in head.items()}, where)
    state = dict(head)
    if visual:
        _check_geometry(visual, detector.config.backbone, where)
        try:
            vision, projection = openai_visual_to_hf(visual, num_layers=detector.backbone.num_layers)
        except ValueError as err:
            raise CheckpointKeyError(f"{where}: {err}") from err
        state.update({BACKBONE_PREFIX + "vision." + k: v for k, v in vision.items()})
        if projection is not None and detector.backbone.projection is not None:
            state[BACKBONE_PREFIX + "projection.weight"] = projection
        include_backbone = True
    elif detector.config.backbone.path is None:
        raise ConfigError(f"{where} has no vision tower (model.visual.*); set backbone.path to the CLIP directory")
    else:
        include_backbone = False
        logger.info("%s has no vision tower; keeping the backbone from %s", where, detector.config.backbone.path)
    detector.load_state_strict(state, where, include_backbone=include_backbone)
    if include_backbone:
        detector.config.backbone.path = None
    logger.info("loaded %s (%d head tensors%s)", where, len(head), ", vision tower included" if visual else "")

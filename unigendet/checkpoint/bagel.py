"""Load BAGEL-7B-MoT and UniGenDet checkpoint directories into ``UniGenDet``; only local files are read.

A BAGEL directory holds ``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP), ``ema.safetensors``
(all model weights), ``ae.safetensors`` (FLUX VAE, BFL naming) and the tokenizer files. UniGenDet
fine-tunes are weight files in the same naming, usually *without* the keys they did not train; passed as
``weights`` they override the base directory's keys in memory, where the official code first merges the
missing keys into a new multi-GB file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from unigendet.config.loader import ConfigError, from_dict, to_dict
from unigendet.models.bridges import sincos_2d_table
from unigendet.models.config import LLMConfig, ModelConfig, VAEConfig, ViTConfig
from unigendet.utils.hub import resolve_model_dir
from unigendet.utils.state_dict import format_key_problems

logger = logging.getLogger(__name__)

LLM_CONFIG_NAME = "llm_config.json"
VIT_CONFIG_NAME = "vit_config.json"
VAE_WEIGHTS_NAME = "ae.safetensors"
# Order of preference inside a checkpoint directory: BAGEL releases and the training code's EMA copy
# are ``ema.safetensors``; ``model.safetensors`` is the raw (non-EMA) training copy.
WEIGHT_FILE_NAMES = ("ema.safetensors", "model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"

# Every BAGEL training and inference script passes 64 (the BagelConfig default of 32 is never used).
BAGEL_MAX_LATENT_SIZE = 64
# The reference trains and runs with SigLIP's second-to-last layer (``vit_select_layer = -2``).
BAGEL_VIT_SELECT_LAYER = -2
POS_EMBED_TOLERANCE = 1e-5

# File prefix -> our prefix.
_RENAMES = {"fake_cls_head.": "detection_head.", "diga_mlp.": "diga_projector."}
_DEAD_PREFIX = "latent_to_vit_connector."
_DEAD_REASON = "latent_to_vit_connector is built by UniGenDet but never called by its forward; not part of our model"
_POS_EMBED_REASON = "fixed sin-cos table; recomputed from the geometry"
# Heads that may be absent from the files; our model then keeps its fresh initialisation.
_OPTIONAL_HEADS = ("detection_head.", "diga_projector.")
# Modules that exist only with visual_und / visual_gen; their keys are dropped when the flag is off.
_UND_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")
_GEN_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")

_LAYER_MODULES = {
    "Qwen2MoTDecoderLayer": "mot",
    "Qwen2MoEDecoderLayer": "moe",
    "Qwen2DecoderLayer": "dense",
}

# Values transformers' Qwen2Config / SiglipVisionConfig use when a JSON file omits a key; the reference
# reads these files with ``from_json_file``, so a missing key means exactly these.
_QWEN2_DEFAULTS = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
}
_SIGLIP_DEFAULTS = {"num_channels": 3, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


class BagelCheckpointError(ConfigError):
    """A checkpoint does not match the model; the message names the offending keys."""


# ------------------------------------------------------------------------------------------------
# Config files


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return data


def _require(data: Mapping[str, Any], keys: Iterable[str], path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")


def _rope_theta(data: Mapping[str, Any], path: Path) -> float:
    """``rope_theta`` from a Qwen2 config, accepting the older top-level key and the newer
    ``rope_parameters`` / ``rope_scaling`` dicts; any RoPE type other than default is rejected because
    BAGEL (and our decoder) use plain RoPE."""
    thetas = []
    if data.get("rope_theta") is not None:
        thetas.append(float(data["rope_theta"]))
    for name in ("rope_parameters", "rope_scaling"):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {name} must be an object or null, got {value!r}")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{path}: {name} asks for rope_type {rope_type!r}; only default RoPE without scaling is "
                "supported (BAGEL-7B-MoT uses none)"
            )
        if value.get("rope_theta") is not None:
            thetas.append(float(value["rope_theta"]))
    if len(set(thetas)) > 1:
        raise ConfigError(f"{path}: conflicting rope_theta values {sorted(set(thetas))}")
    return thetas[0] if thetas else _QWEN2_DEFAULTS["rope_theta"]


def llm_config_from_json(path: str | Path) -> LLMConfig:
    """``LLMConfig`` from a Qwen2 ``llm_config.json``, with what every BAGEL entry point forces:
    ``qk_norm=True``, ``tie_word_embeddings=False`` and the MoT layer (unless the file names another
    ``layer_module``)."""
    path = Path(path)
    data = _read_json(path)
    _require(data, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"), path)
    if data.get("use_sliding_window"):
        raise ConfigError(f"{path}: use_sliding_window=true is not supported (BAGEL attends over the full pack)")
    layer_module = data.get("layer_module", "Qwen2MoTDecoderLayer")
    if layer_module not in _LAYER_MODULES:
        raise ConfigError(f"{path}: unknown layer_module {layer_module!r}; expected one of {sorted(_LAYER_MODULES)}")
    if data.get("tie_word_embeddings"):
        # The reference overrides it too: BAGEL stores a separate lm_head.
        logger.info("%s sets tie_word_embeddings=true; BAGEL forces false (separate lm_head)", path)
    cfg = LLMConfig(
        vocab_size=int(data["vocab_size"]),
        hidden_size=int(data["hidden_size"]),
        intermediate_size=int(data["intermediate_size"]),
        num_hidden_layers=int(data["num_hidden_layers"]),
        num_attention_heads=int(data["num_attention_heads"]),
        # Qwen2Config falls back to multi-head attention when the key is absent.
        num_key_value_heads=int(data.get("num_key_value_heads", data["num_attention_heads"])),
        rope_theta=_rope_theta(data, path),
        rms_norm_eps=float(data.get("rms_norm_eps", _QWEN2_DEFAULTS["rms_norm_eps"])),
        max_position_embeddings=int(data.get("max_position_embeddings", _QWEN2_DEFAULTS["max_position_embeddings"])),
        hidden_act=str(data.get("hidden_act", _QWEN2_DEFAULTS["hidden_act"])),
        qk_norm=True,
        tie_word_embeddings=False,
        layer_module=_LAYER_MODULES[layer_module],
    )
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return cfg


def vit_config_from_json(path: str | Path, select_layer: int = BAGEL_VIT_SELECT_LAYER) -> ViTConfig:
    """``ViTConfig`` from a SigLIP ``vit_config.json``. BAGEL builds (and stores) only the layers up to
    ``select_layer``: ``num_hidden_layers + 1 + select_layer`` (27 -> 26 for so400m with -2)."""
    path = Path(path)
    data = _read_json(path)
    _require(
        data,
        ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size", "image_size"),
        path,
    )
    n_file = int(data["num_hidden_layers"])
    if not -n_file <= select_layer <= -1:
        raise ConfigError(f"select_layer must lie in [-{n_file}, -1] for {n_file} layers, got {select_layer}")
    image_size, patch_size = int(data["image_size"]), int(data["patch_size"])
    if image_size % patch_size:
        raise ConfigError(f"{path}: image_size {image_size} is not a multiple of patch_size {patch_size}")
    cfg = ViTConfig(
        hidden_size=int(data["hidden_size"]),
        intermediate_size=int(data["intermediate_size"]),
        num_attention_heads=int(data["num_attention_heads"]),
        num_hidden_layers=n_file + 1 + select_layer,
        patch_size=patch_size,
        num_channels=int(data.get("num_channels", _SIGLIP_DEFAULTS["num_channels"])),
        # SigLIP's learned position table has (image_size / patch_size)^2 rows: 70^2 for BAGEL.
        max_num_patch_per_side=image_size // patch_size,
        layer_norm_eps=float(data.get("layer_norm_eps", _SIGLIP_DEFAULTS["layer_norm_eps"])),
        hidden_act=str(data.get("hidden_act", _SIGLIP_DEFAULTS["hidden_act"])),
    )
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return cfg


# ------------------------------------------------------------------------------------------------
# Weight files


@dataclass
class _WeightSource:
    files: list[Path]
    # Key -> shard file name, when the source is an index JSON (used to check the shards are complete).
    index: dict[str, str] | None = None
    description: str = ""


def _from_index(index_path: Path) -> _WeightSource:
    data = _read_json(index_path)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BagelCheckpointError(f"{index_path} has no weight_map")
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shard file(s) that do not exist: {', '.join(missing)}")
    return _WeightSource(files, dict(weight_map), str(index_path))


def _resolve_weights(path: str | Path | Sequence[str | Path]) -> _WeightSource:
    """Which safetensors files ``path`` designates: a file, a directory (ema > model > one index JSON),
    an index JSON, or a comma-separated string / sequence of shard files."""
    if isinstance(path, (list, tuple)) or (isinstance(path, str) and "," in path):
        parts = path.split(",") if isinstance(path, str) else path
        files = [Path(str(p).strip()) for p in parts if str(p).strip()]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shard file(s) not found: {', '.join(missing)}")
        return _WeightSource(files, None, ", ".join(map(str, files)))
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return _WeightSource([path / name], None, str(path / name))
        indexes = sorted(path.glob("*" + INDEX_SUFFIX))
        if len(indexes) == 1:
            return _from_index(indexes[0])
        if len(indexes) > 1:
            raise BagelCheckpointError(f"{path} holds several index files ({', '.join(p.name for p in indexes)}); pass one")
        raise FileNotFoundError(
            f"no weights in {path}: looked for {' or '.join(WEIGHT_FILE_NAMES)} or a *{INDEX_SUFFIX} index"
        )
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        if path.suffix == ".safetensors":
            return _WeightSource([path], None, str(path))
        raise BagelCheckpointError(f"{path} is neither a .safetensors file nor a *{INDEX_SUFFIX} index")
    raise FileNotFoundError(f"weights not found: {path}")


def _check_index(source: _WeightSource, found: Mapping[str, Path]) -> None:
    if source.index is None:
        return
    missing = sorted(set(source.index) - set(found))
    extra = sorted(set(found) - set(source.index))
    misplaced = sorted(k for k in set(source.index) & set(found) if found[k].name != source.index[k])
    if missing or extra or misplaced:
        raise BagelCheckpointError(
            f"shards disagree with {source.description}: "
            + format_key_problems(missing, extra, [f"{k} (not in {source.index[k]})" for k in misplaced])
        )


def _collect(source: _WeightSource, read) -> dict[str, Any]:
    out: dict[str, Any] = {}
    owner: dict[str, Path] = {}
    for file in source.files:
        for key, value in read(file).items():
            if key in owner:
                raise BagelCheckpointError(f"key {key} appears in both {owner[key]} and {file}")
            owner[key] = file
            out[key] = value
    _check_index(source, owner)
    return out


def _read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_safetensors_shapes(path: str | Path | Sequence[str | Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor ``path`` designates, read from the file headers only (cheap even for
    a 30 GB checkpoint)."""
    return _collect(_resolve_weights(path), _read_shapes)


def read_safetensors_weights(path: str | Path | Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, a directory (``ema.safetensors`` preferred, then
    ``model.safetensors``, then one ``*.safetensors.index.json``), an index JSON, or a comma-separated
    list of shard files. Tensors are loaded on CPU in their stored dtype."""
    return _collect(_resolve_weights(path), lambda f: load_file(str(f), device="cpu"))


# ------------------------------------------------------------------------------------------------
# Model config


def _heads_from_shapes(shapes: Mapping[str, tuple[int, ...]], hidden_size: int) -> dict[str, Any]:
    """Which optional heads the files carry, and their geometry. Shapes that fit no option are left to
    the strict load, which then names the key."""
    out: dict[str, Any] = {
        "detection_head": any(k.startswith("fake_cls_head.") for k in shapes),
        "diga_projector": any(k.startswith("diga_mlp.") for k in shapes),
    }
    det_out = shapes.get("fake_cls_head.3.weight")
    if det_out is not None and det_out[0] in (1, 2):
        out["detection_loss"] = "ce" if det_out[0] == 2 else "bce"
    diga_in = shapes.get("diga_mlp.0.weight")
    if diga_in is not None and diga_in[0] % hidden_size == 0:
        out["diga_projector_mult"] = diga_in[0] // hidden_size
    return out


def _merge_override(base: Any, value: Any) -> Any:
    """A dict override of a config section updates only the keys it names; a dataclass replaces it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping) and isinstance(base, dict):
        return {**base, **value}
    return value


def bagel_model_config(
    directory: str | Path,
    weights: str | Path | Sequence[str | Path] | None = None,
    vit_select_layer: int = BAGEL_VIT_SELECT_LAYER,
    **overrides: Any,
) -> ModelConfig:
    """``ModelConfig`` of a BAGEL / UniGenDet checkpoint directory.

    The LLM and ViT come from the JSON files, the VAE is the FLUX geometry (BAGEL hard-codes it),
    ``max_latent_size`` is 64. ``detection_head`` / ``diga_projector`` are on iff the weights (base
    directory plus ``weights``, headers only) hold ``fake_cls_head`` / ``diga_mlp`` keys.
    ``overrides`` replace top-level fields (``detection_head=True`` to start GDUF from plain BAGEL);
    a dict for ``llm`` / ``vit`` / ``vae`` updates only the fields it names.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    llm = llm_config_from_json(directory / LLM_CONFIG_NAME)
    vit = vit_config_from_json(directory / VIT_CONFIG_NAME, vit_select_layer)
    shapes = read_safetensors_shapes(directory)
    if weights is not None:
        shapes.update(read_safetensors_shapes(weights))
    data: dict[str, Any] = {
        "llm": to_dict(llm),
        "vit": to_dict(vit),
        "vae": to_dict(VAEConfig()),
        "max_latent_size": BAGEL_MAX_LATENT_SIZE,
        **_heads_from_shapes(shapes, llm.hidden_size),
    }
    for key, value in overrides.items():
        data[key] = _merge_override(data.get(key), value)
    return from_dict(ModelConfig, data)


# ------------------------------------------------------------------------------------------------
# State-dict adapter


@dataclass
class AdaptReport:
    """What ``adapt_bagel_state_dict`` did: file key -> our key, and file key -> why it was dropped."""

    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    # Largest |file - recomputed| per sin-cos table (compared in the file's dtype).
    pos_embed_max_diff: dict[str, float] = field(default_factory=dict)


def _pos_embed_grids(cfg: ModelConfig) -> dict[str, int]:
    return {
        "latent_pos_embed.pos_embed": cfg.max_latent_size,
        "vit_pos_embed.pos_embed": cfg.vit.max_num_patch_per_side,
    }


def _check_pos_embed(key: str, table: torch.Tensor, hidden_size: int, grid: int) -> float:
    """Max |file - recomputed| of a sin-cos table. The file may use another grid side G than our config
    (e.g. max_latent_size 32): row r·G + c always encodes (row r, col c), so compare with the table
    for the file's own G."""
    rows = table.shape[0] if table.ndim == 2 else -1
    side = math.isqrt(rows) if rows > 0 else 0
    if table.ndim != 2 or table.shape[1] != hidden_size or side * side != rows:
        raise BagelCheckpointError(
            f"{key}: shape {tuple(table.shape)} is not a square-grid sin-cos table of width {hidden_size}"
        )
    if side != grid:
        logger.info(
            "%s covers a %dx%d grid, the model %dx%d; the table is recomputed either way",
            key, side, side, grid, grid
        )
    expected = torch.from_numpy(sincos_2d_table(hidden_size, side)).float()
    # Round ours to the file's dtype first, so a bf16 release compares exactly instead of by bf16 precision.
    return float((table.float() - expected.to(table.dtype).float()).abs().max())


def _flag_off_reason(key: str, cfg: ModelConfig) -> str | None:
    if not cfg.visual_und and key.startswith(_UND_PREFIXES):
        return "visual_und=false: the ViT path is not built"
    if not cfg.visual_gen and key.startswith(_GEN_PREFIXES):
        return "visual_gen=false: the latent path is not built"
    return None


def adapt_bagel_state_dict(
    state: Mapping[str, torch.Tensor], model_config: ModelConfig
) -> tuple[dict[str, torch.Tensor], AdaptReport]:
    """Rename BAGEL/UniGenDet file keys to ours and drop the keys our model does not hold.

    Our parameter names equal BAGEL's except for these file keys:

    ==================================  =================================================================
    ``fake_cls_head.{0,1,3}.*``         -> ``detection_head.*`` (UniGenDet's real/fake head, same indices)
    ``diga_mlp.{0,2}.*``                -> ``diga_projector.*`` (DIGA projector, same indices)
    ``latent_pos_embed.pos_embed``,     dropped: fixed sin-cos tables that our model recomputes from the
    ``vit_pos_embed.pos_embed``         geometry (non-persistent buffers); checked against ours first
    ``latent_to_vit_connector.*``       dropped: a module UniGenDet builds but never calls
    ==================================  =================================================================

    Keys of modules switched off in the config are dropped too. The sin-cos tables are checked before they
    are dropped, with a warning giving the largest difference when they disagree with ours by more than
    ``POS_EMBED_TOLERANCE``."""
    report = AdaptReport()
    out: dict[str, torch.Tensor] = {}
    grids = _pos_embed_grids(model_config)
    for key, tensor in state.items():
        if key in grids:
            diff = _check_pos_embed(key, tensor, model_config.llm.hidden_size, grids[key])
            report.pos_embed_max_diff[key] = diff
            if diff > POS_EMBED_TOLERANCE:
                logger.warning(
                    "%s in the checkpoint differs from the recomputed sin-cos table by up to %.3g "
                    "(tolerance %.0e); the recomputed table is used",
                    key,
                    diff,
                    POS_EMBED_TOLERANCE,
                )
            report.dropped[key] = _POS_EMBED_REASON
            continue
        if key.startswith(_DEAD_PREFIX):
            report.dropped[key] = _DEAD_REASON
            continue
        reason = _flag_off_reason(key, model_config)
        if reason is not None:
            report.dropped[key] = reason
            continue
        new = key
        for old_prefix, new_prefix in _RENAMES.items():
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix) :]
                report.renamed[key] = new
                break
        out[new] = tensor
    dead = sorted(k for k, r in report.dropped.items() if r == _DEAD_REASON)
    if dead:
        logger.info("ignoring %d checkpoint key(s) %s: %s", len(dead), ", ".join(dead), _DEAD_REASON)
    flagged = sorted(k for k, r in report.dropped.items() if r.startswith("visual_"))
    if flagged:
        logger.info(
            "ignoring %d checkpoint key(s) of modules switched off in the config (%s, ...)", len(flagged), flagged[0]
        )
    return out, report


def _file_name(our_key: str) -> str:
    """Our key as it is spelled in BAGEL/UniGenDet files (for error messages)."""
    for old_prefix, new_prefix in _RENAMES.items():
        if our_key.startswith(new_prefix):
            return old_prefix + our_key[len(new_prefix) :]
    return our_key


def _check_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Strict key/shape check (errors use the file spelling); returns the optional heads that stay fresh.

    Every key must match one to one. The one exception is a head the files do not have at all
    (``detection_head`` when starting GDUF from plain BAGEL, ``diga_projector`` when starting DIGA): it stays
    freshly initialised."""
    own = model.state_dict()
    fresh = [
        prefix.rstrip(".")
        for prefix in _OPTIONAL_HEADS
        if any(k.startswith(prefix) for k in own) and not any(k.startswith(prefix) for k in state)
    ]
    missing = sorted(_file_name(k) for k in own if k not in state and not k.startswith(tuple(h + "." for h in fresh)))
    unexpected = sorted(_file_name(k) for k in state if k not in own)
    shapes = [
        f"shape mismatch {_file_name(k)}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise BagelCheckpointError("checkpoint does not match the model: " + format_key_problems(missing, unexpected, shapes))
    return fresh


# ------------------------------------------------------------------------------------------------
# Entry point


def load_bagel_checkpoint(
    directory: str | Path,
    weights: str | Path | Sequence[str | Path] | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
):
    """Build ``(UniGenDet, FluxVAE, tokenizer)`` from a BAGEL / UniGenDet checkpoint directory (or a hub id such as
    ``ByteDance-Seed/BAGEL-7B-MoT``, read from the local hub cache first).

    ``directory`` supplies the configs, ``ae.safetensors``, the tokenizer and the base weights
    (``ema.safetensors``). ``weights`` (a fine-tuned file, directory, index JSON or shard list) overrides
    base keys in memory; nothing is written. ``config_overrides`` go to ``bagel_model_config``
    (e.g. ``detection_head=True`` when starting GDUF from plain BAGEL). ``dtype`` casts the model's
    parameters; the VAE stays fp32 (the reference runs it under autocast). The model is returned in
    eval mode; training code switches it to train mode itself.
    """
    from unigendet.data.tokenizer import load_tokenizer, special_token_ids
    from unigendet.models.unigendet import UniGenDet
    from unigendet.models.vae import FluxVAE

    directory = resolve_model_dir(directory)
    config = bagel_model_config(directory, weights, **config_overrides)
    # Fail on a missing VAE or tokenizer before the expensive weight load.
    vae_path = directory / VAE_WEIGHTS_NAME
    if not vae_path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {vae_path} (BAGEL ships the FLUX VAE as {VAE_WEIGHTS_NAME})")
    tokenizer = load_tokenizer(directory)
    special = special_token_ids(tokenizer)
    if len(tokenizer) > config.llm.vocab_size or max(dataclasses.astuple(special)) >= config.llm.vocab_size:
        raise BagelCheckpointError(
            f"tokenizer in {directory} has {len(tokenizer)} tokens (largest special id "
            f"{max(dataclasses.astuple(special))}) but the embedding has only {config.llm.vocab_size} rows"
        )

    state = read_safetensors_weights(directory)
    if weights is not None:
        tuned = read_safetensors_weights(weights)
        base_only = len(set(state) - set(tuned))
        state.update(tuned)
        logger.info("%d key(s) from %s, %d more from the base checkpoint %s", len(tuned), weights, base_only, directory)
    state, _ = adapt_bagel_state_dict(state, config)

    model = UniGenDet.without_weights(config)
    fresh = _check_keys(model, state)
    model.assign_weights(state, fresh, dtype=dtype or torch.float32)
    for head in fresh:
        logger.info("%s is not in the checkpoint: it is freshly initialised", head)
    del state
    model.to(map_location).eval()

    vae = FluxVAE.from_bfl_file(vae_path, config.vae).to(map_location)
    return model, vae, tokenizer


# ------------------------------------------------------------------------------------------------
# Key-by-key loading (for partitioned models)


def locate_safetensors_keys(path: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """Key -> the file holding it, for every tensor ``path`` designates (same resolution and shard checks as
    ``read_safetensors_weights``), read from the file headers only."""

    def keys_of(file: Path) -> dict[str, Path]:
        with safe_open(str(file), framework="pt") as f:
            return {key: file for key in f.keys()}

    return _collect(_resolve_weights(path), keys_of)


def bagel_weight_plan(directory: str | Path, config: ModelConfig, weights: str | Path | Sequence[str | Path] | None
                      = None) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """Where each weight of the model ``config`` describes comes from, without reading the weights: our key ->
    (file, key in that file), and the optional heads the files lack (they stay freshly initialised).

    The same renames, drops, sin-cos table checks and strict key/shape check as ``load_bagel_checkpoint`` run on
    shapes read from the file headers (only the small sin-cos tables are read, to be checked), so a loader can
    then fill a partitioned model one tensor at a time. ``weights`` overrides base keys as it does there."""
    from unigendet.models.unigendet import UniGenDet

    located = locate_safetensors_keys(resolve_model_dir(directory))
    if weights is not None:
        located.update(locate_safetensors_keys(weights))
    grids = _pos_embed_grids(config)
    placeholders: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(located.values()):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if located[key] == file:
                    placeholders[key] = (f.get_tensor(key) if key in grids else
                                         torch.empty(f.get_slice(key).get_shape(), device="meta"))
    adapted, report = adapt_bagel_state_dict(placeholders, config)
    fresh = _check_keys(UniGenDet.without_weights(config), adapted)
    file_key = {ours: theirs for theirs, ours in report.renamed.items()}
    return {key: (located[file_key.get(key, key)], file_key.get(key, key)) for key in adapted}, fresh


# ------------------------------------------------------------------------------------------------
# Back-export: our model -> a BAGEL / UniGenDet directory

BAGEL_WEIGHTS_PREFIX = "ema"
_LAYER_MODULE_NAMES = {ours: theirs for theirs, ours in _LAYER_MODULES.items()}


def llm_config_to_json(cfg: LLMConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """A Qwen2 ``llm_config.json`` that :func:`llm_config_from_json` (and BAGEL's loader) reads back as ``cfg``.
    BAGEL forces qk-norm on and untied embeddings, so a config without them has no BAGEL equivalent."""
    if not cfg.qk_norm or cfg.tie_word_embeddings:
        raise BagelCheckpointError("a BAGEL checkpoint needs llm.qk_norm=true and llm.tie_word_embeddings=false "
                                   "(BAGEL forces both)")
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": cfg.hidden_act,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": cfg.num_hidden_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
        "qk_norm": True,
        "layer_module": _LAYER_MODULE_NAMES[cfg.layer_module],
        "torch_dtype": dtype,
    }


def vit_config_to_json(cfg: ViTConfig, select_layer: int = BAGEL_VIT_SELECT_LAYER) -> dict[str, Any]:
    """A SigLIP ``vit_config.json``: BAGEL builds ``num_hidden_layers + 1 + select_layer`` layers, so the file
    lists ``-1 - select_layer`` more than ours holds (27 for 26 at the default -2)."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers - 1 - select_layer,
        "patch_size": cfg.patch_size,
        "image_size": cfg.patch_size * cfg.max_num_patch_per_side,
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
    }


def to_bagel_state_dict(state: Mapping[str, torch.Tensor], model_config: ModelConfig,
                        pos_embed: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict under the released files' key names (inverse of :func:`adapt_bagel_state_dict`):
    ``detection_head.*`` -> ``fake_cls_head.*``, ``diga_projector.*`` -> ``diga_mlp.*``, and, with
    ``pos_embed``, the fixed sin-cos tables ``latent_pos_embed.pos_embed`` / ``vit_pos_embed.pos_embed``
    (fp32, as the releases store them; BAGEL's loader drops and recomputes them). UniGenDet's unused
    ``latent_to_vit_connector`` is not written (its loader reads checkpoints non-strictly)."""
    out = {_file_name(key): value for key, value in state.items()}
    if pos_embed:
        hidden = model_config.llm.hidden_size
        for key, grid in _pos_embed_grids(model_config).items():
            flag_off = _flag_off_reason(key, model_config)
            if flag_off is None:
                out[key] = torch.from_numpy(sincos_2d_table(hidden, grid)).float()
    return out


def save_bagel_checkpoint(directory: str | Path, model: torch.nn.Module, vae, tokenizer,
                          state: Mapping[str, torch.Tensor] | None = None, dtype: str | torch.dtype | None = None,
                          max_shard_size: int | str | None = None,
                          vit_select_layer: int = BAGEL_VIT_SELECT_LAYER) -> Path:
    """Write ``model`` (or ``state``, a state dict of it) as a BAGEL-7B-MoT / UniGenDet directory that the
    official code and :func:`load_bagel_checkpoint` read: ``ema.safetensors`` (or ``ema-0000i-of-0000N``
    shards + ``ema.safetensors.index.json`` above ``max_shard_size``; None: one file, which is what BAGEL's own
    loader opens), ``llm_config.json``, ``vit_config.json``, ``ae.safetensors`` (FLUX VAE in BFL naming) and
    the tokenizer files. ``dtype`` casts the floating weights (None: as stored); the sin-cos tables stay fp32."""
    from unigendet.utils.safetensors_shards import cast_floating, save_sharded

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    if config.max_latent_size != BAGEL_MAX_LATENT_SIZE:
        logger.warning("max_latent_size is %d; BAGEL's code always builds %d (its latent table has %d rows)",
                       config.max_latent_size, BAGEL_MAX_LATENT_SIZE, BAGEL_MAX_LATENT_SIZE**2)
    source = model.state_dict() if state is None else state
    weights = cast_floating({k: v.detach() for k, v in source.items()}, dtype)
    weights = to_bagel_state_dict(weights, config)
    stored = {str(v.dtype).removeprefix("torch.") for k, v in weights.items() if not k.endswith("pos_embed")}
    (directory / LLM_CONFIG_NAME).write_text(
        json.dumps(llm_config_to_json(config.llm, stored.pop() if len(stored) == 1 else "float32"), indent=2))
    (directory / VIT_CONFIG_NAME).write_text(json.dumps(vit_config_to_json(config.vit, vit_select_layer), indent=2))
    save_sharded(weights, directory, BAGEL_WEIGHTS_PREFIX, max_shard_size)
    vae.save_bfl(directory / VAE_WEIGHTS_NAME)
    tokenizer.save_pretrained(str(directory))
    write_slow_tokenizer_files(directory)
    logger.info("wrote a BAGEL-layout checkpoint (%d tensors) to %s", len(weights), directory)
    return directory


_ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def write_slow_tokenizer_files(directory: str | Path) -> bool:
    """Make a saved tokenizer readable by the slow ``Qwen2Tokenizer`` that BAGEL's code builds: ``vocab.json`` and
    ``merges.txt`` written from ``tokenizer.json`` when missing, and the added (special) tokens with their ids
    recorded in ``tokenizer_config.json``'s ``added_tokens_decoder`` (where the slow class finds them; recent
    transformers keep them only in ``tokenizer.json``, and without them BAGEL would add ``<|im_start|>`` & co. again
    under new ids). Returns False, with a warning, for a tokenizer these files cannot express (not a plain BPE)."""
    directory = Path(directory)
    source = directory / "tokenizer.json"
    if not source.is_file():
        return (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    data = json.loads(source.read_text(encoding="utf-8"))
    model = data.get("model", {})
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    if model.get("type") != "BPE" or any(len(m) != 2 or " " in "".join(m) for m in merges):
        logger.warning("%s: cannot write vocab.json/merges.txt (not a plain BPE tokenizer); BAGEL's slow "
                       "Qwen2Tokenizer will not load this directory", directory)
        return False
    if not (directory / "vocab.json").is_file():
        (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    if not (directory / "merges.txt").is_file():
        lines = "".join(f"{a} {b}\n" for a, b in merges)
        (directory / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if "added_tokens_decoder" not in config and data.get("added_tokens"):
        config["added_tokens_decoder"] = {
            str(token["id"]): {k: token.get(k, False) for k in _ADDED_TOKEN_FIELDS} for token in data["added_tokens"]}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return True

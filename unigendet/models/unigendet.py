"""The UniGenDet model: BAGEL's MoT LLM + SigLIP NaViT + latent bridges + detection head.

One class serves GDUF, DIGA and inference; the stages differ by config and objective. The model
computes outputs only at the positions a batch asks for (CE, MSE, detection): losses, noising and
cross-rank normalisation live in ``unigendet.losses`` / ``unigendet.objectives``. The VAE is not a
submodule: it is frozen, never sharded, and owned by the objective or the inference pipeline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unigendet.config.loader import from_dict, to_dict
from unigendet.data.packing import PackedBatch
from unigendet.models.bridges import (
    AlignmentProjector,
    DetectionHead,
    MLPConnector,
    PositionEmbedding2D,
    TimestepEmbedder,
)
from unigendet.models.config import ModelConfig
from unigendet.models.mot import CHECKPOINT_GRANULARITIES, GEN_SUFFIX, MoTLanguageModel, Routing
from unigendet.models.siglip import SiglipNaViT
from unigendet.ops.attention import build_attention
from unigendet.utils.hub import resolve_model_dir
from unigendet.utils.safetensors_shards import DEFAULT_MAX_SHARD_SIZE, cast_floating, load_sharded, save_sharded
from unigendet.utils.state_dict import format_key_problems

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "unigendet"
MODEL_TYPE = "unigendet"
# Heads a stage may add to a checkpoint that lacks them (kept freshly initialised).
OPTIONAL_HEADS = ("detection_head.", "diga_projector.")


@dataclass
class UniGenDetOutput:
    hidden: torch.Tensor  # [L, D] final-normed states
    ce_logits: torch.Tensor | None  # [C, V] at batch.ce_loss_indexes
    velocity: torch.Tensor | None  # [M_noised, patch_latent_dim] at batch.mse_loss_indexes
    det_logits: torch.Tensor | None  # [n_det, K] at batch.det_indexes
    layer_hidden: torch.Tensor | None = None  # [L, D] residual stream after ``capture_layer`` layers
    projected: torch.Tensor | None = None  # [M_noised, D] diga_projector(layer_hidden) at batch.mse_loss_indexes


@torch.no_grad()
def _generic_init(root: nn.Module, std: float = 0.02) -> None:
    """Qwen2-style fresh init of every Linear, Embedding, LayerNorm and RMSNorm under ``root``."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            nn.init.ones_(module.weight)


class UniGenDet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        llm = config.llm
        D = llm.hidden_size
        self.attention = build_attention(config.attn_backend)
        self.language_model = MoTLanguageModel(llm, self.attention)
        self.language_model.model.set_compile(config.compile)
        if config.visual_und:
            self.vit_model = SiglipNaViT(config.vit, attn_implementation=config.attn_backend)
            self.connector = MLPConnector(config.vit.hidden_size, D, D, config.connector_act)
            self.vit_pos_embed = PositionEmbedding2D(config.vit.max_num_patch_per_side, D)
        if config.visual_gen:
            self.time_embedder = TimestepEmbedder(D)
            self.vae2llm = nn.Linear(config.patch_latent_dim, D)
            self.llm2vae = nn.Linear(D, config.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding2D(config.max_latent_size, D)
        if config.detection_head:
            self.detection_head = DetectionHead(D, config.detection_num_outputs)
        if config.diga_projector:
            self.diga_projector = AlignmentProjector(D, config.diga_projector_mult)
        self.init_weights()

    # ---------------------------------------------------------------------------------------------
    # Initialisation

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, copy_und_to_gen: bool = True) -> None:
        """Fresh init (Qwen2 style), then copy every und weight into its gen sibling (BAGEL's
        ``copy_init_moe``) and zero ``llm2vae`` as the reference does. Loading a checkpoint
        overwrites all of this."""
        _generic_init(self, std)
        if copy_und_to_gen:
            self.copy_und_to_gen()
        self._init_bridges()
        if self.config.visual_gen:
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)

    def _init_bridges(self) -> None:
        """Image features are *added* to fixed sin-cos position tables (std ~0.55 per dim). With
        std-0.02 weights the connector/vae2llm outputs would be ~60x smaller than the table, so every
        image token would look alike until the bridges grew. Variance-preserving init (std 1/sqrt(fan_in))
        brings them to the table's scale. Only fresh inits are affected; checkpoints overwrite this."""
        bridges = []
        if self.config.visual_und:
            bridges += [self.connector.fc1, self.connector.fc2]
        if self.config.visual_gen:
            bridges.append(self.vae2llm)
        for linear in bridges:
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5)

    # ---------------------------------------------------------------------------------------------
    # Construction without weights, for checkpoint loads

    @classmethod
    def without_weights(cls, config: ModelConfig) -> "UniGenDet":
        """The model with its parameters on the meta device: no memory and no random init, which for
        BAGEL-7B-MoT would be ~56 GB of fp32 host memory and minutes of CPU time spent on values a
        checkpoint overwrites. Buffers (fixed sin-cos tables, RoPE frequencies) are built normally.
        Fill it with :meth:`assign_weights`."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return cls(config)

    @torch.no_grad()
    def assign_weights(self, state: dict[str, torch.Tensor], fresh: Sequence[str] = (),
                       dtype: torch.dtype = torch.float32) -> None:
        """Adopt ``state``'s tensors as the parameters (floating ones cast to ``dtype``), without a
        second copy: ``state`` is consumed (its entries are replaced as they are cast, so the
        uncast tensors can be freed one by one). Modules named in ``fresh`` (heads absent from the
        checkpoint) get real storage and a fresh init. Keys and shapes must have been checked.
        Buffers stay fp32 on purpose: RoPE's inv_freq is fp32 in the reference too, and the sin-cos
        tables are cast to the activation dtype at lookup."""
        for key in list(state):
            if state[key].is_floating_point():
                state[key] = state[key].to(dtype)
        device = next(iter(state.values())).device if state else torch.device("cpu")
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.llm.tie_word_embeddings:
            # assign=True replaces the Parameter objects, which unties lm_head from the embedding.
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight
        for name in fresh:
            # Initialised in float32 and then cast, so a fresh head holds the same values whatever ``dtype``.
            module = self.get_submodule(name)
            module.to_empty(device=device)
            _generic_init(module.to(torch.float32))
            module.to(dtype)
        left = [name for name, param in self.named_parameters() if param.is_meta]
        if left:
            raise ValueError(f"{len(left)} parameter(s) got no weights: {', '.join(left[:8])}")

    @torch.no_grad()
    def copy_und_to_gen(self) -> None:
        params = dict(self.language_model.named_parameters())
        for name, param in params.items():
            if GEN_SUFFIX in name:
                param.copy_(params[name.replace(GEN_SUFFIX, "")])

    def set_activation_checkpointing(self, enabled: bool, granularity: str = "layer") -> None:
        """Recompute activations in backward instead of keeping them: decoder ``layer``s whole, or their attention
        and MLP halves (``sublayer``: a lower backward peak, for longer packs); the ViT per layer either way."""
        if granularity not in CHECKPOINT_GRANULARITIES:
            raise ValueError(f"granularity must be one of {CHECKPOINT_GRANULARITIES}, got {granularity!r}")
        self.language_model.model.activation_checkpointing = enabled
        self.language_model.model.checkpoint_granularity = granularity
        if self.config.visual_und:
            self.vit_model.set_activation_checkpointing(enabled)

    # ---------------------------------------------------------------------------------------------
    # Forward

    def embed(
        self,
        batch: PackedBatch,
        latent_tokens: torch.Tensor | None,
        latent_timesteps: torch.Tensor | None,
    ) -> torch.Tensor:
        """Assemble the packed input embeddings ``[L, D]`` from text, ViT and latent tokens."""
        embed_tokens = self.language_model.model.embed_tokens
        dtype = embed_tokens.weight.dtype
        device = embed_tokens.weight.device
        hidden = torch.zeros(batch.sequence_length, self.config.llm.hidden_size, dtype=dtype, device=device)
        hidden[batch.text_indexes] = embed_tokens(batch.text_ids)
        if batch.vit_token_indexes.numel():
            if not self.config.visual_und:
                raise ValueError("batch holds ViT tokens but the model was built with visual_und=false")
            vit = self.vit_model(batch.vit_tokens.to(dtype), batch.vit_position_ids, batch.vit_seqlens)
            vit = self.connector(vit) + self.vit_pos_embed(batch.vit_position_ids).to(dtype)
            hidden[batch.vit_token_indexes] = vit.to(dtype)
        if batch.vae_token_indexes.numel():
            if not self.config.visual_gen:
                raise ValueError("batch holds VAE tokens but the model was built with visual_gen=false")
            if latent_tokens is None or latent_timesteps is None:
                raise ValueError("batch holds VAE image blocks: pass latent_tokens and latent_timesteps")
            n = batch.num_latent_tokens
            if latent_tokens.shape != (n, self.config.patch_latent_dim) or latent_timesteps.shape != (n,):
                raise ValueError(
                    f"expected latent_tokens [{n}, {self.config.patch_latent_dim}] and latent_timesteps [{n}], got "
                    f"{tuple(latent_tokens.shape)} and {tuple(latent_timesteps.shape)}"
                )
            lat = (
                self.vae2llm(latent_tokens.to(dtype))
                + self.time_embedder(latent_timesteps)
                + self.latent_pos_embed(batch.latent_position_ids).to(dtype)
            )
            hidden[batch.vae_token_indexes] = lat.to(dtype)
        return hidden

    def forward(
        self,
        batch: PackedBatch,
        latent_tokens: torch.Tensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        *,
        capture_layer: int | None = None,
        num_layers: int | None = None,
        project_captured: bool = False,
    ) -> UniGenDetOutput:
        """Run a packed batch.

        ``latent_tokens`` ``[M, patch_latent_dim]`` are the (noised or clean) patchified latents of
        ``batch.vae_images`` in pack order, ``latent_timesteps`` ``[M]`` their flow time in [0, 1]
        (0 for clean context images). ``capture_layer`` returns the residual stream after that many
        decoder layers; ``num_layers`` stops the decoder early (heads then read the early states);
        ``project_captured`` applies the DIGA projector to the captured states at the noised latent
        tokens (inside forward, so sharded engines gather the projector like any module)."""
        decoder = self.language_model.model
        if decoder.layer_devices is not None and len({*decoder.layer_devices, decoder.embed_tokens.weight.device,
                                                      decoder.norm.weight.device}) > 1:
            # The packed attention's prepared masks live on one device; the split path is the cached forward.
            raise ValueError("this model is split over several devices (a device map): the packed forward needs it "
                             "on one device; detection and generation use the cached forward, which supports the split")
        hidden = self.embed(batch, latent_tokens, latent_timesteps)
        routing = Routing.from_gen_index(batch.sequence_length, batch.vae_token_indexes, hidden.device)
        prepared = self.attention.prepare(batch.layout, hidden.device)
        hidden, captured = self.language_model.model(
            hidden, batch.position_ids, routing, prepared, num_layers=num_layers, capture_layer=capture_layer
        )
        ce_logits = velocity = det_logits = None
        if batch.ce_loss_indexes.numel():
            ce_logits = self.language_model.lm_head(hidden[batch.ce_loss_indexes])
        if batch.mse_loss_indexes.numel():
            velocity = self.llm2vae(hidden[batch.mse_loss_indexes])
        if batch.det_indexes.numel() and self.config.detection_head:
            det_logits = self.detection_head(hidden[batch.det_indexes])
        projected = None
        if project_captured:
            if captured is None or not self.config.diga_projector:
                raise ValueError("project_captured needs capture_layer and a model built with diga_projector: true")
            projected = self.diga_projector(captured[batch.mse_loss_indexes])
        return UniGenDetOutput(hidden, ce_logits, velocity, det_logits, captured, projected)

    def forward_cached(self, hidden: torch.Tensor, position_ids: torch.Tensor, routing: Routing, attend) -> torch.Tensor:
        """Incremental inference: run the decoder on a query block of input embeddings ``hidden [N, D]``
        (from ``embed``) at absolute RoPE ids ``position_ids``, attending through ``attend`` (a KV
        cache, see ``unigendet.inference.cached_forward``). Returns final-normed states; the heads
        (``language_model.lm_head``, ``llm2vae``, ``detection_head``) are applied by the caller."""
        return self.language_model.model(hidden, position_ids, routing, attend=attend)[0]

    # ---------------------------------------------------------------------------------------------
    # Our own checkpoint format: config.json + model.safetensors (or shards + index)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        dtype: str | torch.dtype | None = None,
                        max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write ``config.json`` (Hugging Face style: ``model_type``, ``architectures``, ``torch_dtype``, plus
        our full ``model`` config) and the weights: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
        shards with ``model.safetensors.index.json`` above ``max_shard_size`` (None: never shard).
        ``state_dict`` replaces this module's own (e.g. a state consolidated from ZeRO-3 partitions); ``dtype``
        ("bf16", "fp16", "fp32" or a torch dtype; None keeps each tensor's) casts floating tensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.state_dict() if state_dict is None else state_dict
        state = cast_floating({k: v.detach() for k, v in source.items()}, dtype)
        if self.config.llm.tie_word_embeddings:
            state.pop("language_model.lm_head.weight", None)
        stored = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
        (directory / CONFIG_NAME).write_text(json.dumps({
            "model_type": MODEL_TYPE, "architectures": [type(self).__name__],
            "torch_dtype": stored[0] if len(stored) == 1 else "mixed",
            "format": FORMAT_TAG, "model": to_dict(self.config)}, indent=2))
        save_sharded(state, directory, "model", max_shard_size)

    @staticmethod
    def read_config(directory: Path, **overrides) -> ModelConfig:
        """The model config of a local ``save_pretrained`` directory, ``overrides`` applied (see ``from_pretrained``)."""
        config_path = Path(directory) / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a unigendet checkpoint directory?")
        meta = json.loads(config_path.read_text())
        if meta.get("format") != FORMAT_TAG and meta.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{config_path} is not a unigendet config (model_type={meta.get('model_type')!r})")
        return from_dict(ModelConfig, {**meta["model"], **overrides})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        revision: str | None = None, dtype: torch.dtype = torch.float32,
                        **overrides) -> "UniGenDet":
        """Load a directory written by ``save_pretrained`` (single file or shards), or a Hugging Face hub id
        holding one (read from the local hub cache; downloaded when missing unless ``HF_HUB_OFFLINE`` is set).
        ``overrides`` replace top-level config fields that do not change weights (e.g. ``attn_backend="flex"``).
        Floating parameters are cast to ``dtype`` while they are adopted (no second full-size copy)."""
        directory = resolve_model_dir(directory, revision)
        config = cls.read_config(directory, **overrides)
        model = cls.without_weights(config)
        state = load_sharded(directory, "model", device=str(map_location))
        if not config.diga_projector and any(k.startswith("diga_projector.") for k in state):
            # The projector only feeds the DIGA alignment loss; a model built without it (e.g. GDUF continuing from a
            # DIGA export, or inference) does not need it, and nothing else reads those weights.
            logger.info("%s: the checkpoint's DIGA projector is not part of this model (diga_projector: false); "
                        "dropped", directory)
            state = {k: v for k, v in state.items() if not k.startswith("diga_projector.")}
        model.load_state_dict_strict(state, fresh_ok=OPTIONAL_HEADS, dtype=dtype)
        return model.to(map_location)

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], fresh_ok: tuple[str, ...] = (),
                               dtype: torch.dtype = torch.float32) -> None:
        """Load with an error that names every missing and unexpected key and every shape mismatch.

        A head listed in ``fresh_ok`` (a key prefix) may be absent from ``state`` *as a whole*
        (e.g. the DIGA projector when stage 2 starts from a stage-1 export): it keeps its fresh init."""
        own = self.state_dict()
        if self.config.llm.tie_word_embeddings:
            own.pop("language_model.lm_head.weight", None)
        for prefix in fresh_ok:
            if not any(k.startswith(prefix) for k in state) and any(k.startswith(prefix) for k in own):
                logger.info("%s* not in the checkpoint: freshly initialised", prefix)
                own = {k: v for k, v in own.items() if not k.startswith(prefix)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            raise ValueError("checkpoint does not match the model: " + format_key_problems(missing, unexpected, shapes))
        fresh = [prefix.rstrip(".") for prefix in fresh_ok
                 if hasattr(self, prefix.rstrip(".")) and not any(k.startswith(prefix) for k in state)]
        if any(param.is_meta for param in self.parameters()):
            self.assign_weights(state, fresh, dtype=dtype)
        else:
            self.load_state_dict(state, strict=False)

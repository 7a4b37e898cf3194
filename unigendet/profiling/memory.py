"""Memory figures of a model configuration without building it in memory: parameter counts on the meta device and
a layer-level probe of the activations a training forward keeps for backward.

Parameters: the model is constructed under ``torch.device("meta")`` (shapes only, no storage), so a 14 B
parameter count costs nothing. Callers may freeze or add adapters to the meta model before counting.

Activations: :func:`probe_activations` runs real training forwards of thin slices of the model (one and two
decoder layers, one and two ViT layers, a small vocabulary) on a synthetic pack laid out like training data, at
the configuration's full width, and records every tensor autograd saves for backward (parameters excluded, each
storage counted once). Three slices separate the bytes per LLM token of one decoder layer, the bytes per ViT token
of one ViT layer, and the per-token remainder (embeddings, connector, heads' inputs). The figures scale linearly
with tokens because attention here keeps O(tokens) state (per-sample kernels; flash/flex kernels likewise), and
linearly with layers. The language-model logits (``vocab`` wide, only at the text-loss tokens) are added by
formula, since the probe shrinks the vocabulary. With activation checkpointing each decoder layer keeps only its
input; the recomputed layer's activations are alive once during backward.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.profiling.random_packs import synthetic_pack

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements): all, trainable, frozen, and the largest single tensor (ZeRO-3 gathers one
    layer's parameters at a time; DeepSpeed's estimator sizes that buffer from it)."""

    total: int
    trainable: int
    largest_tensor: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def meta_model(cfg: ModelConfig) -> UniGenDet:
    """The model with shapes only (no storage): for counting and planning. The attention backend does not change
    the parameters, so the always-available one is used (flash-attn need not be installed to plan)."""
    cfg = copy.deepcopy(cfg)
    cfg.attn_backend = "sdpa"
    with torch.device("meta"):
        return UniGenDet(cfg)


def count_parameters(model: nn.Module) -> ParamCounts:
    params = list(model.parameters())
    return ParamCounts(total=sum(p.numel() for p in params),
                       trainable=sum(p.numel() for p in params if p.requires_grad),
                       largest_tensor=max((p.numel() for p in params), default=0))


@dataclass(frozen=True)
class SavedPerToken:
    """Float elements autograd keeps for backward, per token, in one regime (with or without checkpointing):
    one decoder layer per LLM token, one ViT layer per ViT patch token, and the remainder per LLM token
    (embeddings, connector, the heads' inputs, the probe's own small logits excluded)."""

    layer: float
    vit_layer: float
    rest: float


@dataclass(frozen=True)
class ActivationProfile:
    """What a training forward keeps, per token, measured in float32 and stated in elements so any dtype applies.

    ``plain`` / ``checkpointed``: without and with activation checkpointing; ``int_bytes_per_llm_token``: integer
    index tensors (dtype-independent); ``vocab_size``: for the logits formula; ``probe_*``: the probe's pack."""

    plain: SavedPerToken
    checkpointed: SavedPerToken
    int_bytes_per_llm_token: float
    vocab_size: int
    probe_llm_tokens: int
    probe_vit_tokens: int
    probe_ce_tokens: int

    def training_bytes(self, llm_tokens: int, vit_tokens: int, ce_tokens: int, layers: int, vit_layers: int,
                       dtype_bytes: int, checkpointing: bool) -> dict[str, float]:
        """Peak activation bytes of one micro-batch (one pack) by part, and their ``total``.

        Under checkpointing, backward recomputes one layer at a time, whose full activations then exist once
        (``recomputed_layer``). The logits part: bf16/fp16 logits kept for the loss plus their float32 copy
        inside the cross-entropy."""
        saved = self.checkpointed if checkpointing else self.plain
        parts = {
            "decoder_layers": layers * saved.layer * llm_tokens * dtype_bytes,
            "vit_layers": vit_layers * saved.vit_layer * vit_tokens * dtype_bytes,
            "embeddings_and_heads": saved.rest * llm_tokens * dtype_bytes + self.int_bytes_per_llm_token * llm_tokens,
            "recomputed_layer": (max(self.plain.layer * llm_tokens, self.plain.vit_layer * vit_tokens) * dtype_bytes
                                 if checkpointing else 0.0),
            "lm_logits": ce_tokens * self.vocab_size * (dtype_bytes + 4),
        }
        parts["total"] = sum(parts.values())
        return parts


class _SavedTensorMeter:
    """Sums the storage bytes of tensors saved for backward (parameters excluded, each storage once)."""

    def __init__(self, model: nn.Module):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.float_elems = 0
        self.int_bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.parameter_storages and key not in self.seen and storage.nbytes():
            self.seen.add(key)
            if tensor.dtype.is_floating_point:
                self.float_elems += storage.nbytes() // tensor.element_size()
            else:
                self.int_bytes += storage.nbytes()
        return tensor


def _slice_config(cfg: ModelConfig, layers: int, vit_layers: int, vocab: int) -> ModelConfig:
    sliced = copy.deepcopy(cfg)
    sliced.llm.num_hidden_layers = layers
    sliced.vit.num_hidden_layers = vit_layers
    sliced.llm.vocab_size = vocab
    sliced.attn_backend = "sdpa"
    return sliced


class _Probe:
    """One two-layer slice of the model (two decoder layers, two ViT layers, a small vocabulary) and a pack; runs
    training forwards with one or two of each and counts what they keep. Building the slice once keeps the probe's
    host memory to one slice (about 4 GiB at the 7B geometry)."""

    def __init__(self, cfg: ModelConfig, tokens: int, image_size: int, vocab: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sliced = _slice_config(cfg, 2, 2, vocab)
            self.model = UniGenDet(sliced).train()
            self.batch = synthetic_pack(sliced, tokens, image_size)
            # The frozen VAE runs without gradients, so it keeps nothing for backward: random latents of the right
            # shape stand in for its output (values do not change what is saved).
            n_latent = int(self.batch.vae_token_indexes.numel())
            self.latents = torch.randn(n_latent, cfg.patch_latent_dim) if n_latent else None
            self.timesteps = torch.rand(n_latent) if n_latent else None
        self.vocab = vocab
        self.vit_layers = self.model.vit_model.vision_model.encoder.layers if cfg.vit.num_hidden_layers else None

    def saved(self, layers: int, vit_layers: int, checkpointing: bool) -> _SavedTensorMeter:
        self.model.set_activation_checkpointing(checkpointing)
        encoder = self.model.vit_model.vision_model.encoder
        encoder.layers = self.vit_layers[:vit_layers]
        meter = _SavedTensorMeter(self.model)
        try:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                self.model(self.batch, latent_tokens=self.latents, latent_timesteps=self.timesteps, num_layers=layers)
        finally:
            encoder.layers = self.vit_layers
        return meter

    def per_token(self, checkpointing: bool) -> SavedPerToken:
        """(1, 1), (2, 1) and (1, 2) decoder/ViT layers separate the per-layer and remaining elements."""
        base = self.saved(1, 1, checkpointing).float_elems
        two_layers = self.saved(2, 1, checkpointing).float_elems
        two_vit = self.saved(1, 2, checkpointing).float_elems
        llm_tokens = self.batch.sequence_length
        vit_tokens = int(self.batch.vit_tokens.shape[0]) if self.batch.vit_tokens is not None else 0
        layer = (two_layers - base) / llm_tokens
        vit_layer = (two_vit - base) / max(vit_tokens, 1)
        probe_logits = self.batch.ce_loss_indexes.numel() * self.vocab
        rest = (base - layer * llm_tokens - vit_layer * vit_tokens - probe_logits) / llm_tokens
        return SavedPerToken(layer, vit_layer, max(rest, 0.0))


def probe_activations(cfg: ModelConfig, tokens: int = 1024, image_size: int | None = None,
                      probe_vocab: int = 512) -> ActivationProfile:
    """Per-token activation elements of ``cfg`` at its full width, from forwards of a two-layer slice on CPU.

    ``tokens``: the probe pack's size (small: the figures are per token); ``image_size``: the VAE side of the
    probe's images (default: 8 latent strides, a few latent tokens per image)."""
    probe = _Probe(cfg, tokens, image_size or 8 * cfg.latent_downsample, probe_vocab)
    plain = probe.per_token(checkpointing=False)
    checkpointed = probe.per_token(checkpointing=True)
    batch = probe.batch
    return ActivationProfile(
        plain=plain, checkpointed=checkpointed,
        int_bytes_per_llm_token=probe.saved(1, 1, False).int_bytes / batch.sequence_length,
        vocab_size=cfg.llm.vocab_size,
        probe_llm_tokens=batch.sequence_length,
        probe_vit_tokens=int(batch.vit_tokens.shape[0]) if batch.vit_tokens is not None else 0,
        probe_ce_tokens=int(batch.ce_loss_indexes.numel()),
    )


def pack_composition(cfg: ModelConfig, tokens: int, image_size: int) -> dict[str, float]:
    """Shares of ViT patch tokens and text-loss tokens in a training-like pack of ``tokens`` with images of
    ``image_size`` px (alternating detection and text-to-image samples), for scaling the probe to a budget."""
    with torch.random.fork_rng(devices=[]):
        batch = synthetic_pack(cfg, tokens, image_size)
    vit = int(batch.vit_tokens.shape[0]) if batch.vit_tokens is not None else 0
    return {"vit_share": vit / batch.sequence_length, "ce_share": batch.ce_loss_indexes.numel() / batch.sequence_length}

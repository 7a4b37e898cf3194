"""SigLIP vision encoder with NaViT packing (BAGEL's ViT), built on transformers' SigLIP encoder layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from unigendet.models.config import ViTConfig

logger = logging.getLogger(__name__)

# Our short backend names (ModelConfig.attn_backend) -> transformers attention implementation names.
# "flex" only matters for the LLM's structured masks; a plain key-padding mask is served well by sdpa.
_ATTN_ALIASES = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flex": "sdpa",
    "flash": "flash_attention_2",
    "flash_attention_2": "flash_attention_2",
    "flash_attention_3": "flash_attention_3",
}


def convert_conv2d_to_linear(weight: Tensor) -> Tensor:
    """Turn a conv patch-embedding weight ``[out, C, p, p]`` into BAGEL's linear layout ``[out, p·p·C]``.

    The flattened column order must match ``patchify``'s (pixel row, pixel col, channel) order, hence the
    permute to ``[out, p, p, C]`` before flattening. The bias is unchanged.
    """
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"expected a conv weight of shape [out, C, p, p], got {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


class _SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        # Linear (not Conv2d) because BAGEL checkpoints store the patch embedding pre-flattened: [hidden, patch_dim].
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        # Learned absolute embedding indexed by flattened grid id row·max_side + col; never interpolated.
        self.position_embedding = nn.Embedding(cfg.max_num_patch_per_side**2, cfg.hidden_size)

    def forward(self, packed_pixel_values: Tensor, packed_position_ids: Tensor) -> Tensor:
        x = self.patch_embedding(packed_pixel_values.to(self.patch_embedding.weight.dtype))
        return x + self.position_embedding(packed_position_ids)


class _SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig, attn_implementation: str):
        super().__init__()
        hf_cfg = cfg.to_hf(attn_implementation)
        self.layers = nn.ModuleList([SiglipEncoderLayer(hf_cfg) for _ in range(cfg.num_hidden_layers)])


class _SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, attn_implementation: str):
        super().__init__()
        self.embeddings = _SiglipEmbeddings(cfg)
        self.encoder = _SiglipEncoder(cfg, attn_implementation)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """Packed-sequence SigLIP encoder: ``forward(pixels [N, patch_dim], pos_ids [N], seqlens [n]) -> [N, hidden]``.

    ``cfg.num_hidden_layers`` is the number of layers *built* (BAGEL: 26); ``post_layernorm`` follows the
    last built layer. There is no pooling head.

    Input is a *packed* stream: every image is patchified into rows of ``patch_size² · 3`` pixel values
    (order: pixel row, pixel col, channel) and all images are concatenated along the token axis. Attention is
    bidirectional inside one image and never crosses images.

    The reference runs flash-attn's varlen kernel over the packed stream. Here the stream is scattered into a
    padded ``[n_images, max_len, hidden]`` batch with a key-padding mask, so any transformers attention backend
    (sdpa / eager on CPU, flash-attn on CUDA) can run the stock ``SiglipEncoderLayer``. Padding rows only
    ever act as queries (their outputs are dropped); as keys they are masked out, so the real tokens are
    unaffected by how much padding a batch carries.

    State-dict layout (relative to this module; BAGEL stores it under ``vit_model.``)::

        vision_model.embeddings.patch_embedding.{weight,bias}      Linear(patch_dim -> hidden)
        vision_model.embeddings.position_embedding.weight          Embedding(max_side², hidden)
        vision_model.encoder.layers.{j}.{self_attn,layer_norm1,layer_norm2,mlp}.*
        vision_model.post_layernorm.{weight,bias}
    """

    def __init__(self, cfg: ViTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        cfg.validate()
        if attn_implementation not in _ATTN_ALIASES:
            raise ValueError(
                f"unknown attn_implementation {attn_implementation!r}; expected one of {sorted(_ATTN_ALIASES)}"
            )
        self.cfg = cfg
        self.attn_implementation = _ATTN_ALIASES[attn_implementation]
        self.vision_model = _SiglipVisionTransformer(cfg, self.attn_implementation)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each encoder layer in backward (only while training with grad enabled)."""
        self.activation_checkpointing = bool(enabled)

    # ------------------------------------------------------------------ helpers
    def _validate(self, pixels: Tensor, position_ids: Tensor, seqlens: Tensor | Sequence[int]) -> list[int]:
        if pixels.ndim != 2 or pixels.shape[1] != self.cfg.patch_dim:
            raise ValueError(
                f"packed_pixel_values must be [N, {self.cfg.patch_dim}] (patch_size²·channels), "
                f"got {tuple(pixels.shape)}"
            )
        n_tokens = pixels.shape[0]
        if position_ids.ndim != 1 or position_ids.shape[0] != n_tokens:
            raise ValueError(f"packed_position_ids must be [N={n_tokens}], got {tuple(position_ids.shape)}")
        if position_ids.dtype.is_floating_point:
            raise TypeError("packed_position_ids must be an integer tensor")
        if isinstance(seqlens, Tensor):
            if seqlens.ndim != 1 or seqlens.dtype.is_floating_point:
                raise ValueError(
                    f"seqlens must be a 1-D integer tensor [n_images], got {seqlens.dtype} {tuple(seqlens.shape)}"
                )
            # One host sync for the lengths: the padded batch shape depends on them anyway.
            lens = [int(v) for v in seqlens.tolist()]
        else:
            lens = [int(v) for v in seqlens]
        if any(v <= 0 for v in lens):
            raise ValueError(f"every image needs at least one patch, got seqlens={lens}")
        if sum(lens) != n_tokens:
            raise ValueError(f"seqlens sum to {sum(lens)} but {n_tokens} packed tokens were given")
        if n_tokens:
            num_pos = self.vision_model.embeddings.position_embedding.num_embeddings
            lo, hi = (int(v) for v in torch.aminmax(position_ids))
            if lo < 0 or hi >= num_pos:
                raise ValueError(
                    f"packed_position_ids must lie in [0, {num_pos}) (max_num_patch_per_side="
                    f"{self.cfg.max_num_patch_per_side}), got range [{lo}, {hi}]"
                )
        return lens

    def _attention_mask(self, valid: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Key-padding mask in the form the chosen transformers attention interface expects.

        ``valid`` is bool ``[B, L]`` (True = real token).
        """
        if self.attn_implementation.startswith("flash"):
            # transformers' flash path unpads with a 2-D 0/1 mask and runs the varlen kernel.
            return valid.to(torch.int32)
        if self.attn_implementation == "sdpa":
            # Boolean (True = attend) so it works whatever dtype q/k end up in under autocast.
            return valid[:, None, None, :]
        # eager adds the mask to the scores.
        additive = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        additive.masked_fill_(~valid, torch.finfo(dtype).min)
        return additive[:, None, None, :]

    def _run_layer(self, layer: nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden, mask, use_reentrant=False)
        return layer(hidden, mask)

    # ------------------------------------------------------------------ forward
    def forward(
        self, packed_pixel_values: Tensor, packed_position_ids: Tensor, seqlens: Tensor | Sequence[int]
    ) -> Tensor:
        """Pixels ``[N, patch_dim]``, grid ids ``[N]`` (row·max_side + col), patches per image -> ``[N, hidden]``."""
        lens = self._validate(packed_pixel_values, packed_position_ids, seqlens)
        vm = self.vision_model
        hidden = vm.embeddings(packed_pixel_values, packed_position_ids)  # [N, D]
        n_tokens, dim = hidden.shape
        if n_tokens == 0:
            return vm.post_layernorm(hidden)

        n_images, max_len = len(lens), max(lens)
        device = hidden.device
        needs_mask = min(lens) != max_len
        # Pad/unpad indices computed once: packed token t of image b at offset o goes to row b·max_len + o.
        lens_t = torch.tensor(lens, device=device)
        image_of_token = torch.repeat_interleave(torch.arange(n_images, device=device), lens_t)
        starts = torch.cumsum(lens_t, 0) - lens_t
        offset = torch.arange(n_tokens, device=device) - starts[image_of_token]
        flat_index = image_of_token * max_len + offset

        if needs_mask:
            padded = hidden.new_zeros(n_images * max_len, dim).index_put((flat_index,), hidden)
            valid = torch.arange(max_len, device=device)[None, :] < lens_t[:, None]
            mask = self._attention_mask(valid, hidden.dtype)
        else:
            # Equal lengths: packing order already is the batch layout and no mask is needed.
            padded, mask = hidden, None
        padded = padded.view(n_images, max_len, dim)

        for layer in vm.encoder.layers:
            padded = self._run_layer(layer, padded, mask)

        out = padded.reshape(n_images * max_len, dim)
        if needs_mask:
            out = out[flat_index]
        return vm.post_layernorm(out)

"""Sequence plans -> one packed batch, in BAGEL's packed-sequence format.

A sample is a list of plan items. Each item becomes one attention split:

============  ===================================================  ======  ===========================
item          tokens                                               mode    RoPE
============  ===================================================  ======  ===========================
TextItem      ``<|im_start|> ids <|im_end|>``                      causal  one id per token
ViTImage      ``<|vision_start|>`` N patches ``<|vision_end|>``    full    all share r; r += 1
VAEImage      ``<|vision_start|>`` h*w latents ``<|vision_end|>``  full    all share r; r += 1 (clean)
(noised)                                                           noise   all share r; r unchanged
============  ===================================================  ======  ===========================

Items with ``enable_cfg`` may be dropped for classifier-free guidance training: a dropped text
leaves r unchanged, a dropped image advances it by one. Markers are text tokens (und expert); only
latent tokens go to the generation expert.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Union

import torch

from unigendet.data.tokenizer import SpecialTokenIds
from unigendet.data.transforms import flat_position_ids, patchify
from unigendet.labels import LABEL_FAKE, LABEL_REAL
from unigendet.ops.attention import PackedLayout


@dataclass
class TextItem:
    ids: list[int]
    loss: bool = False
    enable_cfg: bool = False
    # Set on a detection answer: 1 = fake, 0 = real (the project's internal convention; loaders
    # map each dataset's convention to this one). The head reads this answer's ``<|im_start|>``.
    detection_label: int | None = None


@dataclass
class ViTImage:
    image: torch.Tensor  # [3, H, W], normalised for the ViT, H and W multiples of the patch size
    enable_cfg: bool = False


@dataclass
class VAEImage:
    image: torch.Tensor  # [3, H, W] in [-1, 1], H and W multiples of the latent token stride
    noised: bool = False  # True: a generation target (noise split, MSE loss); False: clean context
    enable_cfg: bool = False


PlanItem = Union[TextItem, ViTImage, VAEImage]
_STRIDE_NAME = {"ViT": "patch size", "VAE": "latent token stride"}


def detection_sample(
    question_ids: list[int],
    answer_ids: list[int],
    vae_image: torch.Tensor | None,
    vit_image: torch.Tensor,
    label: int | None,
    prefix_ids: list[int] | None = None,
    smsa: bool = True,
) -> list[PlanItem]:
    """SMSA layout: [prefix text] -> clean VAE image -> ViT image -> question -> answer (CE loss, and the
    detection head at the answer's ``<|im_start|>``). ``smsa=False`` drops the VAE block (the paper's ablation)."""
    if label is not None and label not in (LABEL_REAL, LABEL_FAKE):
        raise ValueError(f"detection label must be {LABEL_REAL} (real) or {LABEL_FAKE} (fake), got {label!r}")
    if smsa and vae_image is None:
        raise ValueError("an SMSA detection sample needs the VAE-transformed image (or smsa=False)")
    items: list[PlanItem] = []
    if prefix_ids:
        items.append(TextItem(list(prefix_ids)))
    if smsa:
        items.append(VAEImage(vae_image, noised=False))
    items.append(ViTImage(vit_image))
    items.append(TextItem(list(question_ids)))
    items.append(TextItem(list(answer_ids), loss=True, detection_label=label))
    return items


def text_to_image_sample(caption_ids: list[int], vae_image: torch.Tensor) -> list[PlanItem]:
    """Caption (droppable for CFG) -> noised VAE image (flow-matching target)."""
    return [TextItem(list(caption_ids), enable_cfg=True), VAEImage(vae_image, noised=True)]


def plan_num_tokens(items: list[PlanItem], geometry: "PackGeometry") -> int:
    """Exact packed length of a plan without CFG dropout (text + 2 markers, image tokens + 2)."""
    total = 0
    for item in items:
        if isinstance(item, TextItem):
            total += len(item.ids) + 2
        elif isinstance(item, ViTImage):
            _, H, W = item.image.shape
            total += (H // geometry.vit_patch_size) * (W // geometry.vit_patch_size) + 2
        else:
            _, H, W = item.image.shape
            total += (H // geometry.latent_stride) * (W // geometry.latent_stride) + 2
    return total


@dataclass
class PlanSample:
    """One training example laid out as a sequence plan, ready for packing."""

    items: list[PlanItem]
    num_tokens: int  # packed length without CFG dropout (``plan_num_tokens``)
    kind: str  # "detection" or "t2i"
    key: str  # stable id of the source record (dedupe, held-out splits, debugging)
    # Extra views of the same record, each packed into its own batch under its name (e.g. the frozen
    # DIGA teacher's view of the ground-truth image). Sample hooks of the encoder fill them.
    views: dict[str, list[PlanItem]] = field(default_factory=dict)


@dataclass
class CFGDropout:
    """Training-time classifier-free-guidance dropout probabilities (reference: 0.1 / 0.3 / 0.3)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


@dataclass
class PackedBatch:
    """Every field a forward pass needs; tensors are on one device (``to``)."""

    sequence_length: int
    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]
    position_ids: torch.Tensor  # Long [L]
    text_ids: torch.Tensor  # Long [T] (text tokens incl. all markers)
    text_indexes: torch.Tensor  # Long [T]
    vit_tokens: torch.Tensor  # [N, patch_dim]
    vit_position_ids: torch.Tensor  # Long [N]
    vit_token_indexes: torch.Tensor  # Long [N]
    vit_seqlens: torch.Tensor  # Long [n_vit]
    vit_shapes: list[tuple[int, int]]  # patch grid (h, w) per ViT image
    vae_images: list[torch.Tensor]  # n_vae images [3, H, W]
    vae_noised: torch.Tensor  # Bool [n_vae]
    latent_shapes: list[tuple[int, int]]  # token grid (h, w) per VAE image
    latent_position_ids: torch.Tensor  # Long [M]
    vae_token_indexes: torch.Tensor  # Long [M]
    latent_image_ids: torch.Tensor  # Long [M]: which VAE image each latent token belongs to
    mse_loss_indexes: torch.Tensor  # Long [M_noised]: positions of noised latent tokens
    ce_loss_indexes: torch.Tensor  # Long [C]
    ce_label_ids: torch.Tensor  # Long [C]
    det_indexes: torch.Tensor  # Long [n_det]: the answer's <|im_start|> position
    det_labels: torch.Tensor  # Long [n_det]: 1 = fake, 0 = real
    sample_kinds: list[str] = field(default_factory=list)
    # One pack per view name, holding the views of the samples that have one, in sample order.
    views: dict[str, "PackedBatch"] = field(default_factory=dict)

    @property
    def layout(self) -> PackedLayout:
        return PackedLayout(tuple(self.sample_lens), tuple(self.split_lens), tuple(self.attn_modes))

    @property
    def num_latent_tokens(self) -> int:
        return int(self.vae_token_indexes.numel())

    @property
    def mse_token_mask(self) -> torch.Tensor:
        """Bool [M]: which latent tokens (in latent order) carry the flow-matching loss."""
        return self.vae_noised[self.latent_image_ids] if self.num_latent_tokens else self.vae_noised.new_zeros(0)

    def to(self, device: torch.device | str) -> "PackedBatch":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif f.name == "vae_images":
                v = [img.to(device, non_blocking=True) for img in v]
            elif f.name == "views":
                v = {name: view.to(device) for name, view in v.items()}
            values[f.name] = v
        return PackedBatch(**values)


@dataclass
class PackGeometry:
    vit_patch_size: int = 14
    vit_max_num_patch_per_side: int = 70
    latent_stride: int = 16  # pixels per latent token side (VAE downsample x latent patch)
    max_latent_size: int = 64


class PackBuilder:
    """Lays out samples into one ``PackedBatch``. ``rng`` drives CFG dropout only.

    The builder knows nothing of tokenizers or the VAE: it receives token ids and image tensors, and the
    objective encodes ``vae_images`` with the VAE (laying out the pack needs only the latent grid size)."""

    def __init__(
        self,
        special: SpecialTokenIds,
        geometry: PackGeometry,
        cfg_dropout: CFGDropout | None = None,
        rng: random.Random | None = None,
    ):
        self.special = special
        self.geometry = geometry
        self.cfg_dropout = cfg_dropout or CFGDropout(0.0, 0.0, 0.0)
        self.rng = rng or random.Random(0)

    def _dropped(self, item: PlanItem) -> bool:
        if not item.enable_cfg:
            return False
        p = {TextItem: self.cfg_dropout.text, ViTImage: self.cfg_dropout.vit, VAEImage: self.cfg_dropout.vae}[type(item)]
        return p > 0 and self.rng.random() < p

    def build_samples(self, samples: list[PlanSample]) -> PackedBatch:
        """Pack ``samples``, and each name of their extra ``views`` into ``batch.views[name]`` (the
        views of the samples that have one, in sample order)."""
        batch = self.build([s.items for s in samples], [s.kind for s in samples])
        for name in dict.fromkeys(name for s in samples for name in s.views):
            views = [s.views[name] for s in samples if name in s.views]
            # Views are never dropped: whoever reads them must see exactly the record.
            batch.views[name] = PackBuilder(self.special, self.geometry).build(views, [name] * len(views))
        return batch

    def build(self, samples: list[list[PlanItem]], kinds: list[str] | None = None) -> PackedBatch:
        if not samples:
            raise ValueError("cannot pack an empty list of samples")
        st = _PackState()
        for s_idx, sample in enumerate(samples):
            if not sample:
                raise ValueError(f"sample {s_idx} has an empty sequence plan")
            start = st.cursor
            rope = 0
            for item in sample:
                if self._dropped(item):
                    if not isinstance(item, TextItem):
                        rope += 1
                    continue
                if isinstance(item, TextItem):
                    rope = self._add_text(st, item, rope)
                elif isinstance(item, ViTImage):
                    rope = self._add_vit(st, item, rope)
                elif isinstance(item, VAEImage):
                    rope = self._add_vae(st, item, rope)
                else:
                    raise TypeError(f"sample {s_idx}: unknown plan item {type(item).__name__}")
            if st.cursor == start:
                raise ValueError(f"sample {s_idx} has no tokens after CFG dropout")
            st.sample_lens.append(st.cursor - start)
        return st.finish(kinds or ["sample"] * len(samples))

    # Each _add_* appends one split and returns the RoPE id that follows it.

    def _add_text(self, st: "_PackState", item: TextItem, rope: int) -> int:
        ids = [self.special.bos, *item.ids, self.special.eos]
        positions = st.take(len(ids))
        st.text_ids += ids
        st.text_indexes += positions
        st.position_ids += list(range(rope, rope + len(ids)))
        if item.loss:
            # Position k predicts token k+1: <|im_start|>, t1..tn predict t1..tn, <|im_end|>.
            st.ce_indexes += positions[:-1]
            st.ce_labels += ids[1:]
        if item.detection_label is not None:
            if not item.loss:
                raise ValueError("a detection answer must be a loss-bearing text item")
            st.det_indexes.append(positions[0])
            st.det_labels.append(int(item.detection_label))
        st.split("causal", len(ids))
        return rope + len(ids)

    def _add_markers(self, st: "_PackState", first: int, last: int) -> None:
        st.text_ids += [self.special.start_of_image, self.special.end_of_image]
        st.text_indexes += [first, last]

    def _image_block(self, st: "_PackState", image: torch.Tensor, stride: int, what: str, rope: int):
        """Markers + one token per ``stride``-pixel cell, all at RoPE id ``rope``; returns (h, w, positions)."""
        _, H, W = image.shape
        if H % stride or W % stride:
            raise ValueError(f"{what} image {H}x{W} is not a multiple of the {_STRIDE_NAME[what]} {stride}")
        h, w = H // stride, W // stride
        positions = st.take(h * w + 2)
        st.position_ids += [rope] * (h * w + 2)
        self._add_markers(st, positions[0], positions[-1])
        return h, w, positions

    def _add_vit(self, st: "_PackState", item: ViTImage, rope: int) -> int:
        g = self.geometry
        h, w, positions = self._image_block(st, item.image, g.vit_patch_size, "ViT", rope)
        n = h * w
        st.vit_tokens.append(patchify(item.image, g.vit_patch_size))
        st.vit_position_ids.append(flat_position_ids(h, w, g.vit_max_num_patch_per_side))
        st.vit_indexes += positions[1:-1]
        st.vit_seqlens.append(n)
        st.vit_shapes.append((h, w))
        st.split("full", n + 2)
        return rope + 1

    def _add_vae(self, st: "_PackState", item: VAEImage, rope: int) -> int:
        g = self.geometry
        h, w, positions = self._image_block(st, item.image, g.latent_stride, "VAE", rope)
        n = h * w
        image_id = len(st.vae_images)
        st.vae_images.append(item.image)
        st.vae_noised.append(item.noised)
        st.latent_shapes.append((h, w))
        st.latent_position_ids.append(flat_position_ids(h, w, g.max_latent_size))
        st.vae_indexes += positions[1:-1]
        st.latent_image_ids += [image_id] * n
        if item.noised:
            st.mse_indexes += positions[1:-1]
        st.split("noise" if item.noised else "full", n + 2)
        # A noised image is predicted, not read: later tokens continue from the same RoPE id.
        return rope if item.noised else rope + 1


@dataclass
class _PackState:
    cursor: int = 0
    sample_lens: list[int] = field(default_factory=list)
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text_indexes: list[int] = field(default_factory=list)
    vit_tokens: list[torch.Tensor] = field(default_factory=list)
    vit_position_ids: list[torch.Tensor] = field(default_factory=list)
    vit_indexes: list[int] = field(default_factory=list)
    vit_seqlens: list[int] = field(default_factory=list)
    vit_shapes: list[tuple[int, int]] = field(default_factory=list)
    vae_images: list[torch.Tensor] = field(default_factory=list)
    vae_noised: list[bool] = field(default_factory=list)
    latent_shapes: list[tuple[int, int]] = field(default_factory=list)
    latent_position_ids: list[torch.Tensor] = field(default_factory=list)
    vae_indexes: list[int] = field(default_factory=list)
    latent_image_ids: list[int] = field(default_factory=list)
    mse_indexes: list[int] = field(default_factory=list)
    ce_indexes: list[int] = field(default_factory=list)
    ce_labels: list[int] = field(default_factory=list)
    det_indexes: list[int] = field(default_factory=list)
    det_labels: list[int] = field(default_factory=list)

    def take(self, n: int) -> list[int]:
        out = list(range(self.cursor, self.cursor + n))
        self.cursor += n
        return out

    def split(self, mode: str, n: int) -> None:
        self.split_lens.append(n)
        self.attn_modes.append(mode)

    def finish(self, kinds: list[str]) -> PackedBatch:
        long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        order = sorted(range(len(self.text_indexes)), key=self.text_indexes.__getitem__)
        patch_dim = self.vit_tokens[0].shape[1] if self.vit_tokens else 0
        return PackedBatch(
            sequence_length=self.cursor,
            sample_lens=self.sample_lens,
            split_lens=self.split_lens,
            attn_modes=self.attn_modes,
            position_ids=long(self.position_ids),
            text_ids=long([self.text_ids[i] for i in order]),
            text_indexes=long([self.text_indexes[i] for i in order]),
            vit_tokens=torch.cat(self.vit_tokens) if self.vit_tokens else torch.zeros(0, patch_dim),
            vit_position_ids=torch.cat(self.vit_position_ids) if self.vit_position_ids else long([]),
            vit_token_indexes=long(self.vit_indexes),
            vit_seqlens=long(self.vit_seqlens),
            vit_shapes=self.vit_shapes,
            vae_images=self.vae_images,
            vae_noised=torch.tensor(self.vae_noised, dtype=torch.bool),
            latent_shapes=self.latent_shapes,
            latent_position_ids=torch.cat(self.latent_position_ids) if self.latent_position_ids else long([]),
            vae_token_indexes=long(self.vae_indexes),
            latent_image_ids=long(self.latent_image_ids),
            mse_loss_indexes=long(self.mse_indexes),
            ce_loss_indexes=long(self.ce_indexes),
            ce_label_ids=long(self.ce_labels),
            det_indexes=long(self.det_indexes),
            det_labels=long(self.det_labels),
            sample_kinds=kinds,
        )

"""Records to ``PlanSample``s: :class:`SampleEncoder` tokenises text and transforms images into the
detection (SMSA) and text-to-image layouts; :class:`SampleSource` is what the stream needs from a source;
:class:`SampleHook` lets a training objective attach extra views to every text-to-image sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from unigendet.data.images import PIL_DECODE_ERRORS
from unigendet.data.packing import (
    PackGeometry,
    PlanSample,
    detection_sample,
    plan_num_tokens,
    text_to_image_sample,
)
from unigendet.data.quality import BadSample
from unigendet.data.tokenizer import encode_text
from unigendet.data.transforms import ImageTransform

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_TAG = "<image>"
KIND_DETECTION = "detection"
KIND_T2I = "t2i"


class SampleSource(Protocol):
    """What the stream needs from a source."""

    name: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> PlanSample: ...


@dataclass(frozen=True)
class TextToImageRecord:
    """One text-to-image record as a sample hook sees it: the decoded image, its caption, and the VAE
    tensor the sample's noised block holds (hooks reuse it rather than transforming the image again)."""

    image: Image.Image
    caption: str
    vae_image: torch.Tensor
    key: str


class SampleHook(Protocol):
    """Called by the encoder for every text-to-image sample it makes, after the sample is complete;
    may attach extra views of the record (``sample.views[name] = items``). Hooks run in the data
    workers, so they must be picklable; a ``BadSample`` they raise skips the record like any other."""

    def __call__(self, encoder: "SampleEncoder", sample: PlanSample, record: TextToImageRecord) -> None: ...


@dataclass
class SampleEncoder:
    """Tokenises text and transforms images into the two training layouts.

    No special-token ids are needed: the packer adds ``<|im_start|>``/``<|im_end|>`` and the vision
    markers itself. ``max_tokens_per_sample`` bounds the exact packed length (``plan_num_tokens``).
    """

    tokenizer: PreTrainedTokenizerBase
    geometry: PackGeometry
    vit_transform: ImageTransform
    vae_transform: ImageTransform
    smsa: bool = True
    max_tokens_per_sample: int = 16384
    # Called in order for every text-to-image sample (see SampleHook).
    t2i_hooks: tuple[SampleHook, ...] = ()

    def __post_init__(self) -> None:
        g = self.geometry
        # The transforms must produce what the packer accepts; a mismatch would fail every sample, so it
        # is a configuration error, reported once here.
        if self.vit_transform.stride != g.vit_patch_size:
            raise ValueError(f"ViT transform stride {self.vit_transform.stride} != patch size {g.vit_patch_size}")
        if self.vae_transform.stride != g.latent_stride:
            raise ValueError(f"VAE transform stride {self.vae_transform.stride} != latent stride {g.latent_stride}")
        if self.vit_transform.max_size // g.vit_patch_size > g.vit_max_num_patch_per_side:
            raise ValueError(
                f"ViT transform max_size {self.vit_transform.max_size} gives more than "
                f"{g.vit_max_num_patch_per_side} patches per side (the position table)"
            )
        if self.vae_transform.max_size // g.latent_stride > g.max_latent_size:
            raise ValueError(
                f"VAE transform max_size {self.vae_transform.max_size} gives more than "
                f"{g.max_latent_size} latents per side (the position table)"
            )
        if self.max_tokens_per_sample < 1:
            raise ValueError(f"max_tokens_per_sample must be positive, got {self.max_tokens_per_sample}")

    def detection(
        self, image: Image.Image, question: str, answer: str, label: int, prefix: str = "", key: str = ""
    ) -> PlanSample:
        """SMSA sample: [prefix] -> clean VAE image -> ViT image -> question -> answer (CE + head label).

        Both image blocks are transforms of the *original* image (no VAE pre-resize before the ViT
        transform, unlike the reference's evaluation path).
        """
        vit = self.vit_image(image, key)
        vae = self._transform(self.vae_transform, image, key) if self.smsa else None
        items = detection_sample(
            question_ids=self.encode(question),
            answer_ids=self.encode(answer),
            vae_image=vae,
            vit_image=vit,
            label=label,
            prefix_ids=self.encode(prefix) if prefix else None,
            smsa=self.smsa,
        )
        return self._finish(items, KIND_DETECTION, key)

    def text_to_image(self, image: Image.Image, caption: str, key: str = "") -> PlanSample:
        """Caption (CFG-droppable) -> noised VAE image; then the ``t2i_hooks``."""
        vae = self._transform(self.vae_transform, image, key)
        sample = self._finish(text_to_image_sample(self.encode(caption), vae), KIND_T2I, key)
        if self.t2i_hooks:
            record = TextToImageRecord(image, caption, vae, key)
            for hook in self.t2i_hooks:
                hook(self, sample, record)
        return sample

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens: the packer adds the markers)."""
        return encode_text(self.tokenizer, text)

    def vit_image(self, image: Image.Image, key: str = "") -> torch.Tensor:
        """The ViT block's tensor of ``image``; a failing transform is a ``BadSample``."""
        return self._transform(self.vit_transform, image, key)

    @staticmethod
    def _transform(transform: ImageTransform, image: Image.Image, key: str):
        try:
            return transform(image)
        except PIL_DECODE_ERRORS as err:
            raise BadSample("unreadable_image", f"{key}: transform failed: {type(err).__name__}: {err}") from None

    def _finish(self, items, kind: str, key: str) -> PlanSample:
        num_tokens = plan_num_tokens(items, self.geometry)
        if num_tokens > self.max_tokens_per_sample:
            limit = self.max_tokens_per_sample
            raise BadSample("too_long", f"{key}: {num_tokens} tokens > max_tokens_per_sample={limit}")
        return PlanSample(items=items, num_tokens=num_tokens, kind=kind, key=key)

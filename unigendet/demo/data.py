"""Embedded demo data: real photo crops, generator-made fakes, FakeClue JSON and a LAION-like parquet.

The CPU demo must train on *something* without downloading anything, and its held-out detection accuracy
must mean that the model learned generator artefacts. So this module builds, in a few seconds and
deterministically for a seed:

* **Real images**: random crops (plus flips and small downscales) of the natural photographs that ship
  *inside* the scikit-image wheel (no pooch download; the files are read straight from the package
  directory, skimage is never imported); the held-out photographs come from the scikit-learn and matplotlib wheels
  the same way.
* **Fake images**: crops of the same photographs passed through generator-like processes that leave the
  artefacts real generators leave (uneven transposed-convolution overlap, nearest-upsample decoders,
  over-smoothing with a latent-grid pattern). Each fake is then given the per-channel mean/std of the crop
  it came from, so global colour statistics do not give the label away; the task is about texture.
  Every process works on each channel with the *same* weights, so a grayscale source stays exactly gray
  (a colour cast on a gray photo would be a trivial give-away).
* **Content-matched pairs** (optional, the demo's default): each training fake is made from the very crop of the
  training real before it, so no image's content tells its label; the held-out sets stay unpaired.
* **Two framings**: detection crops are close-ups (windows of 1-1.5x the output size: texture, where the
  artefacts are); the text-to-image data are wide views (85-100 % of the band's short side, downscaled: the
  photograph's layout, what a caption names), so the generator learns to draw each photograph.
* **Splits**: every training photo is cut along its long side into a training band and a held-out band; training
  crops come only from the first. Four held-out detection sets then measure four kinds of generalisation:
  ``heldout`` (unseen crops: the held-out bands, the training generator instances), ``heldout_photos`` (unseen
  natural photographs, never used in training, with the training generator instances), ``heldout_generators``
  (the held-out bands' reals against fakes from *other* random instances of the same generator families) and
  ``heldout_domains`` (unseen imaging domains: astronomy, fundus and microscope images, training generator
  instances).

Outputs (``out_dir`` is the image root, as FakeClue's ``image`` fields are relative paths)::

    images/real/NNNNNN.png, images/fake/NNNNNN.png
    fakeclue_train.json, fakeclue_heldout.json   # FakeClue format, label 1 = real, 0 = fake
    fakeclue_heldout_photos.json, fakeclue_heldout_generators.json, fakeclue_heldout_domains.json
    t2i_train.parquet, t2i_heldout.parquet      # columns image (PNG bytes), caption, key, photo (wide views)
    demo_manifest.json                           # per image: split, label, source photo, crop box, process

All image arithmetic is float64 numpy plus PIL resizing, so the bytes do not depend on the thread count.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from unigendet.labels import FAKECLUE_FAKE, FAKECLUE_REAL

logger = logging.getLogger(__name__)

DEMO_CATEGORY = "demo"
DEMO_QUESTION = "<image>\nIs this image real or fake? Explain your reasoning."
# The official FakeClue evaluation reads the predicted label from these phrases (case-insensitive substrings).
REAL_ANSWER_PREFIX = "This is a real image."
FAKE_ANSWER_PREFIX = "This is a fake image."

TRAIN_JSON = "fakeclue_train.json"
HELDOUT_JSON = "fakeclue_heldout.json"
HELDOUT_PHOTOS_JSON = "fakeclue_heldout_photos.json"
HELDOUT_GENERATORS_JSON = "fakeclue_heldout_generators.json"
HELDOUT_DOMAINS_JSON = "fakeclue_heldout_domains.json"
T2I_PARQUET = "t2i_train.parquet"
T2I_HELDOUT_PARQUET = "t2i_heldout.parquet"
MANIFEST_JSON = "demo_manifest.json"

# Fraction of each photo's long side that belongs to the training band; the rest is the held-out band.
TRAIN_BAND = 0.7
# Crops are taken as windows of this many source pixels per output pixel and downscaled to the output
# size: never upscaled, because upscaling would itself remove fine detail and make reals look "generated".
CROP_SCALE_RANGE = (1.0, 1.5)
# Wide views (the text-to-image data): windows of this fraction of the band's short side, downscaled to the output
# size. Most of the band, so that each caption names one recognisable picture a tiny generator can learn in minutes.
# (Detection crops stay close-ups: with half of them wide views, measured, the demo model's detection loss stayed
# at ln 2 for 300+ steps, against 85% training accuracy after 250 steps on close-ups.)
T2I_WINDOW_RANGE = (0.85, 1.0)
# Windows flatter than this (gray std in [0, 1] units) are re-drawn: a flat patch carries no texture for
# either class, so it is noise in the labels.
MIN_CROP_STD = 0.03
_MAX_CROP_TRIES = 50

FAKE_PROCESSES = ("upsample_checkerboard", "conv_decoder", "smooth_grid")
# Random instances of each generator family ("weights" drawn independently): the training fakes come from the first
# group, the ``heldout_generators`` fakes from the second, so a detector must learn what a family's instances share.
TRAIN_GENERATOR_INSTANCES = 4
HELDOUT_GENERATOR_INSTANCES = 2


# Where each package keeps the sample images its wheel ships (read as files, the packages are never imported).
_BUNDLED_IMAGE_DIRS = {"skimage": "data", "sklearn": "datasets/images", "matplotlib": "mpl-data/sample_data"}


@dataclass(frozen=True)
class DemoSource:
    """A photograph bundled inside an installed wheel and the words used to caption and describe it."""

    name: str
    filename: str
    gray: bool
    subjects: tuple[str, ...]  # noun phrases for captions ("an astronaut in a white spacesuit")
    short: str  # short phrase for explanations ("the astronaut")
    package: str = "skimage"  # the wheel that ships the file: a key of _BUNDLED_IMAGE_DIRS

    @property
    def path(self) -> Path:
        return bundled_image_dir(self.package) / self.filename


# Only files present in the scikit-image wheel itself (skimage/data/*), never the pooch-fetched ones.
# Synthetic or binary images (chessboard, logo, horse silhouette, phantom, colour wheel) are left out:
# the "real" class must look like photographs.
DEMO_SOURCES: tuple[DemoSource, ...] = (
    DemoSource("astronaut", "astronaut.png", False,
               ("an astronaut in a white spacesuit", "astronaut Eileen Collins in front of the American flag",
                "a smiling astronaut"), "the astronaut"),
    DemoSource("coffee", "coffee.png", False,
               ("a cup of coffee on a saucer", "a red coffee cup with a spoon", "a cup of hot coffee on a table"),
               "the coffee cup"),
    DemoSource("chelsea", "chelsea.png", False,
               ("a tabby cat", "a ginger cat looking to the side", "the face of a cat"), "the cat"),
    DemoSource("rocket", "rocket.jpg", False,
               ("a rocket on a launch pad", "a space rocket ready for launch", "a rocket next to its launch tower"),
               "the rocket"),
    DemoSource("motorcycle", "motorcycle_left.png", False,
               ("a motorcycle in a workshop", "a parked motorbike", "a motorcycle next to a workbench"),
               "the motorcycle"),
    DemoSource("ihc", "ihc.png", False,
               ("stained tissue under a microscope", "an immunohistochemistry slide",
                "cells stained brown and blue"), "the tissue sample"),
    DemoSource("camera", "camera.png", True,
               ("a camera man", "a photographer with a camera on a tripod", "a man operating a camera in a park"),
               "the camera man"),
    DemoSource("coins", "coins.png", True,
               ("old coins", "a collection of ancient coins", "coins on a dark background"), "the coins"),
    DemoSource("moon", "moon.png", True,
               ("the surface of the moon", "lunar craters", "the cratered lunar surface"), "the lunar surface"),
    DemoSource("brick", "brick.png", True,
               ("a brick wall", "weathered bricks", "a wall of bricks and mortar"), "the brick wall"),
    DemoSource("grass", "grass.png", True,
               ("a patch of grass", "blades of grass", "a lawn seen from above"), "the grass"),
    DemoSource("gravel", "gravel.png", True,
               ("gravel", "small stones on the ground", "a gravel path"), "the gravel"),
    DemoSource("page", "page.png", True,
               ("a printed page of text", "a scanned book page", "a page of printed text"), "the printed page"),
)

# Natural photographs that no training image comes from (shipped by scikit-learn and matplotlib): the
# ``heldout_photos`` set, everyday scenes like the training photographs but never seen.
HELDOUT_SOURCES: tuple[DemoSource, ...] = (
    DemoSource("temple", "china.jpg", False,
               ("a Chinese temple above a lake", "a pagoda among trees", "a tower with red and green roofs"),
               "the temple", package="sklearn"),
    DemoSource("dahlia", "flower.jpg", False,
               ("an orange dahlia", "a flower in bloom", "a dahlia in front of green leaves"), "the flower",
               package="sklearn"),
    DemoSource("hopper", "grace_hopper.jpg", False,
               ("a portrait of Grace Hopper", "an officer in a navy uniform", "an elderly woman in uniform"),
               "the officer", package="matplotlib"),
)

# Photographs of other imaging domains (astronomy, fundus photography, microscopy) that no training image comes
# from: the ``heldout_domains`` set. Smooth, dark or sparse by nature, so they test whether "smooth" was learnt
# as "fake".
HELDOUT_DOMAIN_SOURCES: tuple[DemoSource, ...] = (
    DemoSource("hubble", "hubble_deep_field.jpg", False,
               ("galaxies in deep space", "the Hubble deep field", "distant galaxies on a black sky"), "the galaxies"),
    DemoSource("retina", "retina.jpg", False,
               ("the retina of a human eye", "a fundus photograph", "blood vessels of the retina"), "the retina"),
    DemoSource("cell", "cell.png", True,
               ("cells under a microscope", "a microscope image of cells", "a cell culture"), "the cells"),
)

_COLOR_CAPTION_TEMPLATES = ("a photograph of {}", "a photo of {}", "a close-up photo of {}", "a cropped picture of {}")
_GRAY_CAPTION_TEMPLATES = (
    "a grayscale photo of {}",
    "a black-and-white photograph of {}",
    "a monochrome close-up of {}",
)

# Artefact phrases actually produced by each process (so the written explanations are true).
_FAKE_CLUES: dict[str, tuple[str, ...]] = {
    "upsample_checkerboard": (
        "checkerboard-like upsampling artefacts",
        "a periodic two-pixel pattern in flat regions",
        "uneven pixel intensities along edges",
        "missing fine detail",
    ),
    "conv_decoder": (
        "over-smoothed textures",
        "blocky upsampling patterns",
        "missing fine detail",
        "repetitive synthetic texture",
    ),
    "smooth_grid": (
        "over-smoothed textures",
        "a faint periodic grid pattern",
        "no natural sensor noise",
        "blurred fine structures",
    ),
}
_REAL_CLUES = (
    "natural sensor noise",
    "consistent fine detail",
    "sharp, irregular textures without periodic patterns",
    "edges with natural, non-repeating transitions",
)
_FAKE_TEMPLATES = (
    "This is a fake image. In {subject} I see {a} and {b}, typical traces of a generator's upsampling layers.",
    "This is a fake image. The picture of {subject} shows {a}; together with {b}, this points to a generative model.",
    "This is a fake image. {A} and {b} across {subject} reveal that it was synthesised rather than photographed.",
)
_REAL_TEMPLATES = (
    "This is a real image. {subject_cap} shows {a} and {b}, as expected from a camera.",
    "This is a real image. I find {a} and {b} in {subject}, with no generator artefacts.",
    "This is a real image. {A} and {b} throughout {subject} are consistent with a genuine photograph.",
)


@dataclass(frozen=True)
class DemoDataset:
    """Where :func:`make_demo_dataset` wrote its files, and how many of each."""

    root: Path
    image_root: Path  # FakeClue ``image`` fields are relative to this (== root)
    train_json: Path
    heldout_json: Path
    t2i_parquet: Path
    manifest: Path
    counts: dict[str, int] = field(default_factory=dict)  # <set>_real, <set>_fake per detection set, t2i, t2i_heldout
    # Held-out detection sets by name: heldout (unseen crops), heldout_photos, heldout_generators,
    # heldout_domains.
    heldout_sets: dict[str, Path] = field(default_factory=dict)
    t2i_heldout_parquet: Path | None = None  # wide views of the held-out bands (distribution-distance reference)


# --------------------------------------------------------------------------- source photographs
def bundled_image_dir(package: str) -> Path:
    """The folder of sample images inside an installed wheel (scikit-image, scikit-learn or matplotlib), found
    without importing the package."""
    if package not in _BUNDLED_IMAGE_DIRS:
        raise ValueError(f"no bundled images are known for {package!r}; known: {sorted(_BUNDLED_IMAGE_DIRS)}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the demo data need the photographs bundled with {package}: pip install 'unigendet[demo]'")
    return Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_IMAGE_DIRS[package]


def skimage_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed wheel, found without importing scikit-image."""
    return bundled_image_dir("skimage")


@lru_cache(maxsize=None)
def _load_source(path: Path) -> np.ndarray:
    """Float64 ``[3, H, W]`` in [0, 1] (gray photos replicated to three identical channels)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in its wheel; the demo never downloads data")
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    array = array.transpose(2, 0, 1).copy()
    array.setflags(write=False)  # cached and shared: nobody may modify it
    return array


def _bands(height: int, width: int, split: str) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the split's band: the long side is cut at ``TRAIN_BAND``; ``all`` is the whole
    photograph (the held-out photographs, of which nothing is trained on)."""
    if split == "all":
        return 0, height, 0, width
    if width >= height:
        cut = int(round(width * TRAIN_BAND))
        return (0, height, 0, cut) if split == "train" else (0, height, cut, width)
    cut = int(round(height * TRAIN_BAND))
    return (0, cut, 0, width) if split == "train" else (cut, height, 0, width)


def _window_size(rng: np.random.Generator, max_window: int, size: int, wide: tuple[float, float] | None) -> int:
    """Side of the square source window: close-ups (``wide`` None) barely downscale; wide views take the fraction
    ``wide`` of the band's short side."""
    if wide is None:
        window = int(round(rng.uniform(size * CROP_SCALE_RANGE[0], size * CROP_SCALE_RANGE[1])))
    else:
        window = int(round(rng.uniform(*wide) * max_window))
    return min(max_window, max(size, window))


def _draw_crop(rng: np.random.Generator, source: DemoSource, split: str, size: int,
               wide: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """A ``[3, size, size]`` crop from the split's band of ``source`` and a record of where it came from."""
    photo = _load_source(source.path)
    by0, by1, bx0, bx1 = _bands(photo.shape[1], photo.shape[2], split)
    max_window = min(by1 - by0, bx1 - bx0)
    if max_window < size:
        raise ValueError(f"{source.name}: the {split} band ({by1 - by0}x{bx1 - bx0}) is smaller than {size}")
    for _ in range(_MAX_CROP_TRIES):
        window = _window_size(rng, max_window, size, wide)
        y0 = int(rng.integers(by0, by1 - window + 1))
        x0 = int(rng.integers(bx0, bx1 - window + 1))
        flip = bool(rng.integers(0, 2))
        patch = photo[:, y0:y0 + window, x0:x0 + window]
        if patch.mean(axis=0).std() >= MIN_CROP_STD:
            break
    # Downscale with PIL's antialiasing bicubic filter on the 8-bit image, as a camera pipeline would.
    img = Image.fromarray(np.rint(patch.transpose(1, 2, 0) * 255).astype(np.uint8))
    if window != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0
    box = {"source": source.name, "split": split, "box": [x0, y0, x0 + window, y0 + window], "flip": flip,
           "framing": "close" if wide is None else "wide"}
    return crop, box


# --------------------------------------------------------------------------- generator-like processes
# Helpers work on [C, H, W] float64 arrays, one 2-D kernel shared by every channel.
def _box_down(x: np.ndarray, factor: int) -> np.ndarray:
    c, h, w = x.shape
    return x.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _conv_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with an odd kernel, reflect padding (no dark borders that would be a give-away)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw)), mode="reflect")
    h, w = x.shape[1:]
    out = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


def _conv_transpose_x2(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Transposed conv, 3x3 kernel, stride 2, padding 1, output padding 1 (``H -> 2H``), reflect-padded input.

    With a 3-tap kernel and stride 2 the even output rows receive one tap and the odd rows two (the uneven
    overlap of Odena et al., 2016), so unless the taps happen to balance, the four output phases get
    different gains: the checkerboard of deconvolution-based generators.
    """
    c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    out = np.zeros((c, 2 * (h + 2) + 1, 2 * (w + 2) + 1))
    for a in range(3):
        for b in range(3):
            out[:, a:a + 2 * (h + 2):2, b:b + 2 * (w + 2):2] += kernel[a, b] * xp
    # Input pixel i (padded index i + 1) lands on 2(i + 1) + a; PyTorch's padding=1 puts it at 2i + a - 1.
    return out[:, 3:3 + 2 * h, 3:3 + 2 * w]


def _phase_gains(kernel: np.ndarray) -> np.ndarray:
    """Gain of each of the four output phases of :func:`_conv_transpose_x2` on a constant image."""
    k = kernel
    return np.array([k[1, 1], k[1, 0] + k[1, 2], k[0, 1] + k[2, 1], k[0, 0] + k[0, 2] + k[2, 0] + k[2, 2]])


def _nearest_x2(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, axis=1).repeat(2, axis=2)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(2.5 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


@dataclass(frozen=True)
class _Generators:
    """The fixed random "weights" of the fake processes: drawn once per seed, like trained generators."""

    deconv: tuple[np.ndarray, ...]  # 3x3 transposed-conv kernels
    decoder_smooth: tuple[np.ndarray, np.ndarray]  # 3x3 kernels after each nearest upsample
    decoder_texture: tuple[np.ndarray, np.ndarray]  # zero-sum 3x3 kernels of the texture branch
    grid_tile: np.ndarray  # 8x8 zero-mean, unit-std tile (the VAE's 8x8 latent grid)
    strength: float


def _make_generators(rng: np.random.Generator, strength: float) -> _Generators:
    deconv = []
    for _ in range(2):
        # Around the bilinear kernel outer([.5, 1, .5]) (balanced phases), perturbed like trained weights,
        # and re-drawn until the phases differ by a visible amount, so no "generator" is artefact-free.
        for _ in range(100):
            v = np.array([0.5, 1.0, 0.5]) + rng.normal(0.0, 0.12, 3)
            k = np.outer(v, v) + rng.normal(0.0, 0.04, (3, 3))
            gains = _phase_gains(k)
            k = k / gains.mean()
            gains = gains / gains.mean()
            if gains.max() - gains.min() >= 0.2:
                break
        # Strength scales the departure from perfect balance (the checkerboard amplitude).
        balanced = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5])
        deconv.append(balanced + strength * (k - balanced))

    def smooth_kernel() -> np.ndarray:
        k = np.full((3, 3), 1.0 / 9.0) + rng.normal(0.0, 0.06, (3, 3))
        return k / k.sum()

    def texture_kernel() -> np.ndarray:
        k = rng.normal(0.0, 1.0, (3, 3))
        k -= k.mean()  # zero-sum: it responds to structure, not to brightness
        return k / np.abs(k).sum()

    tile = rng.normal(0.0, 1.0, (8, 8))
    tile = (tile - tile.mean()) / tile.std()
    return _Generators(
        deconv=tuple(deconv),
        decoder_smooth=(smooth_kernel(), smooth_kernel()),
        decoder_texture=(texture_kernel(), texture_kernel()),
        grid_tile=tile,
        strength=strength,
    )


def generator_instances(seed: np.random.SeedSequence, count: int, strength: float) -> tuple[_Generators, ...]:
    """``count`` independent random instances of the generator families, one child seed each."""
    return tuple(_make_generators(np.random.default_rng(child), strength) for child in seed.spawn(count))


def _fake_upsample_checkerboard(x: np.ndarray, gens: _Generators, rng: np.random.Generator) -> np.ndarray:
    """Downsample x2 or x4 (the generator's low-resolution stage), then 1-2 transposed-conv upsamplings.

    Leaves checkerboard patterns (unequal phase gains) and loses the detail above the low-res Nyquist.
    """
    stages = int(rng.integers(1, 3))
    y = _box_down(x, 2**stages)
    first = int(rng.integers(0, len(gens.deconv)))
    for s in range(stages):
        y = _conv_transpose_x2(y, gens.deconv[(first + s) % len(gens.deconv)])
    return y


def _fake_conv_decoder(x: np.ndarray, gens: _Generators, rng: np.random.Generator) -> np.ndarray:
    """A small random decoder from a x4-downsampled input: twice (nearest x2 -> 3x3 smoothing conv ->
    + tanh texture branch). Nearest upsampling plus a short conv leaves blocky 2- and 4-pixel structure; the
    texture branch adds hallucinated, repetitive micro-texture instead of the lost real detail."""
    y = _box_down(x, 4)
    gain = 0.15 * gens.strength
    for smooth, texture in zip(gens.decoder_smooth, gens.decoder_texture):
        y = _conv_same(_nearest_x2(y), smooth)
        y = y + gain * np.tanh(8.0 * _conv_same(y, texture))
    return y


def _fake_smooth_grid(x: np.ndarray, gens: _Generators, rng: np.random.Generator) -> np.ndarray:
    """Diffusion/VAE-like output: over-smoothed (Gaussian blur, no sensor noise) plus a faint fixed pattern
    repeating on the 8x8 latent grid, modulated by local brightness as a decoder's would be."""
    sigma = rng.uniform(0.9, 1.4)
    y = _conv_same(x, _gaussian_kernel(sigma))
    c, h, w = y.shape
    tile = np.tile(gens.grid_tile, (h // 8 + 1, w // 8 + 1))[:h, :w]
    amplitude = 0.025 * gens.strength * rng.uniform(0.8, 1.2)
    return y + amplitude * (0.5 + y) * tile[None]


_PROCESS_FNS = {
    "upsample_checkerboard": _fake_upsample_checkerboard,
    "conv_decoder": _fake_conv_decoder,
    "smooth_grid": _fake_smooth_grid,
}


def _match_stats(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Give ``y`` the per-channel mean and std of ``ref`` (the crop it was made from), then clip to [0, 1].

    A gray source has identical channels in both, so they stay identical.
    """
    y_mean, y_std = y.mean(axis=(1, 2), keepdims=True), y.std(axis=(1, 2), keepdims=True)
    r_mean, r_std = ref.mean(axis=(1, 2), keepdims=True), ref.std(axis=(1, 2), keepdims=True)
    out = (y - y_mean) / np.maximum(y_std, 1e-6) * r_std + r_mean
    return np.clip(out, 0.0, 1.0)


def make_fake(crop: np.ndarray, process: str, gens: _Generators, rng: np.random.Generator) -> np.ndarray:
    """Run one fake process on a ``[3, H, W]`` crop in [0, 1] (H, W divisible by 4)."""
    if crop.shape[1] % 4 or crop.shape[2] % 4:
        raise ValueError(f"fake processes need sides divisible by 4, got {crop.shape[1:]}")
    return _match_stats(_PROCESS_FNS[process](crop, gens, rng), crop)


# --------------------------------------------------------------------------- text
def demo_captions() -> list[str]:
    """One canonical caption per training photograph (prompts for the demo's generation step), in the order of
    ``DEMO_SOURCES``."""
    return [_caption(source, 0, 0) for source in DEMO_SOURCES]


def demo_photo_names() -> list[str]:
    """The training photographs' names, in the order of :func:`demo_captions`."""
    return [source.name for source in DEMO_SOURCES]


def _caption(source: DemoSource, template: int, subject: int) -> str:
    templates = _GRAY_CAPTION_TEMPLATES if source.gray else _COLOR_CAPTION_TEMPLATES
    return templates[template % len(templates)].format(source.subjects[subject % len(source.subjects)])


def _random_caption(source: DemoSource, rng: np.random.Generator) -> str:
    return _caption(source, int(rng.integers(0, 1 << 30)), int(rng.integers(0, len(source.subjects))))


def _explanation(label: int, process: str | None, source: DemoSource, rng: np.random.Generator) -> str:
    clues = _REAL_CLUES if label == FAKECLUE_REAL else _FAKE_CLUES[process]
    templates = _REAL_TEMPLATES if label == FAKECLUE_REAL else _FAKE_TEMPLATES
    i, j = rng.choice(len(clues), size=2, replace=False)
    a, b = clues[int(i)], clues[int(j)]
    template = templates[int(rng.integers(0, len(templates)))]
    return template.format(
        a=a, b=b, A=a[0].upper() + a[1:], subject=source.short, subject_cap=source.short[0].upper() + source.short[1:]
    )


def fakeclue_entry(image: str, label: int, answer: str) -> dict:
    """One FakeClue JSON entry: ``image`` (relative path), ``label`` (FakeClue convention, 1 = real, 0 = fake),
    ``cate`` and a one-turn human/gpt ``conversations`` list."""
    return {
        "image": image,
        "label": label,
        "cate": DEMO_CATEGORY,
        "conversations": [{"from": "human", "value": DEMO_QUESTION}, {"from": "gpt", "value": answer}],
    }


# --------------------------------------------------------------------------- builder
def _png_bytes(array01: np.ndarray) -> bytes:
    img = Image.fromarray(np.rint(array01.transpose(1, 2, 0) * 255).astype(np.uint8))
    buf = io.BytesIO()
    # Fixed compression settings so the bytes (not just the pixels) are reproducible.
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("writing the demo's text-to-image parquet needs pyarrow: pip install pyarrow") from exc
    table = pa.table(
        {
            "image": pa.array([r["image"] for r in rows], type=pa.binary()),
            "caption": pa.array([r["caption"] for r in rows], type=pa.string()),
            "key": pa.array([r["key"] for r in rows], type=pa.string()),
            "photo": pa.array([r["photo"] for r in rows], type=pa.string()),
        }
    )
    pq.write_table(table, path, compression="snappy")


def _split_counts(total: int) -> tuple[int, int]:
    """(real, fake) for a split of ``total`` images: balanced, the odd one real."""
    fake = total // 2
    return total - fake, fake


def fake_process(i: int, num_sources: int) -> str:
    """The process of a split's ``i``-th fake, whose photograph is ``i % num_sources``: the photograph's index plus
    the number of times the photographs have wrapped around, so each photograph's fakes cycle through every process
    whatever the number of photographs (with ``i % 3`` alone, the three held-out photographs would each have had a
    single process, and a per-photo score would have been a per-process one)."""
    return FAKE_PROCESSES[(i % num_sources + i // num_sources) % len(FAKE_PROCESSES)]


@dataclass(frozen=True)
class _DetectionSplit:
    """One detection set: which photographs, which band of them, which generator instances."""

    name: str
    json_name: str
    sources: tuple[DemoSource, ...]
    band: str  # "train", "heldout" or "all"
    generators: tuple[_Generators, ...]  # instances, used in turn
    total: int
    # Each fake is made from the very crop of the real written just before it, so that the two differ only by the
    # generator's artefacts (content-matched pairs); otherwise every image is a crop of its own.
    paired: bool = False


class _ImageWriter:
    """Numbers and writes the PNGs, FakeClue entries and manifest records of every split."""

    def __init__(self, root: Path, proc_rng: np.random.Generator, text_rng: np.random.Generator):
        self.root, self.proc_rng, self.text_rng = root, proc_rng, text_rng
        self.index = {"real": 0, "fake": 0}
        self.manifest: list[dict] = []

    def write_split(self, split: _DetectionSplit, crop_rng: np.random.Generator, size: int) -> list[dict]:
        n_real, n_fake = _split_counts(split.total)
        # Sources cycle so both classes see every photo about equally often (content carries no label); real and
        # fake alternate so that any prefix of a split is balanced.
        kinds = [(kind, i) for i in range(n_real) for kind in ("real", "fake") if kind == "real" or i < n_fake]
        entries = []
        made = dict.fromkeys(FAKE_PROCESSES, 0)
        for kind, i in kinds:
            source = split.sources[i % len(split.sources)]
            if kind == "real" or not split.paired:
                crop, record = _draw_crop(crop_rng, source, split.band, size)
            else:
                record = {**record, "paired_with": entries[-1]["image"]}
            if kind == "real":
                pixels, process, label = crop, None, FAKECLUE_REAL
            else:
                process = fake_process(i, len(split.sources))
                instance = made[process] % len(split.generators)  # every family cycles its instances
                made[process] += 1
                pixels, label = make_fake(crop, process, split.generators[instance], self.proc_rng), FAKECLUE_FAKE
                record["instance"] = instance
            rel = f"images/{kind}/{self.index[kind]:06d}.png"
            self.index[kind] += 1
            (self.root / rel).write_bytes(_png_bytes(pixels))
            entries.append(fakeclue_entry(rel, label, _explanation(label, process, source, self.text_rng)))
            self.manifest.append({"image": rel, "label": label, "process": process, "set": split.name, **record})
        return entries


def _t2i_rows(sources: tuple[DemoSource, ...], band: str, per_photo: int, size: int, rng: np.random.Generator,
              text_rng: np.random.Generator, prefix: str) -> list[dict]:
    """Wide views of each photograph with a random caption of it (the text-to-image data)."""
    rows = []
    for k in range(per_photo):
        for source in sources:
            crop, _ = _draw_crop(rng, source, band, size, wide=T2I_WINDOW_RANGE)
            rows.append({"image": _png_bytes(crop), "caption": _random_caption(source, text_rng),
                         "key": f"{prefix}-{source.name}-{k:03d}", "photo": source.name})
    return rows


def make_demo_dataset(
    out_dir: str | Path,
    num_train: int = 320,
    num_heldout: int = 128,
    image_size: int = 64,
    seed: int = 0,
    artefact_strength: float = 1.0,
    t2i_per_photo: int = 12,
    paired_train: bool = False,
    train_generator_instances: int = TRAIN_GENERATOR_INSTANCES,
) -> DemoDataset:
    """Write the demo's real/fake images, FakeClue JSONs, text-to-image parquets and manifest under ``out_dir``.

    ``num_train`` counts training detection images, ``num_heldout`` the images of *each* held-out set (half real,
    half fake). ``t2i_per_photo`` wide views per training photograph go into each text-to-image parquet (training
    band: ``t2i_train``, held-out band: ``t2i_heldout``, the reference for distribution distances).
    ``artefact_strength`` scales the amplitude of the generator artefacts (1.0 = the tested default).
    ``paired_train`` makes each training fake from the crop of the training real before it (content-matched
    pairs: the label cannot be read from the content of an image); the held-out sets stay unpaired.
    ``train_generator_instances`` random instances of each generator family make the training and ``heldout``
    fakes (``heldout_generators`` uses other instances, from a stream of its own). Same arguments, same bytes.
    """
    if num_train < 2 or num_heldout < 2:
        raise ValueError("each split needs at least one real and one fake image")
    if image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    if artefact_strength <= 0:
        raise ValueError("artefact_strength must be positive")
    if t2i_per_photo < 1:
        raise ValueError(f"t2i_per_photo must be >= 1, got {t2i_per_photo}")
    if train_generator_instances < 1:
        raise ValueError(f"train_generator_instances must be >= 1, got {train_generator_instances}")

    root = Path(out_dir)
    real_dir, fake_dir = root / "images" / "real", root / "images" / "fake"
    real_dir.mkdir(parents=True, exist_ok=True)
    fake_dir.mkdir(parents=True, exist_ok=True)
    # A previous, larger build would leave extra PNGs that no JSON references; remove our own numbered files.
    for directory in (real_dir, fake_dir):
        for stale in directory.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            stale.unlink()

    # Independent streams (one per set for the crops), so that changing one set's size or the text templates does
    # not change the other sets' images.
    gen_seq, unseen_gen_seq, proc_seq, text_seq, t2i_seq, *crop_seqs = np.random.SeedSequence(seed).spawn(10)
    proc_rng, text_rng, t2i_rng = (np.random.default_rng(s) for s in (proc_seq, text_seq, t2i_seq))
    gens = generator_instances(gen_seq, train_generator_instances, artefact_strength)
    unseen_gens = generator_instances(unseen_gen_seq, HELDOUT_GENERATOR_INSTANCES, artefact_strength)
    splits = (
        _DetectionSplit("train", TRAIN_JSON, DEMO_SOURCES, "train", gens, num_train, paired=paired_train),
        _DetectionSplit("heldout", HELDOUT_JSON, DEMO_SOURCES, "heldout", gens, num_heldout),
        _DetectionSplit("heldout_photos", HELDOUT_PHOTOS_JSON, HELDOUT_SOURCES, "all", gens, num_heldout),
        _DetectionSplit("heldout_generators", HELDOUT_GENERATORS_JSON, DEMO_SOURCES, "heldout", unseen_gens,
                        num_heldout),
        _DetectionSplit("heldout_domains", HELDOUT_DOMAINS_JSON, HELDOUT_DOMAIN_SOURCES, "all", gens, num_heldout),
    )
    writer = _ImageWriter(root, proc_rng, text_rng)
    counts: dict[str, int] = {}
    paths: dict[str, Path] = {}
    for split, crop_seq in zip(splits, crop_seqs, strict=True):
        entries = writer.write_split(split, np.random.default_rng(crop_seq), image_size)
        counts[f"{split.name}_real"], counts[f"{split.name}_fake"] = _split_counts(split.total)
        paths[split.name] = root / split.json_name
        paths[split.name].write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    manifest_path = root / MANIFEST_JSON
    manifest_path.write_text(json.dumps(writer.manifest, indent=1) + "\n", encoding="utf-8")

    t2i_paths = {}
    for band, name, prefix in (("train", T2I_PARQUET, "demo"), ("heldout", T2I_HELDOUT_PARQUET, "demo-heldout")):
        rows = _t2i_rows(DEMO_SOURCES, band, t2i_per_photo, image_size, t2i_rng, text_rng, prefix)
        t2i_paths[band] = root / name
        _write_parquet(t2i_paths[band], rows)
        counts["t2i" if band == "train" else "t2i_heldout"] = len(rows)
    logger.info("demo data in %s: %s", root, counts)
    return DemoDataset(
        root=root,
        image_root=root,
        train_json=paths["train"],
        heldout_json=paths["heldout"],
        t2i_parquet=t2i_paths["train"],
        manifest=manifest_path,
        counts=counts,
        heldout_sets={split.name: paths[split.name] for split in splits[1:]},
        t2i_heldout_parquet=t2i_paths["heldout"],
    )

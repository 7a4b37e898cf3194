"""On-disk datasets -> ``PlanSample``s: FakeClue detection JSON and text-to-image tables.

A *source* is a random-access collection of records (``len(source)``, ``source.load(i)``). Building a
source reads only metadata (the FakeClue JSON list, the table schemas, optionally the key column); images
are decoded in ``load``. Problems are split in two kinds:

* Problems with the whole dataset (file missing, JSON unparsable, a column absent, a bad option) raise at
  construction with a message naming the path, so a broken recipe fails before training starts.
* Problems with one record raise :class:`BadSample` from ``load``; the stream
  (:mod:`unigendet.data.sharding`) skips and counts them in a :class:`BadSampleCounter` and stops with
  :class:`DataQualityError` only when too large a fraction of records is bad.

``BadSample.reason`` is one of:

==================  ============================================================================
reason              meaning
==================  ============================================================================
missing_file        the image file does not exist
unreadable_image    the file or bytes are not a decodable image (truncated, corrupt, not an image)
missing_image       a table row has no image value
malformed_entry     a record lacks a field or has a field of the wrong type
unknown_label       the label is neither a known integer of the convention nor "real"/"fake"
empty_conversation  a FakeClue entry has no usable human/gpt turns
no_image_tag        the human turn has no ``<image>`` placeholder (or several)
empty_caption       a text-to-image caption is missing or blank
unreadable_row      the table row itself could not be read
too_long            the laid-out sample exceeds ``max_tokens_per_sample``
==================  ============================================================================

Labels. Datasets disagree on what 0 and 1 mean (FakeClue: 1 = real, 0 = fake; ARForensics/DMimage:
0 = real, 1 = fake). Every source names its convention (:data:`LABEL_CONVENTIONS`) and converts to the
project's internal one (``packing.LABEL_REAL = 0``, ``packing.LABEL_FAKE = 1``) at load time.

Held-out split. :func:`heldout` assigns each record key to the held-out side by a salted SHA-1 of the key,
independent of dataset order, machine and Python version, so a training run (``split="train"``) and the FID
evaluation (``split="heldout"``) given the same fraction and salt provably never share a record.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import io
import json
import logging
import random
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import numpy as np
from PIL import Image

from unigendet.data.packing import (
    LABEL_FAKE,
    LABEL_REAL,
    PackGeometry,
    PlanSample,
    detection_sample,
    diga_teacher_sample,
    plan_num_tokens,
    text_to_image_sample,
)
from unigendet.data.tokenizer import encode_text
from unigendet.data.transforms import ImageTransform, pil_to_rgb

if TYPE_CHECKING:  # datasets is an optional (training) dependency and slow to import
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Split = Literal["train", "heldout", "all"]
SPLITS = ("train", "heldout", "all")
DEFAULT_HELDOUT_SALT = "unigendet"

IMAGE_TAG = "<image>"
KIND_DETECTION = "detection"
KIND_T2I = "t2i"

LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    # FakeClue / FakeVLM: real = 1, fake = 0 (their eval script counts label == 1 as "real").
    "fakeclue": {1: LABEL_REAL, 0: LABEL_FAKE},
    # ARForensics, DMimage (0_real / 1_fake folders) and this project's internal convention.
    "real0_fake1": {0: LABEL_REAL, 1: LABEL_FAKE},
}
_LABEL_WORDS = {"real": LABEL_REAL, "fake": LABEL_FAKE}

# What PIL raises on broken files: OSError (incl. UnidentifiedImageError, "image file is truncated"),
# SyntaxError / struct.error / EOFError / IndexError from some format plugins on damaged headers,
# ValueError on impossible sizes, DecompressionBombError on absurd dimensions.
_PIL_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)


# --------------------------------------------------------------------------------------------------
# Errors and bad-sample accounting


class BadSample(Exception):
    """One record cannot become a training sample; the stream skips it and counts ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # The default exception pickling replays ``args`` (one message), which this __init__ cannot take.
        return type(self), (self.reason, self.detail)


class DataFormatError(ValueError):
    """A whole dataset file is unusable (unparsable, wrong structure, missing columns)."""


class DataQualityError(RuntimeError):
    """Too large a fraction of the records seen so far was bad."""


class BadSampleCounter:
    """Counts good records and bad ones by reason; summable across workers and ranks."""

    def __init__(self) -> None:
        self.good = 0
        self.bad: Counter[str] = Counter()

    def add_good(self, n: int = 1) -> None:
        self.good += n

    def add_bad(self, reason: str, n: int = 1) -> None:
        self.bad[reason] += n

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def seen(self) -> int:
        return self.good + self.num_bad

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.seen if self.seen else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.bad.items())) or "none"
        return f"{self.seen} seen, {self.num_bad} bad ({100 * self.bad_fraction:.2f}%): {reasons}"

    def check(self, max_bad_fraction: float, min_seen: int = 100, what: str = "data") -> None:
        """Raise DataQualityError once ``min_seen`` records were seen and the bad fraction exceeds the limit.

        ``min_seen`` keeps a couple of early bad records from aborting a run on a noisy estimate.
        """
        if self.seen >= min_seen and self.bad_fraction > max_bad_fraction:
            raise DataQualityError(
                f"{what}: bad-sample fraction {self.bad_fraction:.4f} exceeds max_bad_fraction="
                f"{max_bad_fraction} ({self.summary()})"
            )

    def merge(self, other: BadSampleCounter) -> BadSampleCounter:
        """Add ``other``'s counts into this counter (in place) and return it."""
        self.good += other.good
        self.bad.update(other.bad)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.good = int(state["good"])
        self.bad = Counter({str(r): int(n) for r, n in state["bad"].items()})

    def __repr__(self) -> str:
        return f"BadSampleCounter({self.summary()})"


# --------------------------------------------------------------------------------------------------
# Small shared helpers


def heldout(key: str, fraction: float, salt: str = DEFAULT_HELDOUT_SALT) -> bool:
    """True if record ``key`` belongs to the held-out split.

    ``u = first 8 bytes of sha1((salt + key) as UTF-8), big-endian, / 2**64`` is a uniform number in [0, 1)
    fixed by the key alone; the record is held out iff ``u < fraction``. Growing ``fraction`` only moves
    records from train to held-out, never back.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha1((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_indices(keys: Sequence[str], split: Split, fraction: float, salt: str = DEFAULT_HELDOUT_SALT) -> list[int]:
    """Positions of ``keys`` that belong to ``split``."""
    check_split(split, fraction)
    if split == "all":
        return list(range(len(keys)))
    want_heldout = split == "heldout"
    return [i for i, key in enumerate(keys) if heldout(key, fraction, salt) == want_heldout]


def check_split(split: str, fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {fraction}")


def parse_label(value: Any, convention: str, where: str) -> int:
    """Internal label (LABEL_REAL / LABEL_FAKE) of a raw dataset label; BadSample("unknown_label") if none.

    Integers (or digit strings) are read with ``convention``; the words "real"/"fake" are accepted under
    any convention. Booleans are rejected: ``True`` would silently mean 1 in either convention.
    """
    mapping = LABEL_CONVENTIONS[convention]
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _LABEL_WORDS:
            return _LABEL_WORDS[word]
        if word.lstrip("-").isdigit() and int(word) in mapping:
            return mapping[int(word)]
    elif isinstance(value, int) and not isinstance(value, bool) and value in mapping:
        return mapping[value]
    raise BadSample(
        "unknown_label", f"{where}: label {value!r} is not one of {sorted(mapping)} ({convention}) or 'real'/'fake'"
    )


def check_convention(convention: str) -> None:
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; known: {sorted(LABEL_CONVENTIONS)}")


def _decoded_rgb(open_image, where: str) -> Image.Image:
    """Open, fully decode (so truncation shows now, not inside a transform) and convert to RGB."""
    try:
        with open_image() as img:
            img.load()
            return pil_to_rgb(img)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadSample("missing_file", f"{where}: no such image file") from None
    except _PIL_DECODE_ERRORS as err:
        raise BadSample("unreadable_image", f"{where}: {type(err).__name__}: {err}") from None


def load_image_file(path: str | Path) -> Image.Image:
    """RGB image from a file (alpha composited on white); BadSample on a missing or undecodable file."""
    return _decoded_rgb(lambda: Image.open(path), str(path))


def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """RGB image from encoded bytes (PNG, JPEG, ...); BadSample("unreadable_image") if undecodable."""
    return _decoded_rgb(lambda: Image.open(io.BytesIO(data)), where)


# --------------------------------------------------------------------------------------------------
# Records -> plans


class SampleSource(Protocol):
    """What the stream needs from a source."""

    name: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> PlanSample: ...


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
    # DIGA: forensic prompt template (``{caption}`` is replaced); when set, text-to-image samples
    # also carry the frozen teacher's view of their ground-truth image.
    diga_teacher_prompt: str | None = None
    diga_prompt_before_vit: bool = True

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
        vit = self._transform(self.vit_transform, image, key)
        vae = self._transform(self.vae_transform, image, key) if self.smsa else None
        items = detection_sample(
            question_ids=self._encode(question),
            answer_ids=self._encode(answer),
            vae_image=vae,
            vit_image=vit,
            label=label,
            prefix_ids=self._encode(prefix) if prefix else None,
            smsa=self.smsa,
        )
        return self._finish(items, KIND_DETECTION, key)

    def text_to_image(self, image: Image.Image, caption: str, key: str = "") -> PlanSample:
        """Caption (CFG-droppable) -> noised VAE image."""
        vae = self._transform(self.vae_transform, image, key)
        sample = self._finish(text_to_image_sample(self._encode(caption), vae), KIND_T2I, key)
        if self.diga_teacher_prompt is not None:
            vit = self._transform(self.vit_transform, image, key)
            prompt = self._encode(self.diga_teacher_prompt.replace("{caption}", caption))
            sample.teacher_items = diga_teacher_sample(prompt, vae, vit, self.diga_prompt_before_vit)
        return sample

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    @staticmethod
    def _transform(transform: ImageTransform, image: Image.Image, key: str):
        try:
            return transform(image)
        except _PIL_DECODE_ERRORS as err:
            raise BadSample("unreadable_image", f"{key}: transform failed: {type(err).__name__}: {err}") from None

    def _finish(self, items, kind: str, key: str) -> PlanSample:
        num_tokens = plan_num_tokens(items, self.geometry)
        if num_tokens > self.max_tokens_per_sample:
            limit = self.max_tokens_per_sample
            raise BadSample("too_long", f"{key}: {num_tokens} tokens > max_tokens_per_sample={limit}")
        return PlanSample(items=items, num_tokens=num_tokens, kind=kind, key=key)


# --------------------------------------------------------------------------------------------------
# FakeClue


class _FakeClueRecord(NamedTuple):
    image: str  # path relative to image_root
    label: int  # internal convention
    prefix: str
    question: str
    answer: str


class _Invalid(NamedTuple):
    """A record that failed validation; re-raised as a fresh BadSample each time it is loaded."""

    reason: str
    detail: str


def read_json_list(path: Path) -> list[Any]:
    """The top-level JSON list of ``path``; DataFormatError naming the path otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from err
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def parse_fakeclue_entry(entry: Any, convention: str, where: str) -> _FakeClueRecord:
    """Validate one FakeClue entry (no file access); BadSample describing the first problem found."""
    if not isinstance(entry, dict):
        raise BadSample("malformed_entry", f"{where}: entry is a {type(entry).__name__}, not an object")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise BadSample("malformed_entry", f"{where}: missing or non-string 'image'")
    if "label" not in entry:
        raise BadSample("malformed_entry", f"{where}: missing 'label'")
    label = parse_label(entry["label"], convention, where)
    prefix, question, answer = _conversation_texts(entry.get("conversations"), where)
    return _FakeClueRecord(image, label, prefix, question, answer)


def _conversation_texts(conversations: Any, where: str) -> tuple[str, str, str]:
    """(prefix, question, answer) from the first human turn and the first gpt turn after it.

    The human turn is split at ``<image>``: the text before it is the prefix, the text after it the
    question, kept verbatim (its leading newline too, as the reference does). FakeClue has exactly one
    human and one gpt turn; later turns are ignored.
    """
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("empty_conversation", f"{where}: 'conversations' is missing or empty")
    turns = [t for t in conversations if isinstance(t, dict) and isinstance(t.get("value"), str)]
    if len(turns) != len(conversations):
        raise BadSample("malformed_entry", f"{where}: every turn needs 'from' and a string 'value'")
    human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
    if human is None:
        raise BadSample("empty_conversation", f"{where}: no human turn")
    gpt = next((t for t in turns[human + 1 :] if t.get("from") == "gpt"), None)
    if gpt is None or not gpt["value"].strip():
        raise BadSample("empty_conversation", f"{where}: no non-empty gpt turn after the human turn")
    parts = turns[human]["value"].split(IMAGE_TAG)
    if len(parts) != 2:
        raise BadSample("no_image_tag", f"{where}: the human turn must contain exactly one {IMAGE_TAG}")
    return parts[0], parts[1], gpt["value"]


def balanced_subset(labels: Sequence[int | None], seed: int) -> list[int]:
    """Positions keeping ``min(#real, #fake)`` records of each class, chosen by a seeded permutation.

    The majority class's surplus is dropped, as in the reference (which keeps the first min-count records
    of each label after a seeded shuffle). Records without a valid label are kept so that they surface as
    counted bad samples instead of vanishing. The result is sorted (the stream shuffles anyway).
    """
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    per_class = min(sum(1 for lab in labels if lab == LABEL_REAL), sum(1 for lab in labels if lab == LABEL_FAKE))
    taken = {LABEL_REAL: 0, LABEL_FAKE: 0}
    keep = []
    for i in order:
        lab = labels[i]
        if lab is None:
            keep.append(i)
        elif taken[lab] < per_class:
            taken[lab] += 1
            keep.append(i)
    return sorted(keep)


class FakeClueSource:
    """FakeClue-style detection data: a JSON list of ``{image, label, conversations}`` entries.

    The JSON is read once, at construction (in the main process; DataLoader workers receive the parsed
    records). Invalid entries do not abort construction: they are kept and raise BadSample when loaded.
    Record keys are the entries' ``image`` paths, so a held-out split follows the image, not the list order.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        encoder: SampleEncoder,
        label_convention: str = "fakeclue",
        balance_classes: bool = False,
        seed: int = 42,
        split: Split = "all",
        heldout_fraction: float = 0.0,
        heldout_salt: str = DEFAULT_HELDOUT_SALT,
        name: str | None = None,
    ):
        check_convention(label_convention)
        check_split(split, heldout_fraction)
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image root is not a directory: {self.image_root}")
        self.encoder = encoder
        self.label_convention = label_convention
        self.name = name or f"fakeclue:{self.json_path.name}"

        entries = read_json_list(self.json_path)
        records = [self._validate(entry, i) for i, entry in enumerate(entries)]
        # Invalid entries get a positional key; they are never loaded successfully anyway.
        keys = [
            r.image if isinstance(r, _FakeClueRecord) else f"{self.json_path.name}#{i}" for i, r in enumerate(records)
        ]
        chosen = split_indices(keys, split, heldout_fraction, heldout_salt)
        if balance_classes:
            labels = [records[i].label if isinstance(records[i], _FakeClueRecord) else None for i in chosen]
            chosen = [chosen[j] for j in balanced_subset(labels, seed)]
        self._records = [records[i] for i in chosen]
        self._keys = [keys[i] for i in chosen]
        if not self._records:
            raise DataFormatError(f"{self.json_path}: no entries left for split={split!r} (of {len(entries)})")
        self._log_summary(len(entries))

    def _validate(self, entry: Any, i: int) -> _FakeClueRecord | _Invalid:
        try:
            return parse_fakeclue_entry(entry, self.label_convention, f"{self.json_path}[{i}]")
        except BadSample as bad:
            return _Invalid(bad.reason, bad.detail)

    def _log_summary(self, total: int) -> None:
        invalid = Counter(r.reason for r in self._records if isinstance(r, _Invalid))
        counts = self.label_counts()
        logger.info(
            "%s: %d of %d entries (real %d, fake %d, invalid %s)",
            self.name, len(self), total, counts[LABEL_REAL], counts[LABEL_FAKE], dict(invalid) or 0,
        )

    def __len__(self) -> int:
        return len(self._records)

    def key_of(self, index: int) -> str:
        return self._keys[index]

    def label_of(self, index: int) -> int | None:
        """Internal label of record ``index`` without touching the image; None for an invalid entry."""
        record = self._records[index]
        return record.label if isinstance(record, _FakeClueRecord) else None

    def label_counts(self) -> dict[int | None, int]:
        counts = Counter(self.label_of(i) for i in range(len(self)))
        return {LABEL_REAL: counts[LABEL_REAL], LABEL_FAKE: counts[LABEL_FAKE], None: counts[None]}

    def load(self, index: int) -> PlanSample:
        record = self._records[index]
        if isinstance(record, _Invalid):
            raise BadSample(record.reason, record.detail)
        image = load_image_file(self.image_root / record.image)
        return self.encoder.detection(
            image, record.question, record.answer, record.label, prefix=record.prefix, key=self._keys[index]
        )


# --------------------------------------------------------------------------------------------------
# Text-to-image tables (LAION parquet shards, JSON metadata, `datasets` directories)

_FORMAT_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_GLOB_CHARS = set("*?[")


@dataclass
class _Part:
    """One loaded file (or ``save_to_disk`` directory)."""

    dataset: datasets.Dataset
    path: Path
    name: str  # basename, used in default record keys
    base_dir: Path  # relative image paths resolve against this unless image_root is given


def expand_data_files(data_files: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files and directories named by ``data_files`` (globs expanded, sorted); FileNotFoundError naming any
    entry that matches nothing."""
    entries = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    if not entries:
        raise ValueError("data_files is empty")
    paths: list[Path] = []
    for entry in entries:
        text = str(entry)
        # An existing path is taken literally even if its name contains glob characters ("[1]").
        if Path(text).exists():
            paths.append(Path(text))
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {text}")
            paths += [Path(m) for m in matches]
        else:
            raise FileNotFoundError(f"data file not found: {text}")
    return paths


def _import_datasets():
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("TextToImageSource needs the `datasets` package (pip install unigendet[train])") from err
    return datasets


def _load_part(path: Path, data_format: str | None, cache_dir: str | None, hf_split: str) -> _Part:
    ds_lib = _import_datasets()
    if path.is_dir():
        try:
            loaded = ds_lib.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DataFormatError(f"{path}: not a `datasets.save_to_disk` directory ({err})") from err
        if isinstance(loaded, ds_lib.DatasetDict):
            if hf_split not in loaded:
                raise DataFormatError(f"{path}: no split {hf_split!r}; available: {sorted(loaded)}")
            loaded = loaded[hf_split]
        return _Part(loaded, path, path.name, path)
    fmt = data_format or _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DataFormatError(f"{path}: cannot infer the format from the suffix; pass data_format")
    try:
        # A packaged builder on local files: no network; the Arrow cache lands in cache_dir.
        loaded = ds_lib.load_dataset(fmt, data_files=[str(path)], split="train", cache_dir=cache_dir)
    except Exception as err:  # datasets wraps reader errors in many types; re-raise naming the file
        raise DataFormatError(f"could not read {path} as {fmt}: {type(err).__name__}: {err}") from err
    return _Part(loaded, path, path.name, path.parent)


def _prepare_columns(part: _Part, columns: list[str], image_column: str) -> None:
    """Keep only the needed columns and stop `datasets` from decoding images (decoding is ours, so a
    corrupt image becomes a BadSample of one row instead of an exception inside `datasets`)."""
    ds_lib = _import_datasets()
    available = part.dataset.column_names
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataFormatError(f"{part.path}: missing column(s) {missing}; available columns: {available}")
    dataset = part.dataset.select_columns(columns)
    feature = dataset.features[image_column]
    if isinstance(feature, ds_lib.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, ds_lib.Image(decode=False))
    part.dataset = dataset


class TextToImageSource:
    """Image-caption tables readable by `datasets`, with O(log #files) random access to any row.

    ``data_files`` is a path, a glob or a list of them; each file (parquet, arrow, json/jsonl, csv, or a
    ``save_to_disk`` directory) is loaded separately so every row keeps its file name for its default key
    ``f"{file basename}:{row}"``; pass ``key_column`` for keys that survive re-sharding. Loading copies each
    file into `datasets`' Arrow cache (``cache_dir``, default the `datasets` cache).

    The image column may hold encoded bytes, a ``{bytes, path}`` struct (also `datasets`' Image feature,
    read undecoded) or a path string (LAION ``final_metadata.json``: ``image_path``), resolved against
    ``image_root`` or else the data file's directory.
    """

    def __init__(
        self,
        data_files: str | Path | Sequence[str | Path],
        encoder: SampleEncoder,
        image_column: str = "image",
        caption_column: str = "caption",
        key_column: str | None = None,
        data_format: str | None = None,
        image_root: str | Path | None = None,
        cache_dir: str | Path | None = None,
        hf_split: str = "train",
        split: Split = "all",
        heldout_fraction: float = 0.0,
        heldout_salt: str = DEFAULT_HELDOUT_SALT,
        name: str = "t2i",
    ):
        check_split(split, heldout_fraction)
        self.encoder = encoder
        self.name = name
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.image_root = Path(image_root) if image_root is not None else None
        columns = list(dict.fromkeys(c for c in (image_column, caption_column, key_column) if c is not None))
        cache = str(cache_dir) if cache_dir is not None else None

        self._parts = [_load_part(p, data_format, cache, hf_split) for p in expand_data_files(data_files)]
        for part in self._parts:
            _prepare_columns(part, columns, image_column)
        if key_column is None:
            self._check_unique_names()
        lengths = [len(p.dataset) for p in self._parts]
        self._starts = np.cumsum([0, *lengths[:-1]]).tolist()
        total = sum(lengths)
        self._rows = self._select_rows(total, split, heldout_fraction, heldout_salt)
        if len(self._rows) == 0:
            raise DataFormatError(f"{name}: no rows left for split={split!r} (of {total})")
        logger.info(
            "%s: %d of %d rows from %d file(s), split=%s", name, len(self._rows), total, len(self._parts), split
        )

    def _check_unique_names(self) -> None:
        names = Counter(p.name for p in self._parts)
        clashes = sorted(n for n, c in names.items() if c > 1)
        if clashes:
            raise ValueError(
                f"{self.name}: several data files share the basename(s) {clashes}, so the default keys "
                f"'<file>:<row>' would collide; pass key_column"
            )

    def _all_keys(self) -> list[str]:
        if self.key_column is None:
            return [f"{p.name}:{r}" for p in self._parts for r in range(len(p.dataset))]
        return [str(v) for p in self._parts for v in p.dataset[self.key_column]]

    def _select_rows(self, total: int, split: Split, fraction: float, salt: str) -> np.ndarray:
        if split == "all":
            return np.arange(total, dtype=np.int64)
        return np.asarray(split_indices(self._all_keys(), split, fraction, salt), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def _locate(self, index: int) -> tuple[_Part, int]:
        if not 0 <= index < len(self._rows):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self._rows)})")
        global_row = int(self._rows[index])
        part_idx = bisect.bisect_right(self._starts, global_row) - 1
        return self._parts[part_idx], global_row - self._starts[part_idx]

    def _row(self, part: _Part, row: int) -> dict[str, Any]:
        import pyarrow as pa

        try:
            return part.dataset[row]
        except (OSError, ValueError, pa.ArrowException) as err:
            raise BadSample("unreadable_row", f"{part.name}:{row}: {type(err).__name__}: {err}") from None

    def key_of(self, index: int) -> str:
        part, row = self._locate(index)
        if self.key_column is None:
            return f"{part.name}:{row}"
        return str(self._row(part, row)[self.key_column])

    def raw_record(self, index: int) -> tuple[str, Any, Any]:
        """(key, caption cell, image cell) of row ``index``, undecoded (evaluation jobs read prompts and
        reference-image paths without decoding every image)."""
        part, row = self._locate(index)
        record = self._row(part, row)
        key = str(record[self.key_column]) if self.key_column is not None else f"{part.name}:{row}"
        return key, record[self.caption_column], record[self.image_column]

    def load(self, index: int) -> PlanSample:
        part, row = self._locate(index)
        record = self._row(part, row)
        key = str(record[self.key_column]) if self.key_column is not None else f"{part.name}:{row}"
        caption = record[self.caption_column]
        if caption is not None and not isinstance(caption, str):
            raise BadSample("malformed_entry", f"{key}: caption is a {type(caption).__name__}, not a string")
        if caption is None or not caption.strip():
            raise BadSample("empty_caption", f"{key}: empty caption")
        image = self._image(record[self.image_column], part, key)
        return self.encoder.text_to_image(image, caption, key=key)

    def _image(self, value: Any, part: _Part, key: str) -> Image.Image:
        """Decode an image cell: bytes, a {bytes, path} struct, or a path string."""
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise BadSample("missing_image", f"{key}: image struct has neither bytes nor path")
        if value is None:
            raise BadSample("missing_image", f"{key}: no image")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image_bytes(bytes(value), key)
        if isinstance(value, str):
            return load_image_file((self.image_root or part.base_dir) / value)
        raise BadSample("malformed_entry", f"{key}: image cell of type {type(value).__name__}")


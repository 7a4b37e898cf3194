"""Evaluation prompts chosen from a text-to-image table, as the training loader reads it.

Prompts are read *through* :class:`~unigendet.data.t2i.TextToImageSource` (LAION ``final_metadata.json`` with
``image_path`` + ``prompt``, parquet shards, ...), so every row has the training loader's record key
(``f"{file basename}:{row}"``, or the ``key_column`` value). Two rules:

* ``heldout`` (default): the rows that :func:`~unigendet.data.splits.heldout` puts on the held-out side for the
  given fraction and salt — exactly the rows a training run with ``split: train`` and the same
  ``heldout_fraction`` / ``heldout_salt`` never sees (salted SHA-1 of the key; independent of row order, machine
  and Python version). Use the *same data files and key column* as the training recipe, or the keys differ;
* ``official_slice``: positional rows ``[10000:15000]`` of the table, the official script's choice. Its list order
  comes from ``os.listdir`` on the machine that built the file, so it is neither reproducible nor provably disjoint
  from training; reports label it as such.

The first ``limit`` chosen rows in table order are used (paper: 5,000); rows with a blank caption are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from unigendet.data.splits import DEFAULT_HELDOUT_SALT
from unigendet.data.t2i import TextToImageSource

logger = logging.getLogger(__name__)

OFFICIAL_SLICE = (10000, 15000)
SelectionRule = Literal["heldout", "official_slice"]
SELECTION_RULES = ("heldout", "official_slice")


@dataclass
class PromptTable:
    """A text-to-image table as the training loader reads it (same arguments as ``TextToImageSource``)."""

    data_files: list[str] = field(default_factory=list)
    image_column: str = "image_path"
    caption_column: str = "prompt"
    key_column: str | None = None
    data_format: str | None = None
    image_root: str | None = None
    cache_dir: str | None = None
    # BAGEL's T2I parquet: "json_dict" captions, one per row chosen by caption_seed (the training data seed
    # gives the captions the run trained on); streaming reads parquet files in place (no Arrow cache copy).
    caption_format: Literal["text", "json_dict"] = "text"
    caption_seed: int = 0
    streaming: bool = False

    def __post_init__(self) -> None:
        # Absolute paths: the scoring job re-opens the table from selection.json, possibly from another directory.
        files = [self.data_files] if isinstance(self.data_files, (str, Path)) else self.data_files
        self.data_files = [str(Path(f).absolute()) for f in files]
        self.image_root = None if self.image_root is None else str(Path(self.image_root).absolute())
        self.cache_dir = None if self.cache_dir is None else str(Path(self.cache_dir).absolute())


@dataclass
class PromptSelection:
    """Which rows of ``table`` are the evaluation prompts (see the module docstring for the two rules)."""

    table: PromptTable = field(default_factory=PromptTable)
    rule: SelectionRule = "heldout"
    heldout_fraction: float = 0.06
    heldout_salt: str = DEFAULT_HELDOUT_SALT
    slice_start: int = OFFICIAL_SLICE[0]
    slice_stop: int = OFFICIAL_SLICE[1]
    limit: int | None = 5000

    def __post_init__(self) -> None:
        if isinstance(self.table, dict):
            self.table = PromptTable(**self.table)
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")

    def describe(self) -> str:
        if self.rule == "heldout":
            return (f"held-out split of the training loader (salted SHA-1 of the record key < "
                    f"{self.heldout_fraction}, salt {self.heldout_salt!r}): disjoint from a training run with the "
                    f"same data files, key column, fraction and salt")
        return (f"official positional slice [{self.slice_start}:{self.slice_stop}] of the table: NOT a verified "
                f"held-out split (list order depends on the machine that built it)")


@dataclass
class EvalPrompt:
    index: int  # position in the selection: folder index and seed offset
    key: str  # the training loader's record key
    prompt: str
    image_path: str | None  # the table's image cell when it is a path (LAION final_metadata.json)
    source_index: int  # row index inside the opened source


class _ImageOnlyEncoder:
    """Stands in for the training ``SampleEncoder``: ``TextToImageSource.load`` then returns the decoded RGB image
    (missing or broken files raise ``BadSample`` exactly as in training)."""

    def text_to_image(self, image: Image.Image, caption: str, key: str = "") -> Image.Image:
        return image


def open_source(selection: PromptSelection) -> TextToImageSource:
    """The training loader's view of the table: held-out rows only for the ``heldout`` rule, all rows otherwise."""
    t = selection.table
    if not t.data_files:
        raise ValueError("choosing prompts needs the table's data_files (e.g. LAION final_metadata.json)")
    split = "heldout" if selection.rule == "heldout" else "all"
    fraction = selection.heldout_fraction if selection.rule == "heldout" else 0.0
    return TextToImageSource(
        t.data_files, encoder=_ImageOnlyEncoder(), image_column=t.image_column, caption_column=t.caption_column,
        key_column=t.key_column, data_format=t.data_format, image_root=t.image_root, cache_dir=t.cache_dir,
        split=split, heldout_fraction=fraction, heldout_salt=selection.heldout_salt, name="eval-prompts",
        caption_format=t.caption_format, caption_seed=t.caption_seed, streaming=t.streaming,
    )


def _candidate_indices(source: TextToImageSource, selection: PromptSelection) -> range:
    if selection.rule == "heldout":
        return range(len(source))
    if selection.slice_start < 0 or selection.slice_stop <= selection.slice_start:
        raise ValueError(f"bad slice [{selection.slice_start}:{selection.slice_stop}]")
    if selection.slice_start >= len(source):
        raise ValueError(f"slice start {selection.slice_start} is past the table's {len(source)} rows")
    return range(selection.slice_start, min(selection.slice_stop, len(source)))


def select_prompts(selection: PromptSelection, source: TextToImageSource | None = None) -> list[EvalPrompt]:
    """The evaluation prompts of ``selection`` in table order, at most ``limit``."""
    source = source or open_source(selection)
    prompts: list[EvalPrompt] = []
    blank = 0
    for i in _candidate_indices(source, selection):
        if selection.limit is not None and len(prompts) >= selection.limit:
            break
        key, caption, cell = source.raw_record(i)
        if not isinstance(caption, str) or not caption.strip():
            blank += 1
            continue
        image_path = cell if isinstance(cell, str) else None
        prompts.append(EvalPrompt(len(prompts), key, caption, image_path, i))
    if blank:
        logger.warning("skipped %d selected rows with a blank caption", blank)
    if not prompts:
        raise ValueError("the prompt selection is empty")
    if selection.limit is not None and len(prompts) < selection.limit:
        logger.warning("only %d prompts selected (limit %d)", len(prompts), selection.limit)
    logger.info("%d prompts: %s", len(prompts), selection.describe())
    return prompts

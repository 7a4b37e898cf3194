"""Text-to-image tables (LAION parquet shards, JSON metadata, `datasets` directories) as a random-access source."""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from unigendet.data.bagel_formats import CAPTION_FORMATS, caption_candidates, choose_caption
from unigendet.data.encoding import SampleEncoder
from unigendet.data.images import DecodeLimits, decode_image_bytes, load_image_file
from unigendet.data.packing import PlanSample
from unigendet.data.paths import expand_data_files, resolve_image_path
from unigendet.data.quality import BadSample, DataFormatError
from unigendet.data.splits import DEFAULT_HELDOUT_SALT, Split, check_split, split_indices
from unigendet.data.tokenizer import check_text

if TYPE_CHECKING:  # datasets is an optional (training) dependency and slow to import
    import datasets

logger = logging.getLogger(__name__)

_FORMAT_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class ParquetRows:
    """Rows of one parquet file read straight from the file, without `datasets`' Arrow cache copy.

    Row ``i`` is read by decoding its row group (only the selected columns); the last ``cached_row_groups``
    decoded row groups are kept, so reading rows in file order decodes each row group once. Random order
    decodes a row group per row in the worst case: files written with small row groups (a few hundred rows)
    keep that cheap. Offers the part of the `datasets.Dataset` interface the source uses."""

    def __init__(self, path: Path, cached_row_groups: int = 2, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        self.path = path
        self.cached_row_groups = max(1, cached_row_groups)
        self._file = pq.ParquetFile(path)
        self.column_names = list(self._file.schema_arrow.names)
        self.columns = columns
        counts = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.cumsum([0, *counts]).tolist()
        self._cache: dict[int, list[dict[str, Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the file instead of inheriting a reader and decoded rows.
        return {"path": self.path, "cached_row_groups": self.cached_row_groups, "columns": self.columns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["cached_row_groups"], state["columns"])

    def select_columns(self, columns: list[str]) -> ParquetRows:
        return ParquetRows(self.path, self.cached_row_groups, list(columns))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _row_group(self, group: int) -> list[dict[str, Any]]:
        rows = self._cache.pop(group, None)
        if rows is None:
            rows = self._file.read_row_group(group, columns=self.columns).to_pylist()
        self._cache[group] = rows  # most recently used last
        while len(self._cache) > self.cached_row_groups:
            self._cache.pop(next(iter(self._cache)))
        return rows

    def __getitem__(self, item: int | str) -> Any:
        if isinstance(item, str):  # a whole column (the keys, for held-out splits)
            return self._file.read(columns=[item]).column(0).to_pylist()
        if not 0 <= item < len(self):
            raise IndexError(f"{self.path}: row {item} out of range [0, {len(self)})")
        group = bisect.bisect_right(self._starts, item) - 1
        return self._row_group(group)[item - self._starts[group]]


@dataclass
class _Part:
    """One loaded file (or ``save_to_disk`` directory)."""

    dataset: datasets.Dataset | ParquetRows
    path: Path
    name: str  # basename, used in default record keys
    # Relative image paths resolve against this: the file's directory, replaced by the source's image_root
    # if it has one, then resolved (Path.resolve) so that containment is checked against the real directory.
    image_root: Path


def caption_texts(data_files: str | Path | Sequence[str | Path], caption_column: str,
                  caption_format: str = "text") -> list[str]:
    """The captions of parquet tables as strings (a corpus for the tiny tokenizer, read without `datasets`);
    with ``caption_format="json_dict"`` every caption of every JSON caption dict.

    FileNotFoundError naming an entry that matches nothing; DataFormatError naming a file that is not a
    readable parquet table with ``caption_column``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[str] = []
    for path in expand_data_files(data_files):
        if path.suffix != ".parquet":
            raise DataFormatError(f"{path}: captions can only be read from parquet files")
        try:
            column = pq.read_table(path, columns=[caption_column]).column(0)
        except (OSError, KeyError, pa.ArrowException) as err:
            raise DataFormatError(f"could not read column {caption_column!r} of {path}: {err}") from err
        cells = column.to_pylist()
        if caption_format == "json_dict":
            texts += [text for row, cell in enumerate(cells) for text in _all_captions(cell, f"{path.name}:{row}")]
        else:
            texts += [str(t) for t in cells]
    return texts


def _all_captions(cell: Any, key: str) -> list[str]:
    try:
        return caption_candidates(cell, key)
    except BadSample:  # training counts and skips that row; the tokenizer corpus simply lacks it
        return []


def _import_datasets():
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("TextToImageSource needs the `datasets` package (pip install unigendet[train])") from err
    return datasets


def _load_part(path: Path, data_format: str | None, cache_dir: str | None, hf_split: str,
               streaming: bool = False, cached_row_groups: int = 2) -> _Part:
    fmt = None if path.is_dir() else data_format or _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if streaming and fmt == "parquet":
        import pyarrow as pa

        try:
            return _Part(ParquetRows(path, cached_row_groups), path, path.name, path.parent)
        except (OSError, pa.ArrowException) as err:
            raise DataFormatError(f"could not read {path} as parquet: {type(err).__name__}: {err}") from err
    if streaming:
        logger.info("%s: streaming reads parquet files only; this one goes through the datasets cache", path)
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
    available = part.dataset.column_names
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataFormatError(f"{part.path}: missing column(s) {missing}; available columns: {available}")
    dataset = part.dataset.select_columns(columns)
    if isinstance(dataset, ParquetRows):  # plain pyarrow values: image structs and bytes are never decoded
        part.dataset = dataset
        return
    ds_lib = _import_datasets()
    feature = dataset.features[image_column]
    if isinstance(feature, ds_lib.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, ds_lib.Image(decode=False))
    part.dataset = dataset


class TextToImageSource:
    """Image-caption tables readable by `datasets`, with O(log #files) random access to any row.

    ``data_files`` is a path, a glob or a list of them; each file (parquet, arrow, json/jsonl, csv, or a
    ``save_to_disk`` directory) is loaded separately so every row keeps its file name for its default key
    ``f"{file basename}:{row}"``; pass ``key_column`` for keys that survive re-sharding. Loading copies each
    file into `datasets`' Arrow cache (``cache_dir``, default the `datasets` cache), except parquet files with
    ``streaming=True``, which are read in place (:class:`ParquetRows`).

    ``caption_format="json_dict"`` reads BAGEL's T2I parquet ``captions`` cells (a JSON object of named
    captions) and uses one caption per row chosen by ``caption_seed`` and the row key
    (:func:`unigendet.data.bagel_formats.choose_caption`); ``"text"`` takes the cell as the caption.

    The image column may hold encoded bytes, a ``{bytes, path}`` struct (also `datasets`' Image feature,
    read undecoded) or a path string (LAION ``final_metadata.json``: ``image_path``), resolved against
    ``image_root`` or else the data file's directory, and which must stay inside that root (symlinks included;
    absolute paths only with ``allow_absolute_paths``). Images above ``decode_limits`` are bad samples
    ``too_large``.
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
        allow_absolute_paths: bool = False,
        decode_limits: DecodeLimits = DecodeLimits(),
        caption_format: str = "text",
        caption_seed: int = 0,
        streaming: bool = False,
        cached_row_groups: int = 2,
    ):
        check_split(split, heldout_fraction)
        if caption_format not in CAPTION_FORMATS:
            raise ValueError(f"caption_format must be one of {CAPTION_FORMATS}, got {caption_format!r}")
        self.caption_format, self.caption_seed = caption_format, caption_seed
        self.encoder = encoder
        self.name = name
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.image_root = Path(image_root) if image_root is not None else None
        self.allow_absolute_paths = allow_absolute_paths
        self.decode_limits = decode_limits
        columns = list(dict.fromkeys(c for c in (image_column, caption_column, key_column) if c is not None))
        cache = str(cache_dir) if cache_dir is not None else None

        self._parts = [_load_part(p, data_format, cache, hf_split, streaming, cached_row_groups)
                       for p in expand_data_files(data_files)]
        for part in self._parts:
            _prepare_columns(part, columns, image_column)
            part.image_root = (self.image_root or part.image_root).resolve()
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
        return key, self._caption(record[self.caption_column], key), record[self.image_column]

    def _caption(self, cell: Any, key: str) -> Any:
        """The caption of a row: the cell itself, or one caption of a JSON caption dict."""
        if self.caption_format == "json_dict":
            return choose_caption(cell, key, self.caption_seed)
        return cell

    def load(self, index: int) -> PlanSample:
        part, row = self._locate(index)
        record = self._row(part, row)
        key = str(record[self.key_column]) if self.key_column is not None else f"{part.name}:{row}"
        caption = self._caption(record[self.caption_column], key)
        if caption is not None and not isinstance(caption, str):
            raise BadSample("malformed_entry", f"{key}: caption is a {type(caption).__name__}, not a string")
        if caption is None or not caption.strip():
            raise BadSample("empty_caption", f"{key}: empty caption")
        check_text(caption, f"{key}: caption")
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
            return decode_image_bytes(bytes(value), key, self.decode_limits)
        if isinstance(value, str):
            path = resolve_image_path(part.image_root, value, key, self.allow_absolute_paths)
            return load_image_file(path, self.decode_limits)
        raise BadSample("malformed_entry", f"{key}: image cell of type {type(value).__name__}")

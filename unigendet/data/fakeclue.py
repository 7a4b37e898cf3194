"""FakeClue-style detection data: a JSON list of ``{image, label, conversations}`` entries.

Each entry's label is read in the source's label convention (:data:`unigendet.labels.LABEL_CONVENTIONS`)
and stored in the internal one (0 = real, 1 = fake); the human turn is split at ``<image>`` into a prefix
and the question, and the first gpt turn after it is the answer. Image paths are relative to the image root
and must stay inside it (:mod:`unigendet.data.paths`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from unigendet.data.encoding import IMAGE_TAG, SampleEncoder
from unigendet.data.images import DecodeLimits, load_image_file
from unigendet.data.packing import PlanSample
from unigendet.data.paths import check_image_name, resolve_image_path
from unigendet.data.quality import BadSample, DataFormatError
from unigendet.data.splits import DEFAULT_HELDOUT_SALT, Split, balanced_subset, check_split, split_indices
from unigendet.data.tokenizer import check_text
from unigendet.labels import LABEL_FAKE, LABEL_REAL, UnknownLabelError, check_convention, parse_label

logger = logging.getLogger(__name__)


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
    """The entries of ``path``: a top-level JSON list, or JSON Lines (one JSON value per non-blank line; the
    format of ``.jsonl`` files and of BAGEL's VLM annotations, recognised by content as well as by suffix).
    DataFormatError naming the path (and, for JSONL, the line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from err
    if path.suffix.lower() == ".jsonl":
        return _json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # Several JSON objects one after another: JSON Lines under another suffix.
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(path, text)
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of entries (or JSON Lines), got {type(data).__name__}")
    return data


def _json_lines(path: Path, text: str) -> list[Any]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{number}: not a JSON value ({err})") from err
    return entries


def parse_fakeclue_entry(
    entry: Any, convention: str, where: str, allow_absolute_paths: bool = False
) -> _FakeClueRecord:
    """Validate one FakeClue entry (no file access); BadSample describing the first problem found.

    The image path gets the checks that need no file access (:func:`~unigendet.data.paths.check_image_name`:
    absolute, climbing out with ``..``); the texts must be valid Unicode (``bad_text``).
    """
    if not isinstance(entry, dict):
        raise BadSample("malformed_entry", f"{where}: entry is a {type(entry).__name__}, not an object")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise BadSample("malformed_entry", f"{where}: missing or non-string 'image'")
    check_image_name(image, where, allow_absolute_paths)
    if "label" not in entry:
        raise BadSample("malformed_entry", f"{where}: missing 'label'")
    try:
        label = parse_label(entry["label"], convention, where)
    except UnknownLabelError as err:
        raise BadSample("unknown_label", str(err)) from None
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
    check_text(turns[human]["value"], f"{where}: human turn")
    check_text(gpt["value"], f"{where}: gpt turn")
    return parts[0], parts[1], gpt["value"]


def conversation_texts(json_path: str | Path) -> list[str]:
    """Every string turn of every entry of a FakeClue JSON, ``<image>`` removed, texts that are not valid
    Unicode skipped (a corpus for the tiny tokenizer). FileNotFoundError or DataFormatError naming the file."""
    texts = []
    for entry in read_json_list(Path(json_path)):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        for turn in turns if isinstance(turns, list) else []:
            value = turn.get("value") if isinstance(turn, dict) else None
            if isinstance(value, str):
                try:
                    check_text(value, str(json_path))
                except BadSample:
                    continue
                texts.append(value.replace(IMAGE_TAG, ""))
    return texts


class FakeClueSource:
    """FakeClue-style detection data: a JSON list of ``{image, label, conversations}`` entries.

    The JSON is read once, at construction (in the main process; DataLoader workers receive the parsed
    records). Invalid entries do not abort construction: they are kept and raise BadSample when loaded.
    Record keys are the entries' ``image`` paths, so a held-out split follows the image, not the list order.
    Image paths resolve inside ``image_root`` (symlinks included); absolute ones only with
    ``allow_absolute_paths``. Images above ``decode_limits`` are bad samples ``too_large``.
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
        allow_absolute_paths: bool = False,
        decode_limits: DecodeLimits = DecodeLimits(),
    ):
        check_convention(label_convention)
        check_split(split, heldout_fraction)
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image root is not a directory: {self.image_root}")
        self._resolved_root = self.image_root.resolve()
        self.encoder = encoder
        self.label_convention = label_convention
        self.allow_absolute_paths = allow_absolute_paths
        self.decode_limits = decode_limits
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
            where = f"{self.json_path}[{i}]"
            return parse_fakeclue_entry(entry, self.label_convention, where, self.allow_absolute_paths)
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
        path = resolve_image_path(self._resolved_root, record.image, self.name, self.allow_absolute_paths)
        image = load_image_file(path, self.decode_limits)
        return self.encoder.detection(
            image, record.question, record.answer, record.label, prefix=record.prefix, key=self._keys[index]
        )

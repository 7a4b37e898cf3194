"""Bad input: per-record failures (:class:`BadSample`), unusable files, and the bad-record budget.

A *source* is a random-access collection of records (``len(source)``, ``source.load(i)``). Problems come in
two kinds:

* Problems with the whole dataset (file missing, JSON unparsable, a column absent, a bad option) raise at
  construction (:class:`DataFormatError` or ``ValueError``) with a message naming the path, so a broken
  recipe fails before training starts.
* Problems with one record raise :class:`BadSample` from ``load``; the stream
  (:mod:`unigendet.data.sharding`) skips and counts them in a :class:`BadSampleCounter` and stops with
  :class:`DataQualityError` only when too large a fraction of records is bad.

``BadSample.reason`` is one of:

==================  ============================================================================
reason              meaning
==================  ============================================================================
missing_file        the image file does not exist
unreadable_image    the file or bytes are not a decodable image (truncated, corrupt, not an image, not a
                    regular file, a symlink loop)
too_large           the image exceeds the decode limits (bytes, or pixels read from its header)
absolute_path       a dataset file gives an absolute image path and the source does not allow them
path_outside_root   a relative image path leaves its root (``..`` or a symlink pointing outside)
bad_text            a text is not valid Unicode (a lone surrogate such as ``"\\ud800"``)
missing_image       a table row has no image value
malformed_entry     a record lacks a field or has a field of the wrong type, or an image path holds a NUL
                    byte or a lone surrogate
unknown_label       the label is neither a known integer of the convention nor "real"/"fake"
empty_conversation  a FakeClue entry has no usable human/gpt turns
no_image_tag        the human turn has no ``<image>`` placeholder (or several)
empty_caption       a text-to-image caption is missing or blank
unreadable_row      the table row itself could not be read
too_long            the laid-out sample exceeds ``max_tokens_per_sample``
==================  ============================================================================
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from unigendet.config.loader import ConfigError
from unigendet.utils.errors import RunError


class BadSample(Exception):
    """One record cannot become a training sample; the stream skips it and counts ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # The default exception pickling replays ``args`` (one message), which this __init__ cannot take.
        return type(self), (self.reason, self.detail)


class DataFormatError(ConfigError):
    """A whole dataset file is unusable (unparsable, wrong structure, missing columns); the command line
    reports it as a configuration error (exit 2), since the file is named by the config."""


class DataQualityError(RunError):
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

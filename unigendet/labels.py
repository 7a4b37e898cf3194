"""Real/fake labels: the internal convention, the datasets' conventions, and the text verdict rule.

Internally a label is an integer, ``LABEL_REAL = 0`` and ``LABEL_FAKE = 1``, everywhere: in packed
samples, losses, metrics and results. Datasets disagree on what 0 and 1 mean (FakeClue: 1 = real,
0 = fake; ARForensics/DMimage: 0 = real, 1 = fake), so every dataset names its convention
(:data:`LABEL_CONVENTIONS`) and is converted with :func:`parse_label` when it is read.

A generated answer is turned into a label by :func:`parse_verdict`, the FakeClue evaluation's substring
rule. This module depends on the standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

LABEL_REAL = 0
LABEL_FAKE = 1
CLASS_NAMES = ("real", "fake")  # index = internal label

# FakeClue / FakeVLM annotation convention: real = 1, fake = 0 (their eval script counts label == 1 as "real").
FAKECLUE_REAL = 1
FAKECLUE_FAKE = 0

LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    "fakeclue": {FAKECLUE_REAL: LABEL_REAL, FAKECLUE_FAKE: LABEL_FAKE},
    # ARForensics, DMimage (0_real / 1_fake folders) and this project's internal convention.
    "real0_fake1": {0: LABEL_REAL, 1: LABEL_FAKE},
}
_LABEL_WORDS = {"real": LABEL_REAL, "fake": LABEL_FAKE}

REAL_PHRASE = "this is a real image"
FAKE_PHRASE = "this is a fake image"


class UnknownLabelError(ValueError):
    """A raw dataset label that is neither an integer of its convention nor "real"/"fake"."""


def label_name(label: int) -> str:
    """``"real"`` or ``"fake"`` for an internal label; ValueError for anything else."""
    if label not in (LABEL_REAL, LABEL_FAKE) or isinstance(label, bool):
        raise ValueError(f"internal label must be {LABEL_REAL} (real) or {LABEL_FAKE} (fake), got {label!r}")
    return CLASS_NAMES[label]


def check_convention(convention: str) -> None:
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; known: {sorted(LABEL_CONVENTIONS)}")


def parse_label(value: Any, convention: str, where: str) -> int:
    """Internal label (LABEL_REAL / LABEL_FAKE) of a raw dataset label; UnknownLabelError if none.

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
    raise UnknownLabelError(
        f"{where}: label {value!r} is not one of {sorted(mapping)} ({convention}) or 'real'/'fake'"
    )


def fakeclue_to_internal(label: int) -> int:
    """FakeClue label (real = 1, fake = 0) -> internal label (real = 0, fake = 1)."""
    if label == FAKECLUE_REAL:
        return LABEL_REAL
    if label == FAKECLUE_FAKE:
        return LABEL_FAKE
    raise ValueError(f"FakeClue label must be {FAKECLUE_REAL} (real) or {FAKECLUE_FAKE} (fake), got {label!r}")


def internal_to_fakeclue(label: int) -> int:
    """Internal label (real = 0, fake = 1) -> FakeClue label (real = 1, fake = 0)."""
    if label == LABEL_REAL:
        return FAKECLUE_REAL
    if label == LABEL_FAKE:
        return FAKECLUE_FAKE
    raise ValueError(f"internal label must be {LABEL_REAL} (real) or {LABEL_FAKE} (fake), got {label!r}")


def parse_verdict(text: str) -> int | None:
    """Internal label from an answer, by the official substring rule, or None when unparsable.

    Lowercases ``text`` (``str.lower``), then: ``"this is a real image"`` anywhere -> 0 (real), checked first, so
    an answer with both phrases is real; else ``"this is a fake image"`` anywhere -> 1 (fake); else None.
    A plain substring test: "This is a real imagery" counts as real; "this is a  real image" (two spaces) does not.
    """
    response = text.lower()
    if REAL_PHRASE in response:
        return LABEL_REAL
    if FAKE_PHRASE in response:
        return LABEL_FAKE
    return None


@dataclass(frozen=True)
class DetectionResult:
    """What a detector says about one image; every detector (our model, a baseline classifier) returns it.

    ``p_fake`` is the detection head's probability of "fake" (NaN when the detector has no score);
    ``text`` the generated explanation (None when the detector does not explain) and ``text_label`` the
    verdict :func:`parse_verdict` reads from it (None when unparsable or without text). ``token_ids`` and
    ``stopped`` (``<|im_end|>`` generated before the token limit) describe the decoding, when there is one.
    """

    p_fake: float = math.nan
    text: str | None = None
    text_label: int | None = None
    token_ids: list[int] = field(default_factory=list)
    stopped: bool = False
    threshold: float = 0.5  # the head says "fake" when p_fake >= threshold (ties go to fake, as the head's argmax)

    @property
    def label(self) -> int | None:
        """The verdict as an internal label: the head's when there is a score, else the text's (None if neither)."""
        if math.isnan(self.p_fake):
            return self.text_label
        return LABEL_FAKE if self.p_fake >= self.threshold else LABEL_REAL

    @property
    def label_name(self) -> str:
        """``"real"``, ``"fake"`` or ``"unknown"`` (no score and no parsable text)."""
        return "unknown" if self.label is None else label_name(self.label)

    @property
    def text_label_name(self) -> str | None:
        return None if self.text_label is None else label_name(self.text_label)

    def details(self) -> dict[str, Any] | None:
        """Extra per-image fields a detector wants stored with its scores (JSON-safe), or None (the default).

        The evaluation harness writes them into each output line under ``"details"``, so metrics that need
        more than p(fake) and the text (a cascade's decision, exit stage, per-stage latency) can be computed
        from the stored outputs of a finished or resumed job."""
        return None

    def record(self) -> dict[str, Any]:
        """The JSON view of the command line: names for labels, None for a missing score."""
        return {"label": self.label_name, "p_fake": None if math.isnan(self.p_fake) else self.p_fake,
                "text_label": self.text_label_name, "explanation": self.text, "stopped": self.stopped}

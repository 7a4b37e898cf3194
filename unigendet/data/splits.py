"""Held-out splits by hashing record keys, and class balancing.

:func:`heldout` assigns each record key to the held-out side by a salted SHA-1 of the key, independent of
dataset order, machine and Python version, so a training run (``split="train"``) and the FID evaluation
(``split="heldout"``) given the same fraction and salt provably never share a record.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Literal

from unigendet.labels import LABEL_FAKE, LABEL_REAL

Split = Literal["train", "heldout", "all"]
SPLITS = ("train", "heldout", "all")
DEFAULT_HELDOUT_SALT = "unigendet"


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

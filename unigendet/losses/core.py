"""Loss terms of GDUF and DIGA as tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unigendet.labels import LABEL_FAKE

# The official 2-class head orders its logits (fake, real): FakeClue's label 1 = real is class 1.
HEAD_CLASS_FAKE = 0
HEAD_CLASS_REAL = 1


def _check_denominator(denominator: float, what: str) -> None:
    if not denominator > 0:
        raise ValueError(f"{what} loss denominator must be positive, got {denominator}")


def token_ce_loss(logits: torch.Tensor, labels: torch.Tensor, denominator: float) -> torch.Tensor:
    """Explanation loss: summed next-token cross-entropy (in fp32) divided by ``denominator``."""
    _check_denominator(denominator, "CE")
    return F.cross_entropy(logits.float(), labels, reduction="sum") / denominator


def flow_matching_loss(velocity: torch.Tensor, target: torch.Tensor, denominator: float) -> torch.Tensor:
    """Per-token mean over latent channels of ``(v - (eps - x0))**2``, summed, divided by ``denominator``."""
    _check_denominator(denominator, "MSE")
    per_token = (velocity.float() - target.float()).pow(2).mean(dim=-1)
    return per_token.sum() / denominator


def detection_loss(logits: torch.Tensor, is_fake: torch.Tensor, kind: str, denominator: float) -> torch.Tensor:
    """Real/fake loss on the head's logits; ``is_fake`` uses the internal convention (1 = fake).

    ``kind="ce"``: 2-class softmax CE over (fake, real) logits, the official code's loss.
    ``kind="bce"``: binary CE on a single "fake" logit, the paper's loss.
    """
    _check_denominator(denominator, "detection")
    if kind == "ce":
        target = torch.where(is_fake == LABEL_FAKE, HEAD_CLASS_FAKE, HEAD_CLASS_REAL)
        return F.cross_entropy(logits.float(), target, reduction="sum") / denominator
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), is_fake.float(), reduction="sum") / denominator
    raise ValueError(f"unknown detection loss {kind!r}; expected 'ce' or 'bce'")


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, denominator: float) -> torch.Tensor:
    """DIGA: summed ``1 - cos(student_k, teacher_k)`` over tokens, divided by ``denominator``."""
    _check_denominator(denominator, "alignment")
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return (1.0 - cos).sum() / denominator

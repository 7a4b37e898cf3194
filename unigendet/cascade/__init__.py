"""The tiered moderation cascade: a cheap binary detector, then a spectral (2-D FFT) detector, then a verifier
(UniGenDet's head and explanation), each stage deciding only the images the earlier ones passed on.

``result`` holds :class:`~unigendet.cascade.result.Decision` and :class:`~unigendet.cascade.result.CascadeResult`;
``config`` the thresholds, mappings and stage references; ``routing`` the rules; ``verifiers`` stage 3;
``pipeline`` the :class:`~unigendet.cascade.pipeline.Cascade` detector; ``calibration`` threshold choice on a
validation split; ``storage`` the on-disk format (``save_cascade`` / ``load_cascade``); ``metrics`` the cascade's
evaluation metrics from stored outputs.
"""

from unigendet.cascade.config import CascadeConfig, Thresholds, VerifierConfig
from unigendet.cascade.pipeline import CASCADE, Cascade
from unigendet.cascade.result import CascadeResult, Decision
from unigendet.cascade.storage import CASCADE_FILE, load_cascade, save_cascade

__all__ = ["CASCADE", "CASCADE_FILE", "Cascade", "CascadeConfig", "CascadeResult", "Decision", "Thresholds",
           "VerifierConfig", "load_cascade", "save_cascade"]

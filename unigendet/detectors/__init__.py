"""Baseline AI-image detectors (LTD, CoRIT, spectral) behind one contract, a name registry and one file format.

``unigendet.detectors.base`` holds the contract (:class:`~unigendet.detectors.base.Detector`), the registry
(``register_detector``, ``build_detector``, ``load_detector``) and the save/load format; each detector lives
in its own module and is imported on first use by name. ``adapter.DetectorAdapter`` plugs any of them into
the evaluation suite; ``feature_cache`` keeps frozen-backbone features on disk between epochs.
"""

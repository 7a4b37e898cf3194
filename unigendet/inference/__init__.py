"""Inference: cached forward (``cached_forward``, ``cache``), detection with explanation (``detect``),
text-to-image sampling (``generate``), detection-head scoring of packed samples (``scoring``) and
loading trained models for all of them (``loading``)."""

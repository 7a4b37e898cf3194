"""``unigendet serve``: an HTTP detection service over any image detector, with dynamic batching, input limits,
Prometheus metrics and a web page (see :mod:`unigendet.serving.app`)."""

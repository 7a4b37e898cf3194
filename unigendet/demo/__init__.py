"""The embedded demo: the whole GDUF -> DIGA -> generate -> score loop on CPU, on data it makes itself
(``data``: the demo dataset; ``run``: the chain and its report)."""

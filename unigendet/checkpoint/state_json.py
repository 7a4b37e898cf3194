"""Lossless JSON for training state (data position, RNG streams): no pickle in the files we write.

JSON has no tuples, bytes, tensors or non-string keys, and the states need all four (``random.getstate()``
is a tuple, torch RNG states are uint8 tensors, numpy's is an array, the data loader keys roles by int).
Those values are written as one-key objects tagged ``__tuple__``, ``__bytes__``, ``__tensor__``,
``__ndarray__`` or ``__dict__`` and rebuilt on reading; everything else is plain JSON.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TAGS = ("__tuple__", "__bytes__", "__tensor__", "__ndarray__", "__dict__")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(obj: Any) -> Any:
    """A JSON-serialisable view of ``obj`` that ``decode`` turns back into an equal object."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, bytes):
        return {"__bytes__": _b64(obj)}
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous().numpy()
        return {"__tensor__": {"dtype": array.dtype.str, "shape": list(array.shape), "data": _b64(array.tobytes())}}
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        return {"__ndarray__": {"dtype": array.dtype.str, "shape": list(array.shape), "data": _b64(array.tobytes())}}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in training state JSON")


def _array(spec: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()


def decode(data: Any) -> Any:
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        (tag, value), = data.items()
        if tag == "__tuple__":
            return tuple(decode(v) for v in value)
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__tensor__":
            return torch.from_numpy(_array(value))
        if tag == "__ndarray__":
            return _array(value)
        if tag == "__dict__":
            return {decode(k): decode(v) for k, v in value}
    return {k: decode(v) for k, v in data.items()}


def write_state(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(encode(obj)))


def read_state(path: Path) -> Any:
    return decode(json.loads(path.read_text()))

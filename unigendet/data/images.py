"""Image decoding for the data sources: files and encoded bytes to 8-bit RGB, broken or hostile input to
``BadSample``.

Decoding is bounded (:class:`DecodeLimits`): the file size is checked before the file is opened and the pixel
count, read from the header, before the pixels are decoded, so a decompression bomb costs a header read.

:func:`to_rgb` converts every PIL mode by its value range, never by saturating:

* ``RGB``: unchanged (copied).
* ``L``, ``1``: the grey value in all three channels.
* ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit PNG / TIFF) and ``I`` (32-bit integers, taken to hold 16-bit
  data, as PIL gives for some 16-bit files): clipped to [0, 65535], then ``v8 = floor(v * 255 / 65535 + 1/2)``,
  so 65535 -> 255, 32768 -> 128, 257 -> 1. (PIL itself reads 16-bit RGB and RGBA PNGs as 8-bit, keeping the
  high byte.)
* ``F`` (float TIFF): taken as intensities in [0, 1]; NaN -> 0, values clipped to [0, 1], then
  ``v8 = floor(v * 255 + 1/2)``.
* ``CMYK``: PIL's conversion, ``R = round((255 - C) * (255 - K) / 255)``, likewise G with M and B with Y.
* Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P`` or ``L``/``RGB`` with a
  ``transparency`` key): composited over **white**, ``out = round(c * a / 255 + 255 * (1 - a / 255))``, as the
  reference does; a fully transparent pixel becomes white whatever colour it stores. For a 16-bit grey image
  with a transparency key, pixels equal to the key become white.
* Any other mode (``P`` without transparency, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``): PIL's ``convert("RGB")``.

EXIF orientation is not applied: pixels are used in stored order, as the reference's loader does, so the
image sizes (hence the token layouts) match it.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unigendet.data.quality import BadSample

# What PIL raises on broken files: OSError (incl. UnidentifiedImageError, "image file is truncated"),
# SyntaxError / struct.error / EOFError / IndexError from some format plugins on damaged headers,
# ValueError on impossible sizes, DecompressionBombError on absurd dimensions.
PIL_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)

# 256 MiB: far above any photo or generated image in the datasets; a bigger file is not an image we want.
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
# PIL's own warning threshold (Image.MAX_IMAGE_PIXELS), about 0.25 GiB as 8-bit RGB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_U16_MAX = 65535


@dataclass(frozen=True)
class DecodeLimits:
    """Largest encoded size and pixel count (width x height) an image may have; larger is ``too_large``.

    PIL refuses images above twice ``Image.MAX_IMAGE_PIXELS`` (about 179 million pixels) on its own, so a
    larger ``max_pixels`` has no effect beyond that.
    """

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"decode limits must be positive, got {self}")

    def check_bytes(self, size: int, where: str) -> None:
        if size > self.max_bytes:
            raise BadSample("too_large", f"{where}: {size} bytes > max_image_bytes={self.max_bytes}")

    def check_pixels(self, width: int, height: int, where: str) -> None:
        if width * height > self.max_pixels:
            raise BadSample(
                "too_large", f"{where}: {width}x{height} = {width * height} pixels > max_image_pixels={self.max_pixels}"
            )


def _sixteen_bit_to_grey(img: Image.Image) -> Image.Image:
    """8-bit ``L`` image of a 16-bit (or ``I``) grey image, scaled by the 16-bit range; a transparency key
    turns the matching pixels white."""
    values = np.clip(np.asarray(img).astype(np.int32), 0, _U16_MAX)  # v * 255 stays below 2**31
    grey = ((values * 255 + _U16_MAX // 2) // _U16_MAX).astype(np.uint8)
    key = img.info.get("transparency")
    if isinstance(key, int):
        grey[values == key] = 255
    return Image.fromarray(grey, "L")


def _float_to_grey(img: Image.Image) -> Image.Image:
    """8-bit ``L`` image of a float image holding intensities in [0, 1] (NaN -> 0, others clipped)."""
    values = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return Image.fromarray(np.floor(values * 255 + 0.5).astype(np.uint8), "L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB copy of ``img`` by the rules in this module's docstring."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_grey(img).convert("RGB")
    if img.mode == "F":
        return _float_to_grey(img).convert("RGB")
    if img.mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        return _composite_on_white(img)
    if img.mode == "RGB":
        return img.copy()
    return img.convert("RGB")


SOURCE_FORMAT = "source_format"


def _decoded_rgb(open_image, where: str, limits: DecodeLimits) -> Image.Image:
    """Open, check the pixel count, fully decode (so truncation shows now, not inside a transform) and
    convert to RGB. The file's format (``JPEG``, ``PNG``, ...) is kept in ``info[SOURCE_FORMAT]``: conversions
    drop ``Image.format``, and a lossy source matters to detectors that read compression artefacts."""
    try:
        # PIL warns about large images at open; the pixel check below replaces that warning with a
        # counted bad sample, so the warning would only flood the logs of every worker.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image() as img:
                limits.check_pixels(img.width, img.height, where)
                img.load()
                rgb = to_rgb(img)
                rgb.info[SOURCE_FORMAT] = img.format
                return rgb
    except Image.DecompressionBombError as err:
        raise BadSample("too_large", f"{where}: {err}") from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadSample("missing_file", f"{where}: no such image file") from None
    except PIL_DECODE_ERRORS as err:
        raise BadSample("unreadable_image", f"{where}: {type(err).__name__}: {err}") from None


def _check_file(path: str | Path, limits: DecodeLimits) -> None:
    """Reject before opening: a missing path, something that is not a regular file (a FIFO or device would
    block or never end), or a file above the size limit."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise BadSample("missing_file", f"{path}: no such image file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise BadSample("unreadable_image", f"{path}: {type(err).__name__}: {err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadSample("missing_file", f"{path}: no such image file (a directory)")
    if not stat.S_ISREG(st.st_mode):
        raise BadSample("unreadable_image", f"{path}: not a regular file")
    limits.check_bytes(st.st_size, str(path))


def load_image_file(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """RGB image from a file (see :func:`to_rgb`); BadSample on a missing, undecodable or too large file."""
    _check_file(path, limits)
    return _decoded_rgb(lambda: Image.open(path), str(path), limits)


def decode_image_bytes(data: bytes, where: str, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """RGB image from encoded bytes (PNG, JPEG, ...); BadSample ``unreadable_image`` if undecodable,
    ``too_large`` above the limits."""
    limits.check_bytes(len(data), where)
    return _decoded_rgb(lambda: Image.open(io.BytesIO(data)), where, limits)

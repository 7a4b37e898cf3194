"""Small image utilities shared by the demo and the evaluation jobs."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def image_grid(images: Sequence[Image.Image], columns: int, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile ``images`` row-major into one RGB image with ``columns`` per row; cells take the largest
    image size, smaller images are centred in their cell."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x = pad + c * (cell_w + pad) + (cell_w - im.width) // 2
        y = pad + r * (cell_h + pad) + (cell_h - im.height) // 2
        grid.paste(im.convert("RGB"), (x, y))
    return grid

"""Small image utilities shared by the demo and the evaluation jobs."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


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


_ELLIPSIS = "..."


def _fit_line(text: str, font, width: int) -> str:
    """``text``, or its longest prefix followed by "..." that is at most ``width`` pixels wide in ``font``."""
    if font.getlength(text) <= width:
        return text
    for end in range(len(text) - 1, -1, -1):
        candidate = text[:end].rstrip() + _ELLIPSIS
        if font.getlength(candidate) <= width:
            return candidate
    return ""


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int, pad: int = 2,
                  min_cell_width: int = 0, background=(255, 255, 255), text_color=(0, 0, 0)) -> Image.Image:
    """Tile ``images`` row-major (``columns`` per row) with the text ``labels[i]`` under image ``i``.

    A label's lines are separated by "\\n" (e.g. caption, generator name, ``p(fake)=0.123``); each line is drawn
    centred in PIL's default font and, when wider than the cell, cut to its longest prefix ending in "...".
    Cells are as wide as the widest image or ``min_cell_width`` and as tall as the tallest image plus a text
    strip holding the most lines any label has; images are centred in their cell's image area. The result
    depends only on the inputs (and the installed Pillow's default font).
    """
    if not images:
        raise ValueError("labelled_grid needs at least one image")
    if len(labels) != len(images):
        raise ValueError(f"labelled_grid got {len(images)} images but {len(labels)} labels")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    font = ImageFont.load_default()
    line_height = font.getbbox("Agy|")[3] + 2
    lines = [label.split("\n") if label else [] for label in labels]
    strip_h = max(len(label_lines) for label_lines in lines) * line_height
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    cell_w = max(max(im.width for im in images), min_cell_width)
    image_h = max(im.height for im in images)
    cell_h = image_h + strip_h
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        left, top = pad + c * (cell_w + pad), pad + r * (cell_h + pad)
        grid.paste(im.convert("RGB"), (left + (cell_w - im.width) // 2, top + (image_h - im.height) // 2))
        for k, line in enumerate(lines[i]):
            text = _fit_line(line, font, cell_w)
            x = left + (cell_w - int(font.getlength(text))) // 2
            draw.text((x, top + image_h + k * line_height), text, fill=text_color, font=font)
    return grid

"""Contact sheets a person can open: a row per sample, a strip of its frames beside its text (prompt,
caption), written as a self-contained HTML page (each strip an inline base64 PNG) and as one PNG.
Both are written to a temporary name and renamed."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.manifest import atomic_write, write_text

STRIP_FRAMES = 8  # frames per strip, spread evenly over the clip
STRIP_HEIGHT = 96  # pixels; small canvases are enlarged (nearest neighbour, so pixels stay sharp)
GAP = 2
TEXT_WIDTH = 520  # pixels of text beside each strip in the PNG
FONT_SIZE = 14


@dataclass
class SheetRow:
    label: str  # what the row shows, e.g. "caption", "generate", "joint"
    frames: np.ndarray  # uint8 [F, H, W, 3]
    lines: list[str]  # e.g. "prompt: ...", "caption: ..."


def frame_strip(frames: np.ndarray, count: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> np.ndarray:
    """`count` frames side by side (uint8 [h, w, 3]), each scaled to `height` by an integer factor."""
    picked = frames[np.rint(np.linspace(0, len(frames) - 1, min(count, len(frames)))).astype(int)]
    scale = max(1, height // frames.shape[1])
    picked = picked.repeat(scale, axis=1).repeat(scale, axis=2)
    gap = np.full((picked.shape[1], GAP, 3), 255, np.uint8)
    return np.concatenate([part for frame in picked for part in (frame, gap)][:-1], axis=1)


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def sheet_html(rows: list[SheetRow], title: str) -> str:
    cells = "\n".join(
        f'<tr><td class="label">{html.escape(row.label)}</td>'
        f'<td><img src="data:image/png;base64,{base64.b64encode(png_bytes(frame_strip(row.frames))).decode()}"></td>'
        f'<td>{"<br>".join(html.escape(line) for line in row.lines)}</td></tr>'
        for row in rows
    )
    return (
        f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif;margin:16px}td{padding:4px 8px;vertical-align:middle}"
        "img{image-rendering:pixelated}.label{font-weight:bold}tr:nth-child(even){background:#f3f3f3}</style>\n"
        f"</head><body><h2>{html.escape(title)}</h2>\n<table>\n{cells}\n</table></body></html>\n"
    )


def sheet_png(rows: list[SheetRow], title: str) -> Image.Image:
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 4
    strips = [frame_strip(row.frames) for row in rows]
    texts = [[f"[{row.label}]"] + [part for line in row.lines for part in textwrap.wrap(line, 72) or [""]] for row in rows]
    heights = [max(strip.shape[0], len(text) * line_height) + 2 * GAP * 4 for strip, text in zip(strips, texts)]
    width = max(strip.shape[1] for strip in strips) + TEXT_WIDTH + 3 * GAP * 4
    image = Image.new("RGB", (width, sum(heights) + 2 * line_height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((GAP * 4, GAP * 2), title, fill="black", font=font)
    top = 2 * line_height
    for strip, text, height in zip(strips, texts, heights):
        image.paste(Image.fromarray(strip), (GAP * 4, top + GAP * 4))
        for k, line in enumerate(text):
            draw.text((strip.shape[1] + GAP * 8, top + GAP * 4 + k * line_height), line, fill="black", font=font)
        top += height
    return image


def sheet_paths(path: str | Path) -> list[Path]:
    """The files of the contact sheet at `path`: its .html and .png (whatever suffix `path` has)."""
    return [Path(path).with_suffix(".html"), Path(path).with_suffix(".png")]


def write_contact_sheet(path: str | Path, rows: list[SheetRow], title: str) -> list[Path]:
    """The contact sheet's `sheet_paths`, written; returns them."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    page, image = sheet_paths(path)
    write_text(page, sheet_html(rows, title))
    atomic_write(image, lambda temporary: temporary.write_bytes(png_bytes(sheet_png(rows, title))))
    return [page, image]

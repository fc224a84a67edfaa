"""The embedded procedural video world (WORLD.md): sampling, rendering, text, parsing and measuring.

One coloured shape on a plain background, every attribute known. The rules are fixed by WORLD.md and
scale with the canvas. Coordinates are (row, col) in pixels with pixel (i, j) centred at (i, j), so
the canvas spans [-0.5, H - 0.5] x [-0.5, W - 0.5]. Start positions c_0 are pixel centres: a centre
row belongs to the top quadrant when it is above the middle, (H - 1) / 2, and to the bottom when it
is below it (on an odd canvas the middle row belongs to neither and is never drawn), so the start
quadrant of every sampled clip is at least half a pixel away from being ambiguous.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "background": ("black", "white", "gray"),
    "size": ("small", "large"),
    "motion": ("left", "right", "up", "down", "still"),
    "speed": ("slow", "fast"),
    "start": ("top left", "top right", "bottom left", "bottom right"),
}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SIZES = {"small": 0.20, "large": 0.34}  # shape side s as a fraction of min(H, W)
SPEEDS = {"slow": 0.012, "fast": 0.028}  # displacement per frame as a fraction of W (horizontal) or H (vertical)
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}
ADVERBS = {"slow": "slowly", "fast": "quickly"}
SUPERSAMPLE = 4  # anti-aliasing: each pixel's coverage is measured on a 4 x 4 grid of sub-pixel points

# Caption phrasings. Every one contains WORLD.md's fragments: {object} = "<size> <color> <shape>",
# {background} = "<background> background", {motion} = "moves <motion> slowly|quickly" or "stays still",
# {start} = "from the <start>" (moving) or "in the <start>" (still).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {object} {motion} {start} of a {background}.",
    "on a {background}, a {object} {motion} {start}.",
    "a {background} with a {object}. the shape {motion} {start}.",
    "the video shows a {object} on a {background}. it {motion} {start} of the frame.",
    "{start}, a {object} {motion} on a {background}.",
    "there is a {object} on a {background}, and it {motion} {start}.",
    "against a {background}, a {object} {motion} {start} of the frame.",
)


@dataclass(frozen=True)
class ClipSpec:
    """One clip's ground truth: the seven attributes, the start centre c_0 and the canvas."""

    shape: str
    color: str
    background: str
    size: str
    motion: str
    speed: str | None  # None when motion == "still"
    start: str  # "top left" | "top right" | "bottom left" | "bottom right"
    center: tuple[float, float]  # c_0 as (row, col) in pixels of this canvas
    height: int = 64
    width: int = 64
    num_frames: int = 17
    fps: int = 8

    def attributes(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def side(self) -> float:
        return SIZES[self.size] * min(self.height, self.width)

    def centers(self) -> np.ndarray:
        """The centre path c_k = c_0 + k * v, float [F, 2] as (row, col)."""
        velocity = _velocity(self.motion, self.speed, self.height, self.width)
        return np.asarray(self.center) + np.arange(self.num_frames)[:, None] * velocity


def _velocity(motion: str, speed: str | None, height: int, width: int) -> np.ndarray:
    step = SPEEDS[speed] if speed else 0.0
    drow, dcol = DIRECTIONS[motion]
    return np.array([drow * step * height, dcol * step * width])


def _start_range(extent: int, half: float, travel: float, high: bool) -> range:
    """Pixel-centre positions along one axis whose whole path stays on the canvas, in one half."""
    middle = (extent - 1) / 2
    low = max(math.ceil(half - 0.5 - min(0.0, travel) - 1e-9), math.floor(middle) + 1 if high else 0)
    high_end = min(math.floor(extent - 0.5 - half - max(0.0, travel) + 1e-9), extent - 1 if high else math.ceil(middle) - 1)
    return range(low, high_end + 1)


def sample_clip(rng: np.random.Generator, height: int = 64, width: int = 64, num_frames: int = 17, fps: int = 8) -> ClipSpec:
    """Draw every attribute uniformly, then c_0 uniformly among the start quadrant's positions that keep
    the whole path on the canvas; attributes whose quadrant has no such position are redrawn."""
    if min(height, width) < 8 or num_frames < 2:  # from 8 pixels up every still clip fits: the loop ends
        raise ValueError(f"the world needs a canvas of at least 8 x 8 and 2 frames, got {height} x {width} x {num_frames}")
    while True:
        attrs = {name: str(rng.choice(values)) for name, values in ATTRIBUTES.items()}
        if attrs["motion"] == "still":
            attrs["speed"] = None
        half = SIZES[attrs["size"]] * min(height, width) / 2
        travel = (num_frames - 1) * _velocity(attrs["motion"], attrs["speed"], height, width)
        vertical, horizontal = attrs["start"].split()
        rows = _start_range(height, half, travel[0], vertical == "bottom")
        cols = _start_range(width, half, travel[1], horizontal == "right")
        if rows and cols:
            center = (float(rng.choice(rows)), float(rng.choice(cols)))
            return ClipSpec(**attrs, center=center, height=height, width=width, num_frames=num_frames, fps=fps)


def _coverage(shape: str, side: float, center: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered by the shape, from the sub-pixel grid `rows` x `cols`."""
    dy, dx = rows[:, None] - center[0], cols[None, :] - center[1]
    half = side / 2
    if shape == "circle":
        inside = dy**2 + dx**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    else:  # isosceles triangle pointing up, base s and height s, centred on its bounding box
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    n = SUPERSAMPLE
    return inside.reshape(len(rows) // n, n, len(cols) // n, n).mean(axis=(1, 3))


def render(spec: ClipSpec) -> np.ndarray:
    """The clip as uint8 [F, H, W, 3], edges anti-aliased by pixel coverage."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    rows = (np.arange(spec.height)[:, None] + offsets).ravel()
    cols = (np.arange(spec.width)[:, None] + offsets).ravel()
    background = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    color = np.asarray(PALETTE[spec.color], dtype=np.float64)
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), dtype=np.uint8)
    for k, center in enumerate(spec.centers()):
        alpha = _coverage(spec.shape, spec.side, center, rows, cols)[..., None]
        frames[k] = np.rint(background + alpha * (color - background))
    return frames


def prompt_text(spec: ClipSpec) -> str:
    """The brief prompt: `a <color> <shape> (moving <motion> | staying still)`."""
    action = "staying still" if spec.motion == "still" else f"moving {spec.motion}"
    return f"a {spec.color} {spec.shape} {action}"


def caption_text(spec: ClipSpec, rng: np.random.Generator, template: int | None = None) -> str:
    """The detailed caption in a phrasing drawn from CAPTION_TEMPLATES (or the one at index `template`)."""
    still = spec.motion == "still"
    text = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES))) if template is None else template].format(
        object=f"{spec.size} {spec.color} {spec.shape}",
        background=f"{spec.background} background",
        motion="stays still" if still else f"moves {spec.motion} {ADVERBS[spec.speed]}",
        start=f"{'in' if still else 'from'} the {spec.start}",
    )
    return capitalize_sentences(text)


def capitalize_sentences(text: str) -> str:
    return re.sub(r"(^|\.\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def every_spec() -> list[ClipSpec]:
    """One spec per combination of attribute values (speed only for moving clips), at c_0 = (0, 0)."""
    names = [name for name in ATTRIBUTES if name != "speed"]
    specs = []
    for values in itertools.product(*(ATTRIBUTES[name] for name in names)):
        attrs = dict(zip(names, values))
        for speed in [None] if attrs["motion"] == "still" else ATTRIBUTES["speed"]:
            specs.append(ClipSpec(**attrs, speed=speed, center=(0.0, 0.0)))
    return specs


def vocabulary() -> list[str]:
    """Every word (and the punctuation `.` `,`) that any prompt or caption phrasing can use, sorted."""
    rng = np.random.default_rng(0)
    texts = (
        text
        for spec in every_spec()
        for text in [prompt_text(spec)] + [caption_text(spec, rng, i) for i in range(len(CAPTION_TEMPLATES))]
    )
    return sorted({word for text in texts for word in re.findall(r"[a-z]+|[.,]", text.lower())})


_WORDS = {name: "|".join(values) for name, values in ATTRIBUTES.items()}


def _agree(values: list[str]) -> str | None:
    """The value when the text gives exactly one; None when it gives none or contradicts itself."""
    return values[0] if len(set(values)) == 1 else None


def parse_prompt(text: str) -> dict[str, str | None]:
    """shape, color and motion of a brief prompt, by its fragments `<color> <shape>` and
    `moving <motion>` / `staying still`; None where missing or contradictory."""
    text = text.lower()
    objects = re.findall(rf"\b({_WORDS['color']}) ({_WORDS['shape']})\b", text)
    motions = re.findall(r"\bmoving (left|right|up|down)\b", text) + ["still"] * len(re.findall(r"\bstaying still\b", text))
    return {
        "shape": _agree([shape for _, shape in objects]),
        "color": _agree([color for color, _ in objects]),
        "motion": _agree(motions),
    }


def parse_caption(text: str) -> dict[str, str | None]:
    """All seven attributes of a detailed caption, by WORLD.md's fragments alone; an attribute whose
    fragment is missing or contradictory is None (speed is also None for a still clip)."""
    text = text.lower()
    objects = re.findall(rf"\b({_WORDS['size']}) ({_WORDS['color']}) ({_WORDS['shape']})\b", text)
    moves = re.findall(r"\bmoves (left|right|up|down)\b(?: (slowly|quickly)\b)?", text)
    stills = re.findall(r"\bstays still\b", text)
    speeds = {adverb: speed for speed, adverb in ADVERBS.items()}
    return {
        "shape": _agree([shape for _, _, shape in objects]),
        "color": _agree([color for _, color, _ in objects]),
        "background": _agree(re.findall(rf"\b({_WORDS['background']}) background\b", text)),
        "size": _agree([size for size, _, _ in objects]),
        "motion": _agree([motion for motion, _ in moves] + ["still"] * len(stills)),
        "speed": None if stills else _agree([speeds.get(adverb) for _, adverb in moves]),
        "start": _agree(re.findall(rf"\b(?:from|in) the ({_WORDS['start']})\b", text)),
    }


def _nearest(table: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(table)
    return names[int(np.argmin(np.linalg.norm(np.asarray([table[n] for n in names]) - rgb, axis=1)))]


def _majority(values: list[str]) -> str:
    names, counts = np.unique(values, return_counts=True)
    return str(names[np.argmax(counts)])


def _measure_frame(frame: np.ndarray) -> dict:
    """One frame's background, color, size, shape and shape centre (row, col); no shape: only background."""
    height, width, _ = frame.shape
    border = np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]])
    colors, counts = np.unique(border, axis=0, return_counts=True)
    background = colors[np.argmax(counts)]
    found = {"background": _nearest(BACKGROUNDS, background)}
    distance = np.linalg.norm(frame - background, axis=-1)
    mask = distance > 60
    if not mask.any():
        return found
    rows, cols = np.nonzero(mask)
    # The median of the core shape pixels (within 80% of the farthest): a small shape's pixels are
    # mostly edge pixels, blended with the background by anti-aliasing and mp4 chroma blur.
    found["color"] = _nearest(PALETTE, np.median(frame[distance > max(60, 0.8 * distance.max())], axis=0))
    # Coverage of each pixel near the shape: its position from the background (0) to the shape's colour
    # (1). Its sum is the shape's area and its centroid the area's centroid, both exact under
    # anti-aliasing and nearly so after mp4 chroma blur; the box of the half-covered pixels does not
    # grow or shrink with the contrast as the > 60 mask's does.
    top, left = max(rows.min() - 2, 0), max(cols.min() - 2, 0)
    window = frame[top : rows.max() + 3, left : cols.max() + 3] - background
    contrast = np.asarray(PALETTE[found["color"]]) - background
    coverage = np.clip(window @ contrast / (contrast @ contrast), 0.0, 1.0)
    rows, cols = np.nonzero(coverage > 0.5)
    if len(rows) == 0:
        return found
    found["size"] = "large" if max(np.ptp(rows), np.ptp(cols)) + 1 > 0.27 * min(height, width) else "small"
    side = SIZES[found["size"]] * min(height, width)
    fill = coverage.sum() / side**2  # fill ratio of the measured size's s x s bounding box
    found["shape"] = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    grid = np.indices(coverage.shape)
    center = (grid * coverage).sum(axis=(1, 2)) / coverage.sum() + (top, left)
    if found["shape"] == "triangle":  # a triangle's centroid lies s/6 below the centre of its box
        center[0] -= side / 6
    found["center"] = center
    return found


def measure_video(frames: np.ndarray) -> dict[str, str | None]:
    """All seven attributes measured from uint8 [F, H, W, 3] frames (F >= 2) by WORLD.md's "Checking".

    Per frame: background = the most common border colour; shape pixels = farther than 60 from it;
    color = nearest palette colour to the median of the core ones; size = the side of the half-covered
    pixels' bounding box / min(H, W); shape = the coverage-weighted fill ratio of that size's s x s box
    (neither moves with anti-aliasing, contrast or compression). Frames with a shape vote on these.
    Motion and speed come from the shape centre's mean displacement per frame (still below 0.005 of the
    canvas), start from the quadrant of the first frame's centre; they need a shape in every frame.
    What cannot be measured is None.
    """
    if len(frames) < 2:
        raise ValueError(f"measuring needs at least 2 frames, got {len(frames)}")
    height, width = frames.shape[1:3]
    found = [_measure_frame(frame) for frame in frames.astype(np.float64)]
    shown = [frame for frame in found if "center" in frame]
    result = dict.fromkeys(ATTRIBUTES)
    result["background"] = _majority([frame["background"] for frame in found])
    if shown:
        result.update({name: _majority([frame[name] for frame in shown]) for name in ("color", "size", "shape")})
    if len(shown) < len(found):
        return result
    centers = np.array([frame["center"] for frame in found])
    step = np.diff(centers, axis=0).mean(axis=0) / (height, width)
    if np.hypot(*step) < 0.005:
        result["motion"], result["speed"] = "still", None
    else:
        axis = int(np.argmax(np.abs(step)))
        result["motion"] = (("up", "down"), ("left", "right"))[axis][int(step[axis] > 0)]
        result["speed"] = "fast" if abs(step[axis]) > (SPEEDS["slow"] + SPEEDS["fast"]) / 2 else "slow"
    row, col = centers[0]
    result["start"] = f"{'top' if row < (height - 1) / 2 else 'bottom'} {'left' if col < (width - 1) / 2 else 'right'}"
    return result

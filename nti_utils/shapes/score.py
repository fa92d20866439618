"""Read a shapes-world image back into words: background, and each object's color and shape.

The analysis works on pixels only (it never sees the :class:`~nti_utils.shapes.world.Scene`), so it
can score images the model sampled or edited: the background is the most common border color, the
foreground is what differs from it, objects are its connected components, an object's color is the
nearest named color of its pixels, and its shape follows from how much of its bounding box it fills
(square ~1, circle ~pi/4, upright triangle ~1/2). For images whose shapes may be turned (another
renderer's), ``rotation_invariant=True`` reads the shape from its area against the largest
squared distance of its pixels from their centroid instead, which no rotation changes (circle ~pi,
square ~2, this world's triangle ~1.1-1.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from nti_utils.shapes.world import BACKGROUNDS, OBJECT_COLORS, parse_caption

_MIN_AREA_FRACTION = 0.01  # components smaller than 1% of the image are noise


@dataclass(frozen=True)
class Detected:
    """An object found in an image.

    Attributes:
        color (`str`): nearest named object color of its pixels (majority vote).
        kind (`str`): ``circle``, ``square`` or ``triangle`` from its fill ratio.
        fill (`float`): area / bounding-box area.
        area (`int`): pixels.
        bbox (`tuple[int, int, int, int]`): (left, top, right, bottom), inclusive.
        mask (`np.ndarray`): bool (H, W), its pixels.
    """

    color: str
    kind: str
    fill: float
    area: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` read from an image: its background and objects, largest first."""

    background: str
    objects: tuple[Detected, ...]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    return arr.astype(np.float32)


def _nearest(
    pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]
) -> tuple[list, np.ndarray]:
    names = list(palette)
    ref = np.array([palette[n] for n in names], dtype=np.float32)
    dist = np.linalg.norm(pixels[..., None, :] - ref, axis=-1)
    return names, dist


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask (pure numpy flood fill; images are tiny)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    comps = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n = len(comps) + 1
        stack, pts = [(y0, x0)], []
        labels[y0, x0] = n
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        comps.append(np.array(pts))
    return comps


def classify_fill(fill: float) -> str:
    """Shape from the fraction of its bounding box an object fills."""
    if fill >= 0.89:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def classify_spread(area: float, max_sq_radius: float) -> str:
    """Shape from `area` / `max_sq_radius` (the largest squared pixel distance from the object's
    centroid): pi for a circle, 2 for a square, about 1.1-1.4 for this world's triangles, at any
    rotation."""
    ratio = area / max(max_sq_radius, 1e-9)
    if ratio >= 2.6:
        return "circle"
    if ratio >= 1.7:
        return "square"
    return "triangle"


def analyze(image: Image.Image | np.ndarray, rotation_invariant: bool = False) -> Analysis:
    """Find the background and the objects of a shapes-world image.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): RGB, uint8 or float in [0, 1], (H, W, 3).
        rotation_invariant (`bool`, defaults to `False`): read shapes with
            :func:`classify_spread` (any rotation) instead of :func:`classify_fill` (upright
            shapes, as this world's renderer draws them).

    Returns:
        :class:`Analysis` with objects sorted by area, largest first.
    """
    arr = _as_array(image)
    h, w, _ = arr.shape
    # 1. background: the named background nearest to the border pixels' median color
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_names, bg_dist = _nearest(np.median(border, axis=0), BACKGROUNDS)
    background = bg_names[int(np.argmin(bg_dist))]
    # 2. every pixel goes to its nearest named color, background and object colors together
    palette = {**{f"bg:{k}": v for k, v in BACKGROUNDS.items()}, **OBJECT_COLORS}
    names, dist = _nearest(arr, palette)
    label = np.argmin(dist, axis=-1)
    fg = np.array([not n.startswith("bg:") for n in names])[label]
    # 3. objects are connected foreground regions; color by majority vote of their pixels
    objects = []
    for pts in _components(fg):
        if len(pts) < _MIN_AREA_FRACTION * h * w:
            continue
        votes = np.bincount(label[pts[:, 0], pts[:, 1]], minlength=len(names))
        color = names[int(np.argmax(votes))]
        top, left = pts.min(axis=0)
        bottom, right = pts.max(axis=0)
        fill = len(pts) / float((bottom - top + 1) * (right - left + 1))
        mask = np.zeros((h, w), dtype=bool)
        mask[pts[:, 0], pts[:, 1]] = True
        bbox = (int(left), int(top), int(right), int(bottom))
        if rotation_invariant:
            spread = float(((pts - pts.mean(axis=0)) ** 2).sum(axis=1).max())
            kind = classify_spread(len(pts), spread)
        else:
            kind = classify_fill(fill)
        objects.append(Detected(color, kind, fill, len(pts), bbox, mask))
    objects.sort(key=lambda d: -d.area)
    return Analysis(background, tuple(objects))


@dataclass(frozen=True)
class Adherence:
    """How well an image matches a caption: one flag per attribute (object flags for the
    caption's objects, matched to detections by color first, then by size)."""

    background: bool
    colors: tuple[bool, ...]
    shapes: tuple[bool, ...]
    count: bool

    @property
    def all(self) -> bool:
        return self.background and all(self.colors) and all(self.shapes) and self.count


def score_caption(
    image: Image.Image | np.ndarray, caption: str, rotation_invariant: bool = False
) -> Adherence:
    """Check an image against a caption of the world's grammar.

    Objects are matched greedily: a caption object takes the largest remaining detection of its
    color and shape, else of its color, else the largest remaining one; its flags are then
    compared on that match. `rotation_invariant`: see :func:`analyze`.
    """
    wanted, background = parse_caption(caption)
    found = analyze(image, rotation_invariant)
    left = list(found.objects)
    colors, shapes = [], []
    for color, kind in wanted:
        match = next(
            (d for d in left if d.color == color and d.kind == kind),
            next((d for d in left if d.color == color), left[0] if left else None),
        )
        if match is None:
            colors.append(False)
            shapes.append(False)
            continue
        left.remove(match)
        colors.append(match.color == color)
        shapes.append(match.kind == kind)
    return Adherence(
        found.background == background,
        tuple(colors),
        tuple(shapes),
        len(found.objects) == len(wanted),
    )

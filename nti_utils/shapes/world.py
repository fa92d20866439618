"""The colored-shapes world: scenes as data, a deterministic renderer, captions and their parser.

Every image of the embedded model's world comes from a :class:`Scene`, so every Prompt-to-Prompt edit
has a ground truth: edit the scene (swap a shape, a color, the background, add or remove an object),
render it again, and you get the target image and the region that was meant to change.

Example:
    >>> scene = Scene((Shape("circle", "red", 32, 30, 12),), "white")
    >>> scene.caption()
    'a red circle on a white background'
    >>> parse_caption(scene.caption()) == scene.describe()
    True
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
"""Side of a rendered image in pixels (the embedded model's resolution)."""

OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
}
"""Named object colors (sRGB). Disjoint from the backgrounds so a scorer can tell them apart."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
"""Named plain backgrounds (sRGB)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names. Squares are axis-aligned, triangles isosceles and pointing up."""

_SUPERSAMPLE = 4  # render at 4x and downsample: anti-aliased edges, deterministic


@dataclass(frozen=True)
class Shape:
    """One object of a scene.

    Args:
        kind (`str`): one of :data:`SHAPES`.
        color (`str`): one of :data:`OBJECT_COLORS`.
        cx, cy (`float`): center in pixels of a `resolution`-sized image.
        size (`float`): half-extent in pixels (radius of a circle, half-side of a square,
            half-width and half-height of a triangle's bounding box).
    """

    kind: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"unknown shape {self.kind!r}; choose one of {SHAPES}")
        if self.color not in OBJECT_COLORS:
            raise ValueError(f"unknown color {self.color!r}; choose one of {tuple(OBJECT_COLORS)}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    def bbox(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels."""
        return (self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size)


@dataclass(frozen=True)
class Scene:
    """A scene: objects drawn in order over a plain background.

    Args:
        objects (`tuple[Shape, ...]`): one or two objects; later ones are drawn on top.
        background (`str`): one of :data:`BACKGROUNDS`.
        resolution (`int`, defaults to 64): image side in pixels.
    """

    objects: tuple[Shape, ...]
    background: str
    resolution: int = RESOLUTION

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; choose one of {tuple(BACKGROUNDS)}"
            )
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")

    # ----------------------------------------------------------------------------- text
    def describe(self) -> tuple[tuple[tuple[str, str], ...], str]:
        """The scene as its caption sees it: ``(((color, kind), ...), background)``."""
        return tuple((o.color, o.kind) for o in self.objects), self.background

    def caption(self) -> str:
        """The caption in the world's one grammar, e.g. ``a red circle and a blue square on a
        white background``."""
        return make_caption(*self.describe())

    # ----------------------------------------------------------------------------- edits
    def with_object(self, index: int, **changes: object) -> Scene:
        """A copy whose object `index` has fields replaced, e.g. ``kind="square"``."""
        objs = list(self.objects)
        objs[index] = dataclasses.replace(objs[index], **changes)
        return dataclasses.replace(self, objects=tuple(objs))

    def with_background(self, background: str) -> Scene:
        """A copy on another background."""
        return dataclasses.replace(self, background=background)

    def add_object(self, obj: Shape) -> Scene:
        """A copy with `obj` drawn on top of the others."""
        return dataclasses.replace(self, objects=self.objects + (obj,))

    def remove_object(self, index: int) -> Scene:
        """A copy without object `index`."""
        return dataclasses.replace(
            self, objects=tuple(o for i, o in enumerate(self.objects) if i != index)
        )

    # ----------------------------------------------------------------------------- pixels
    def render(self) -> Image.Image:
        """The scene as an anti-aliased RGB image of `resolution` x `resolution` pixels."""
        s = _SUPERSAMPLE
        big = Image.new("RGB", (self.resolution * s,) * 2, BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(big)
        for obj in self.objects:
            _draw(draw, obj, s, OBJECT_COLORS[obj.color])
        return big.resize((self.resolution,) * 2, Image.Resampling.BOX)

    def masks(self, min_coverage: float = 0.5) -> np.ndarray:
        """Visible area of each object: bool array (n_objects, resolution, resolution).

        Args:
            min_coverage (`float`, defaults to 0.5): a pixel belongs to an object when the object
                covers at least this fraction of it (anti-aliased edges are partly covered); use a
                small value such as 0.01 to include every touched pixel.
        """
        level = max(1, round(255 * min_coverage))
        s = _SUPERSAMPLE
        out = []
        covered = np.zeros((self.resolution,) * 2, dtype=bool)
        for obj in reversed(self.objects):  # topmost first, so occlusion is respected
            big = Image.new("L", (self.resolution * s,) * 2, 0)
            _draw(ImageDraw.Draw(big), obj, s, 255)
            cov = np.asarray(big.resize((self.resolution,) * 2, Image.Resampling.BOX)) >= level
            out.append(cov & ~covered)
            covered |= cov
        return np.stack(out[::-1])


def edit_region(source: Scene, target: Scene, grow: int = 1) -> np.ndarray:
    """Where an edit from `source` to `target` is allowed to change pixels: bool (H, W).

    The pixels whose rendered colors differ, plus the whole area, before and after, of every object
    the edit changes: a redrawn object (a circle turned into a square) need not keep the old outline
    where the two shapes overlap, only the rest of the image (the background and the other objects)
    must stay. Grown by `grow` pixels (a square neighbourhood) so that anti-aliased fringes count
    as inside. Everything outside should stay as it was.
    """
    a, b = np.asarray(source.render()), np.asarray(target.render())
    region = (a != b).any(-1)
    if len(source.objects) == len(target.objects):
        before, after = source.masks(min_coverage=0.01), target.masks(min_coverage=0.01)
        for i, (old, new) in enumerate(zip(source.objects, target.objects)):
            if old != new:
                region |= before[i] | after[i]
    return grow_region(region, grow)


def grow_region(region: np.ndarray, grow: int) -> np.ndarray:
    """`region` (bool, (H, W)) grown by `grow` pixels in a square neighbourhood."""
    h, w = region.shape
    for _ in range(grow):
        padded = np.pad(region, 1)
        region = np.zeros_like(region)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                region |= padded[dy : dy + h, dx : dx + w]
    return region


def _draw(draw: ImageDraw.ImageDraw, obj: Shape, scale: int, fill: object) -> None:
    left, top, right, bottom = (v * scale for v in obj.bbox())
    if obj.kind == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif obj.kind == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


# ------------------------------------------------------------------------------- captions
def make_caption(objects: tuple[tuple[str, str], ...], background: str) -> str:
    """Caption of ``objects`` given as ``(color, kind)`` pairs over ``background``."""
    things = " and ".join(f"a {color} {kind}" for color, kind in objects)
    return f"{things} on a {background} background"


_OBJ = r"a (\w+) (\w+)"
_CAPTION = re.compile(rf"^{_OBJ}(?: and {_OBJ})? on a (\w+) background$")


def parse_caption(caption: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """Inverse of :func:`make_caption`.

    Returns:
        ``(((color, kind), ...), background)``.

    Raises:
        ValueError: if the caption does not follow the world's grammar or names unknown words.
    """
    m = _CAPTION.match(caption.strip().lower())
    if m is None:
        raise ValueError(
            f"{caption!r} does not follow the grammar "
            "'a <color> <shape> [and a <color> <shape>] on a <background> background'"
        )
    c1, k1, c2, k2, bg = m.groups()
    objects = ((c1, k1),) if c2 is None else ((c1, k1), (c2, k2))
    for color, kind in objects:
        if color not in OBJECT_COLORS or kind not in SHAPES:
            raise ValueError(f"unknown color or shape in {caption!r}: {color!r} {kind!r}")
    if bg not in BACKGROUNDS:
        raise ValueError(f"unknown background {bg!r} in {caption!r}")
    return objects, bg


# ------------------------------------------------------------------------------- sampling
def random_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    resolution: int = RESOLUTION,
    p_two: float = 0.3,
) -> Scene:
    """Draw a scene. Deterministic given the generator's state.

    Args:
        rng (`np.random.Generator`): source of randomness, e.g. ``np.random.default_rng(seed)``.
        n_objects (`int`, *optional*): 1 or 2; drawn with probability `p_two` of 2 if omitted.
        resolution (`int`, defaults to 64): image side in pixels.
        p_two (`float`, defaults to 0.3): chance of two objects when `n_objects` is omitted.

    Two objects never overlap (their boxes keep a gap of 2 pixels) and are smaller than a single one.
    """
    if n_objects is None:
        n_objects = 2 if rng.random() < p_two else 1
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    background = str(rng.choice(list(BACKGROUNDS)))
    r = resolution / 64.0
    lo, hi = (10 * r, 17 * r) if n_objects == 1 else (8 * r, 12 * r)
    objects: list[Shape] = []
    while len(objects) < n_objects:
        size = float(rng.uniform(lo, hi))
        margin = size + 2 * r
        cx, cy = (float(v) for v in rng.uniform(margin, resolution - margin, size=2))
        obj = Shape(str(rng.choice(SHAPES)), str(rng.choice(list(OBJECT_COLORS))), cx, cy, size)
        if all(not _overlap(obj, o, gap=2 * r) for o in objects):
            objects.append(obj)
    return Scene(tuple(objects), background, resolution)


def _overlap(a: Shape, b: Shape, gap: float) -> bool:
    al, at, ar, ab = a.bbox()
    bl, bt, br, bb = b.bbox()
    return not (ar + gap <= bl or br + gap <= al or ab + gap <= bt or bb + gap <= at)


def scene_from_seed(seed: int, n_objects: int | None = None, resolution: int = RESOLUTION) -> Scene:
    """The scene numbered `seed`: ``random_scene(np.random.default_rng(seed), ...)``."""
    return random_scene(np.random.default_rng(seed), n_objects, resolution)

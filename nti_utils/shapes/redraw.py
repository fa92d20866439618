"""A second renderer of the shapes world, drawn differently from :meth:`Scene.render`.

The embedded model and its captioner were trained on one renderer (PIL polygons, 4x supersampling,
exact palette colors). A model that only knows those pixels is of little use on images made any other
way, so this module draws the same :class:`~nti_utils.shapes.world.Scene` with other code: analytic
coverage from signed distances (a soft edge of random width, or hard aliased edges), object and
background shades moved off the palette, squares and triangles rotated by a few degrees, and sensor
noise. It is used only to *evaluate* (the trainers never see it), so numbers measured on it say how
well a model reads images it was not trained on.

A :class:`Style` holds every random choice; drawing a scene and its edited version with the same
style gives the ground truth of an edit drawn "the same way" (same shades for the objects that did not
change, same noise).

Example:
    >>> from nti_utils.shapes.world import scene_from_seed
    >>> scene = scene_from_seed(7)
    >>> style = Style.from_seed(7)
    >>> image = redraw(scene, style)
    >>> edited = redraw(scene.with_background("black"), style)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from nti_utils.shapes.world import BACKGROUNDS, OBJECT_COLORS, Scene, Shape, grow_region


@dataclass(frozen=True)
class Style:
    """How one image is drawn.

    Args:
        edge (`float`): width in pixels of the anti-aliased edge ramp; 0 draws hard, aliased edges.
        shade (`dict[str, tuple[float, float, float]]`): an sRGB offset per color name (object
            colors and backgrounds), added to the palette color.
        rotation (`float`): degrees by which squares and triangles are turned about their center.
        noise (`float`): standard deviation of the Gaussian pixel noise, in 0-255 units.
        noise_seed (`int`): seed of the noise field (the same for a scene and its edit).
    """

    edge: float = 1.0
    shade: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    rotation: float = 0.0
    noise: float = 0.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.edge) and self.edge >= 0):
            raise ValueError(f"edge must be a finite width >= 0 pixels, got {self.edge!r}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be a finite standard deviation >= 0, got {self.noise!r}")

    @classmethod
    def from_seed(
        cls, seed: int, max_shade: float = 28.0, max_rotation: float = 12.0, max_noise: float = 5.0
    ) -> Style:
        """A random style, deterministic in `seed`: edge in [0, 1.8] px (hard edges one time in
        five), every object color shifted by up to `max_shade` per channel, each background made
        lighter or darker by up to `max_shade` with a slight tint, rotation up to
        `max_rotation` degrees either way, noise up to `max_noise`."""
        rng = np.random.default_rng([seed, 0x5EED])
        edge = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.3, 1.8))
        shade = {
            n: tuple(float(v) for v in rng.uniform(-max_shade, max_shade, 3)) for n in OBJECT_COLORS
        }
        for n in BACKGROUNDS:  # a lighter or darker plain background, barely tinted
            offset = rng.uniform(-0.7, 0.7) * max_shade + rng.uniform(-0.3, 0.3, 3) * max_shade
            shade[n] = tuple(float(v) for v in offset)
        rotation = float(rng.uniform(-max_rotation, max_rotation))
        noise = float(rng.uniform(0.0, max_noise))
        return cls(edge, shade, rotation, noise, int(rng.integers(2**31)))

    def color(self, name: str, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
        """The shade of `name` in this style: (3,) float, clipped to 0-255."""
        offset = np.asarray(self.shade.get(name, (0.0, 0.0, 0.0)))
        return np.clip(np.asarray(palette[name], dtype=np.float64) + offset, 0, 255)


def _signed_distance(obj: Shape, x: np.ndarray, y: np.ndarray, degrees: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) from pixel centers to the object's outline."""
    dx, dy = x - obj.cx, y - obj.cy
    if obj.kind == "circle":
        return np.hypot(dx, dy) - obj.size
    a = math.radians(degrees)  # turn the sampling grid the other way
    u = math.cos(a) * dx + math.sin(a) * dy
    v = -math.sin(a) * dx + math.cos(a) * dy
    s = obj.size
    if obj.kind == "square":
        q = np.stack([np.abs(u) - s, np.abs(v) - s])
        outside = np.hypot(np.maximum(q[0], 0), np.maximum(q[1], 0))
        return outside + np.minimum(np.maximum(q[0], q[1]), 0)
    # isosceles triangle, apex (0, -s), base corners (+-s, s): the max of three half-planes
    # (not an exact distance near the corners, which is fine for an edge ramp of a pixel or two)
    n = math.hypot(2 * s, s)
    left = (-2 * s * u - s * v - s * s) / n  # through (0, -s) and (-s, s)
    right = (2 * s * u - s * v - s * s) / n
    return np.maximum(np.maximum(left, right), v - s)


def coverage(scene: Scene, style: Style) -> np.ndarray:
    """Per-object coverage in [0, 1] as this style draws it: (n_objects, H, W), before occlusion."""
    res = scene.resolution
    y, x = np.mgrid[0:res, 0:res].astype(np.float64) + 0.5
    out = []
    for obj in scene.objects:
        d = _signed_distance(obj, x, y, 0.0 if obj.kind == "circle" else style.rotation)
        if style.edge == 0:
            out.append((d <= 0).astype(np.float64))
        else:
            out.append(np.clip(0.5 - d / style.edge, 0.0, 1.0))
    return np.stack(out)


def redraw(scene: Scene, style: Style) -> Image.Image:
    """Draw `scene` in `style`: an RGB image of ``scene.resolution`` pixels a side."""
    res = scene.resolution
    img = np.broadcast_to(style.color(scene.background, BACKGROUNDS), (res, res, 3)).copy()
    for obj, cov in zip(scene.objects, coverage(scene, style)):
        c = cov[..., None]
        img = img * (1 - c) + style.color(obj.color, OBJECT_COLORS) * c
    if style.noise > 0:
        rng = np.random.default_rng(style.noise_seed)
        img = img + rng.normal(0.0, style.noise, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def redraw_region(source: Scene, target: Scene, style: Style, grow: int = 1) -> np.ndarray:
    """Where an edit from `source` to `target` may change pixels when both are drawn in `style`:
    bool (H, W), the counterpart of :func:`~nti_utils.shapes.world.edit_region` (pixels whose
    noise-free colors differ, plus the whole area of every changed object before and after),
    grown by `grow` pixels."""
    quiet = Style(style.edge, style.shade, style.rotation, 0.0, style.noise_seed)
    a = np.asarray(redraw(source, quiet), dtype=np.int16)
    b = np.asarray(redraw(target, quiet), dtype=np.int16)
    region = (np.abs(a - b) > 2).any(-1)
    if len(source.objects) == len(target.objects):
        before, after = coverage(source, style), coverage(target, style)
        for i, (old, new) in enumerate(zip(source.objects, target.objects)):
            if old != new:
                region |= (before[i] > 0.01) | (after[i] > 0.01)
    return grow_region(region, grow)

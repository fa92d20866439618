"""Edits with ground truth: a source scene, the edited target scene, their prompts and the region
that may change, and the scoring of an edited image against all of that.

This is what makes the embedded model's world useful for Prompt-to-Prompt: the target of "turn the
circle into a square" is not a matter of taste, it is ``scene.with_object(0, kind="square")``
rendered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from nti_utils.align import swap_words
from nti_utils.attention import finest_map_resolution
from nti_utils.editing import TARGET_NULLS, EditOutput, build_controller, edit
from nti_utils.metrics import psnr
from nti_utils.p2p import AttentionEdit
from nti_utils.result import InversionResult
from nti_utils.shapes.score import score_caption
from nti_utils.shapes.world import BACKGROUNDS, OBJECT_COLORS, SHAPES, Scene, edit_region

EDIT_KINDS = ("shape", "color", "background")
"""Word swaps the shapes world can score exactly."""


@dataclass(frozen=True)
class EditCase:
    """One edit with its ground truth.

    Attributes:
        kind (`str`): one of :data:`EDIT_KINDS`.
        source, target (`Scene`): before and after.
        source_word, target_word (`str`): the swapped word (e.g. "circle" -> "square").
        region (`np.ndarray`): bool (H, W), where pixels may change (see
            :func:`~nti_utils.shapes.world.edit_region`).
        source_prompt (`str`, *optional*): the prompt the source was inverted with when it is not
            the scene's caption (e.g. a captioner's); the target prompt is then its word swap.
    """

    kind: str
    source: Scene
    target: Scene
    source_word: str
    target_word: str
    region: np.ndarray
    source_prompt: str | None = None

    @property
    def prompts(self) -> list[str]:
        """[source prompt, target prompt]: the scenes' captions, or `source_prompt` and its swap of
        `source_word` for `target_word` (a `ValueError` if it does not name `source_word`)."""
        if self.source_prompt is None:
            return [self.source.caption(), self.target.caption()]
        swap = {self.source_word: self.target_word}
        return [self.source_prompt, swap_words(self.source_prompt, swap)]

    @property
    def blend_words(self) -> list[list[str]]:
        """Words marking the edited object for LocalBlend, per prompt (empty for background)."""
        if self.kind == "background":
            return [[], []]
        obj_s, obj_t = self.source.objects[0], self.target.objects[0]
        return [[obj_s.kind], [obj_t.kind]]


def make_edit(scene: Scene, kind: str, rng: np.random.Generator) -> EditCase:
    """Swap the first object's shape or color, or the background, to a random other value."""
    if kind == "shape":
        old = scene.objects[0].kind
        new = str(rng.choice([k for k in SHAPES if k != old]))
        target = scene.with_object(0, kind=new)
    elif kind == "color":
        old = scene.objects[0].color
        new = str(rng.choice([c for c in OBJECT_COLORS if c != old]))
        target = scene.with_object(0, color=new)
    elif kind == "background":
        old = scene.background
        new = str(rng.choice([b for b in BACKGROUNDS if b != old]))
        target = scene.with_background(new)
    else:
        raise ValueError(f"unknown edit kind {kind!r}; choose one of {EDIT_KINDS}")
    return EditCase(kind, scene, target, old, new, edit_region(scene, target))


@dataclass(frozen=True)
class EditRecipe:
    """Prompt-to-Prompt settings for one kind of edit (a :class:`~nti_utils.p2p.Replace`).

    Attributes:
        cross_replace_steps (`float`): fraction of the steps in which the target takes the
            source's cross-attention maps.
        self_replace_steps (`float`): same for self-attention.
        blend (`bool`): add a :class:`~nti_utils.local_blend.LocalBlend` on the edited object's shape word.
        blend_threshold (`float`, defaults to 0.3): its threshold.
        blend_finest (`bool`, defaults to `False`): build its mask from the finest cross-attention
            maps (the latent's own size) instead of Prompt-to-Prompt's default resolution.
        self_replace_finest (`bool`, defaults to `False`): inject self-attention in every layer up
            to the finest attention resolution, instead of only up to Prompt-to-Prompt's map
            resolution (16x16 in SD, 8x8 in the embedded model).
        target_null (`str`, defaults to ``"inverted"``): the target row's null embedding, the
            inversion's ∅_t (the paper's edit) or ``"plain"`` ∅ (see :func:`~nti_utils.editing.edit`).
    """

    cross_replace_steps: float
    self_replace_steps: float
    blend: bool
    blend_threshold: float = 0.3
    blend_finest: bool = False
    self_replace_finest: bool = False
    target_null: str = "inverted"

    def __post_init__(self):
        if self.target_null not in TARGET_NULLS:
            raise ValueError(f"target_null must be one of {TARGET_NULLS}, got {self.target_null!r}")


RECIPES: dict[str, EditRecipe] = {
    # a new outline needs the new word's own maps for most steps (the source's for the first 20%
    # only); the source's self-attention at every level (16x16 too) for 60% of the steps keeps its
    # place; a mask at half the maps' peak (not 0.3) keeps the background
    "shape": EditRecipe(0.2, 0.6, blend=True, blend_threshold=0.5, self_replace_finest=True),
    # same outline, new color: a tight mask (from the finest maps) keeps the background
    "color": EditRecipe(0.6, 0.6, blend=True, blend_finest=True, self_replace_finest=True),
    # a global edit: no mask; the source's self-attention for 40% of the steps keeps the object
    "background": EditRecipe(0.8, 0.4, blend=False, self_replace_finest=True),
}
"""The embedded model's settings per edit kind, chosen with ``tools/tune_recipes.py`` on 16
held-out scenes (numbered from :data:`~nti_utils.shapes.seeds.TUNING`: not the benchmark's, the
evaluator's, the tests' or the notebooks'); what they give is measured by ``python -m nti_utils.bench``."""


def edit_controller(
    case: EditCase,
    pipe,
    num_steps: int,
    recipe: EditRecipe | None = None,
    target_weight: float = 1.0,
) -> AttentionEdit:
    """The Prompt-to-Prompt controller for `case`: a :class:`~nti_utils.p2p.Replace` with the
    case kind's :data:`RECIPES` entry (or `recipe`), built by
    :func:`~nti_utils.editing.build_controller`.

    Args:
        case (`EditCase`): the edit.
        pipe: the pipeline (its tokenizer, and its UNet for the finest map resolution).
        num_steps (`int`): DDIM steps of the inversion to edit.
        recipe (`EditRecipe`, *optional*): overrides the kind's recipe.
        target_weight (`float`, defaults to 1.0): factor on the target word's cross-attention
            (a :class:`~nti_utils.p2p.Reweight` around the swap); 1 re-weights nothing.

    Returns:
        `AttentionEdit`: a `Replace`, or a `Reweight` wrapping one when `target_weight` is not 1.
    """
    r = recipe or RECIPES[case.kind]
    finest = finest_map_resolution(pipe.unet)
    blend = r.blend and case.kind != "background"
    return build_controller(
        pipe.tokenizer,
        case.prompts,
        num_steps,
        edit="replace",
        cross_replace_steps=r.cross_replace_steps,
        self_replace_steps=r.self_replace_steps,
        self_replace_max_side=finest if r.self_replace_finest else None,
        blend_words=case.blend_words if blend else None,
        blend_threshold=r.blend_threshold,
        blend_resolution=finest if r.blend_finest else None,
        reweight={case.target_word: target_weight} if target_weight != 1.0 else None,
    )


@dataclass(frozen=True)
class EditScore:
    """How good an edited image is.

    Attributes:
        success (`bool`): the scorer reads the target caption's changed attribute in the image and
            the unchanged attributes stay as they were.
        psnr_target (`float`): PSNR (dB) against the ground-truth target render.
        psnr_outside (`float`): PSNR (dB) against the *input* image outside the edit region (how well
            everything that should not change was kept); `inf` if identical.
    """

    success: bool
    psnr_target: float
    psnr_outside: float


def edit_rates(scores: list[EditScore], psnr_bar: float = 25.0) -> dict:
    """Aggregate of several edits' scores: their number `n`, the `success` rate, the mean PSNR
    outside the edit region (`psnr_outside_mean`), the share at or above `psnr_bar` there
    (`psnr_outside_ge_25`) and of both together (`success_and_ge_25`)."""
    ok = np.array([s.success for s in scores])
    outside = np.array([s.psnr_outside for s in scores])
    return {
        "n": len(scores),
        "success": float(ok.mean()),
        "psnr_outside_mean": float(outside.mean()),
        "psnr_outside_ge_25": float(np.mean(outside >= psnr_bar)),
        "success_and_ge_25": float(np.mean(ok & (outside >= psnr_bar))),
    }


def score_edit(
    case: EditCase,
    edited: Image.Image,
    source_image: Image.Image,
    target_image: Image.Image | None = None,
    rotation_invariant: bool = False,
) -> EditScore:
    """Score an edited image against the case's ground truth.

    Args:
        case (`EditCase`): the edit (its `region` is where the edit may change pixels).
        edited (`PIL.Image.Image`): the edited image, at the scene's resolution.
        source_image (`PIL.Image.Image`): the input image that was inverted.
        target_image (`PIL.Image.Image`, *optional*): the ground truth drawn the way the input
            was (e.g. by :mod:`nti_utils.shapes.redraw`); defaults to ``case.target.render()``.
        rotation_invariant (`bool`, defaults to `False`): read shapes at any rotation (see
            :func:`~nti_utils.shapes.score.analyze`), for inputs drawn with turned shapes.
    """
    side = case.source.resolution
    if edited.size != (side, side):
        raise ValueError(f"edited image is {edited.size}, the scene is {side}x{side}")
    s = score_caption(edited, case.target.caption(), rotation_invariant)
    outside = ~case.region
    return EditScore(
        success=bool(s.all),
        psnr_target=psnr(edited, case.target.render() if target_image is None else target_image),
        psnr_outside=psnr(edited, source_image, mask=outside) if outside.any() else float("nan"),
    )


def edit_case(
    pipe,
    inversion: InversionResult,
    case: EditCase,
    recipe: EditRecipe | None = None,
    guidance_scale: float | None = None,
    progress: bool = False,
    *,
    target_weight: float = 1.0,
    source_image: Image.Image | None = None,
    target_image: Image.Image | None = None,
    rotation_invariant: bool = False,
) -> tuple[EditOutput, EditScore]:
    """Edit an inverted shapes-world scene with its case's recipe and score the result: the one
    invert -> edit -> score step of the evaluator, the benchmark, the recipe tuner and the panel.

    Args:
        pipe: the pipeline `inversion` was made with.
        inversion (`InversionResult`): the inverted source scene (``case.source`` rendered, with
            its caption as the prompt); its step count is the edit's.
        case (`EditCase`): the edit.
        recipe (`EditRecipe`, *optional*): defaults to the case kind's :data:`RECIPES` entry.
        guidance_scale (`float`, *optional*): defaults to the inversion's w.
        progress (`bool`, defaults to `False`): show a tqdm bar while sampling.
        target_weight (`float`, defaults to 1.0): see :func:`edit_controller`.
        source_image (`PIL.Image.Image`, *optional*): the image that was inverted, which
            :func:`score_edit` compares the edit with outside the edit region; defaults to
            ``case.source.render()``.
        target_image (`PIL.Image.Image`, *optional*): its ground-truth edit drawn the same way;
            defaults to ``case.target.render()``.
        rotation_invariant (`bool`, defaults to `False`): see :func:`score_edit`.

    Returns:
        `tuple[EditOutput, EditScore]`: the edit (``images[0]`` the source reconstruction,
        ``images[1]`` the edited image) and the edited image's score.
    """
    recipe = recipe or RECIPES[case.kind]
    ctrl = edit_controller(case, pipe, inversion.settings.num_steps, recipe, target_weight)
    out = edit(
        pipe,
        inversion,
        case.prompts,
        ctrl,
        guidance_scale=guidance_scale,
        progress=progress,
        target_null=recipe.target_null,
    )
    image = source_image if source_image is not None else case.source.render()
    return out, score_edit(case, out.images[1], image, target_image, rotation_invariant)

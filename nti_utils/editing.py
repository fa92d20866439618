"""Editing an inverted image with Prompt-to-Prompt: a controller from plain settings
(:func:`build_controller`) and the edit itself (:func:`edit`).

Source and target prompts run in one batch from the inversion's z̄_T, with its ∅_t at step t; the
controller (:mod:`nti_utils.p2p`, :mod:`nti_utils.local_blend`) changes the targets' attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from nti_utils.align import check_prompt
from nti_utils.attention import AttentionStore
from nti_utils.images import latents_to_pil
from nti_utils.local_blend import LocalBlend
from nti_utils.models import Pipeline, embed_prompts
from nti_utils.p2p import (
    AttentionEdit,
    Refine,
    Replace,
    Reweight,
    Steps,
    _finite_number,
    check_prompts,
    equalizer,
)
from nti_utils.resample import resample
from nti_utils.result import InversionResult, check_compatible

EDITS = ("replace", "refine")
"""The edits :func:`build_controller` makes: a word swap (:class:`Replace`) or a refinement
(:class:`Refine`)."""

TARGET_NULLS = ("inverted", "plain")
"""The null embeddings :func:`edit` can give the target rows: the inversion's ∅_t, or the empty
prompt's plain ∅."""


def build_controller(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_steps: int,
    *,
    edit: str = "replace",
    cross_replace_steps: Steps | dict[str, Steps] = 0.8,
    self_replace_steps: Steps = 0.4,
    self_replace_max_side: int | None = None,
    blend_words: Sequence[Sequence[str]] | None = None,
    blend_threshold: float = 0.3,
    blend_resolution: int | None = None,
    reweight: dict[str, float] | None = None,
) -> AttentionEdit:
    """Build a Prompt-to-Prompt controller from plain settings: a :class:`Replace` or
    :class:`Refine`, with a :class:`LocalBlend` and a :class:`Reweight` on top when asked for.

    This is the one place where settings become a controller (the batch command, the ablation panel
    and the shapes-world recipes all call it).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        prompts (`Sequence[str]`): source first, then targets.
        num_steps (`int`): DDIM steps of the inversion to edit.
        edit (`str`, defaults to ``"replace"``): ``"replace"`` (word swap, prompts aligned token for
            token) or ``"refine"`` (words added or changed).
        cross_replace_steps (`float`, `(start, end)` or `dict`, defaults to 0.8): when targets take
            the source's cross-attention, see :func:`cross_replace_alphas`.
        self_replace_steps (`float` or `(start, end)`, defaults to 0.4): when targets take the
            source's self-attention.
        self_replace_max_side (`int`, *optional*): only layers at most this large get self-attention
            injection; defaults to the map resolution (see :class:`AttentionEdit`).
        blend_words (`Sequence[Sequence[str]]`, *optional*): words per prompt (source first) for a
            :class:`LocalBlend`; none (or empty) for no blend.
        blend_threshold (`float`, defaults to 0.3): the blend mask's threshold.
        blend_resolution (`int`, *optional*): the map resolution the blend mask is built from;
            defaults to the controller's map resolution.
        reweight (`dict[str, float]`, *optional*): target word -> factor for a :class:`Reweight`
            wrapping the edit; none (or empty) for no re-weighting.

    Returns:
        `AttentionEdit`: the controller, to pass to :func:`edit`.

    Raises:
        ValueError: if `edit` is not one of :data:`EDITS`, or the prompts do not fit the edit (a
            replace whose target does not align token for token, a blend or reweight word that is
            not in its prompt).

    Example:

    ```py
    >>> ctrl = build_controller(
    ...     pipe.tokenizer,
    ...     ["a red circle on a white background", "a red square on a white background"],
    ...     50,
    ...     blend_words=[["circle"], ["square"]],
    ... )
    >>> out = edit(pipe, inversion, ctrl.prompts, ctrl)
    ```
    """
    if edit not in EDITS:
        raise ValueError(f"`edit` must be one of {EDITS}, got {edit!r}")
    prompts = list(prompts)
    local_blend = None
    if blend_words:
        local_blend = LocalBlend(
            blend_words, tokenizer, prompts, threshold=blend_threshold, resolution=blend_resolution
        )
    cls = Replace if edit == "replace" else Refine
    windows = dict(
        cross_replace_steps=cross_replace_steps,
        self_replace_steps=self_replace_steps,
        self_replace_max_side=self_replace_max_side,
    )
    if not reweight:
        return cls(tokenizer, prompts, num_steps, local_blend=local_blend, **windows)
    base = cls(tokenizer, prompts, num_steps, **windows)  # its mapping; the wrapper blends
    eq = equalizer(tokenizer, prompts, reweight)
    return Reweight(
        tokenizer, prompts, num_steps, eq, base=base, local_blend=local_blend, **windows
    )


@dataclass
class EditOutput:
    """What :func:`edit` returns: images (source reconstruction first; none when the edit was run
    with ``decode=False``), their latents (P, C, h, w), the prompts, and the controller (its stored
    attention maps can be plotted)."""

    images: list[Image.Image]
    latents: torch.Tensor
    prompts: list[str]
    controller: AttentionStore


def edit(
    pipe: Pipeline,
    inversion: InversionResult,
    prompts: Sequence[str],
    controller: AttentionStore | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    allow_other_source: bool = False,
    decode: bool = True,
    target_null: str = "inverted",
) -> EditOutput:
    """Edit an inverted image: sample the source and target prompts in one batch from z̄_T with the
    per-step null embeddings ∅_t and the controller installed, with the sampler the inversion's
    method needs (:func:`~nti_utils.resample.resample`): Direct Inversion corrects the source row
    only, edit-friendly DDPM inversion gives every row the same noise maps, EDICT runs source and
    targets through both coupled sequences (two UNet calls per step at the same controller step,
    the step callback once per step on ``[x; y]`` joined along channels).

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): the model the image was inverted with.
        inversion (`InversionResult`): from null-text (or another) inversion; its per-step
            conditional offsets, if any, are added to every prompt's embedding.
        prompts (`Sequence[str]`): a list: the source prompt (the inversion's) first, then the
            targets.
        controller (`AttentionStore`, *optional*): e.g. :class:`Replace`, built for these prompts
            and the inversion's steps; a plain `AttentionStore` (the default) edits nothing and only
            records maps.
        guidance_scale (`float`, *optional*): defaults to the inversion's w; finite.
        progress (`bool`, defaults to `True`): show a tqdm bar.
        allow_other_source (`bool`, defaults to `False`): allow a source prompt other than the
            inversion's (z̄_T and ∅_t reconstruct the image only with the inversion's prompt, so by
            default that is an error).
        decode (`bool`, defaults to `True`): decode the latents to images with the VAE; with
            `False` only the latents are returned (``images`` is empty), e.g. to measure the
            sampling alone (:mod:`nti_utils.bench.memory`).
        target_null (`str`, defaults to ``"inverted"``): the null embedding of the target rows:
            ``"inverted"``, the inversion's ∅_t as for the source row (the paper's edit), or
            ``"plain"``, the empty prompt's ∅ at every step (an option of ours: the optimized ∅_t
            were fitted to the source prompt's trajectory; the source row keeps them either way).

    Returns:
        :class:`EditOutput`; ``images[0]`` is the source reconstruction.

    Raises:
        TypeError: `prompts` is a string or holds non-strings.
        ValueError: the controller was built for other prompts or steps, ``prompts[0]`` is not
            the inversion's prompt (unless `allow_other_source`), the guidance scale is not a
            finite number, or `target_null` is neither ``"inverted"`` nor ``"plain"``.
    """
    if target_null not in TARGET_NULLS:
        raise ValueError(f"target_null must be one of {TARGET_NULLS}, got {target_null!r}")
    check_compatible(inversion, pipe)
    prompts = check_prompts(prompts)
    for k, p in enumerate(prompts):  # characters the tokenizer cannot represent, length
        check_prompt(pipe.tokenizer, p, f"prompts[{k}]")
    if prompts[0] != inversion.prompt and not allow_other_source:
        raise ValueError(
            f"prompts[0] must be the inversion's source prompt {inversion.prompt!r}, got "
            f"{prompts[0]!r}; pass allow_other_source=True to edit from another source prompt"
        )
    controller = controller if controller is not None else AttentionStore()
    w = inversion.settings.guidance_scale if guidance_scale is None else guidance_scale
    if not _finite_number(w):
        raise ValueError(f"guidance_scale must be a finite number, got {w!r}")
    num_steps = inversion.settings.num_steps
    if isinstance(controller, AttentionEdit):
        if controller.prompts != prompts:
            raise ValueError(
                f"controller was built for the prompts {controller.prompts}, edit got {prompts}; "
                "build it with the prompts you edit"
            )
        if controller.num_steps != num_steps:
            raise ValueError(
                f"controller built for {controller.num_steps} steps, inversion has {num_steps}"
            )
    cond = embed_prompts(pipe, prompts)
    plain = embed_prompts(pipe, [""]) if target_null == "plain" else None
    latents = resample(pipe, inversion, cond, w, controller, progress, target_uncond=plain)
    images = latents_to_pil(pipe, latents) if decode else []
    return EditOutput(images, latents, prompts, controller)

"""What the inversions after null-text inversion share: checked inputs without pivots, and the
packaging of their results.

EDICT, edit-friendly DDPM inversion and the fixed-point inversion start from z_0 itself, not from
a DDIM trajectory; Direct Inversion uses the DDIM pivots of :func:`~nti_utils.pivots.prepare`.
All of them keep ∅ = encoder("") at every step (nothing is optimized), so their results
reconstruct and edit through the same :class:`~nti_utils.result.InversionResult` fields as the
others, plus the fields of their own (:mod:`nti_utils.resample` reads them).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from nti_utils.images import ImageLike
from nti_utils.pivots import Prepared, prepare_inputs, single
from nti_utils.result import InversionResult, InversionSettings


def encode_inputs(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings,
) -> Prepared:
    """One image's checked inputs: z_0, the schedule, C and ∅, without a DDIM inversion
    (:func:`~nti_utils.pivots.prepare_inputs`: every check of :func:`~nti_utils.pivots.prepare`,
    no UNet call).

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P.
        settings (`InversionSettings`): its `num_steps` N sets the schedule.

    Returns:
        :class:`~nti_utils.pivots.Prepared` for a batch of one; ``pivots[0]`` is z_0, (1, C, h, w).

    Raises:
        TypeError: `settings` is not an :class:`~nti_utils.result.InversionSettings`.
    """
    return prepare_inputs(pipe, single(image), [prompt], InversionSettings.check(settings))


def package(
    pipe: StableDiffusionPipeline,
    prep: Prepared,
    prompt: str,
    method: str,
    settings: InversionSettings,
    latent_T: torch.Tensor,
    **values,
) -> InversionResult:
    """An :class:`~nti_utils.result.InversionResult` of `method` stamped with `pipe`'s identity:
    z̄_T = `latent_T` (1, C, h, w), ∅ = encoder("") at every step, `prep`'s timings, and `values`
    for the other fields."""
    n = len(prep.schedule)
    return InversionResult.for_pipeline(
        pipe,
        latent_T=latent_T.detach(),
        null_embeddings=torch.stack([prep.null.detach()] * n),
        prompt=prompt,
        method=method,
        settings=settings,
        timings=prep.timings,
        **values,
    )

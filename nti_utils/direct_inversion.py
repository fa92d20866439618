"""Direct Inversion (Ju et al., ICLR 2024, "PnP Inversion": "Boosting Diffusion-based Editing
with 3 Lines of Code"): keep the source branch of an edit on the pivots by adding, after every
step, the gap that null-text inversion optimizes ∅_t to close. No optimization.

With the pivots z*_0..z*_N of DDIM inversion at w = 1 (:func:`~nti_utils.pivots.prepare`) and
∅ = encoder(""), for t = T..1 (sampling step i, t = timesteps[i]):

* replay the guided step from the pivot, ``z̃_{t-1} = DDIM_step(z*_t, ε̃(z*_t, t, C, ∅))`` with
  ``ε̃ = ε(∅) + w (ε(C) - ε(∅))``;
* store its gap ``d_t = z*_{t-1} - z̃_{t-1}``.

Editing samples source and targets in one batch from z*_T with the source prompt's C first; after
each step, d_t is added to the source row only (:func:`corrected_step`). The source row enters every
step at z*_t and leaves it at ``z̃_{t-1} + d_t = z*_{t-1}`` (to float rounding), so it follows the
pivots exactly and reconstructs z_0 = z*_0; the targets get no correction and follow the source only
through Prompt-to-Prompt's attention control (the source's attention maps come from the pivots).
Since the source row is z*_t at every step, adding d_t is the same as replacing the source row by the
pivot; the replay costs N guided UNet calls but keeps the paper's formulation (and its d_t, a
measure of how far one guided step strays from the w = 1 trajectory: the result's `step_errors`).
The d_t are those of the inversion's w: editing at another w leaves the source off the pivots.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from nti_utils.ddim import StepRule, ddim_step, guided_noise
from nti_utils.images import ImageLike
from nti_utils.inputs import package
from nti_utils.pivots import prepare, single
from nti_utils.result import InversionResult, InversionSettings

METHOD = "direct"


@torch.no_grad()
def direct_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
) -> InversionResult:
    """Direct Inversion of one image (method ``"direct"``): DDIM pivots at w = 1, then the gaps
    d_t of the guided steps replayed from them (see the module docstring).

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P.
        settings (`InversionSettings`): `num_steps` N and `guidance_scale` w are used (the
            optimizer's fields are not); `pivots` must be ``"ddim"``.
        progress (`bool`, defaults to `True`): show tqdm bars.

    Returns:
        :class:`~nti_utils.result.InversionResult` with z̄_T = z*_T, ∅ = encoder("") at every step,
        `source_corrections` d_t (N, 1, C, h, w) in sampling order, `pivots`, `step_errors`
        (per step, the mean of d_t², the guided step's miss) and `unet_calls` of the replay (the
        pivots' DDIM inversion not included, as for null-text inversion).

    Raises:
        ValueError: ``settings.pivots`` is ``"random"`` (null-text inversion's ablation; Direct
            Inversion's pivots are the w = 1 DDIM trajectory).
    """
    s = InversionSettings.check(settings)
    if s.pivots != "ddim":
        raise ValueError(
            f"Direct Inversion follows the w = 1 DDIM pivots; settings.pivots={s.pivots!r} is "
            "null-text inversion's random-pivot ablation: use pivots='ddim'"
        )
    prep = prepare(pipe, single(image), [prompt], s, progress)
    schedule, pivots, n = prep.schedule, prep.pivots, len(prep.schedule)
    w = s.guidance_scale
    t0 = time.perf_counter()
    corrections = []
    for i, t in enumerate(tqdm(schedule.timesteps, desc="direct inversion", disable=not progress)):
        z_t = pivots[n - i]
        eps = guided_noise(pipe.unet, z_t, t, prep.cond, prep.null, w, schedule)
        corrections.append(pivots[n - 1 - i] - ddim_step(z_t, eps, *schedule.alphas(i)))
    prep.timings["replay"] = time.perf_counter() - t0
    return package(
        pipe,
        prep,
        prompt,
        METHOD,
        s,
        pivots[-1],
        pivots=pivots,
        source_corrections=torch.stack(corrections),
        step_errors=[d.float().pow(2).mean().item() for d in corrections],
        unet_calls={"forward": n * (1 if w == 1.0 else 2), "backward": 0},
    )


def corrected_step(corrections: Sequence[torch.Tensor]) -> StepRule:
    """The sampler's step for Direct Inversion: the DDIM step, then ``z_{t-1}[0] += d_t`` on the
    source row (row 0) only.

    Args:
        corrections (sequence of `torch.Tensor`): d_t per sampling step, each (1, C, h, w).

    Returns:
        `StepRule` for :func:`~nti_utils.ddim.sample`'s `step`.
    """

    def step(i, z_t, eps, alpha_t, alpha_prev):
        z = ddim_step(z_t, eps, alpha_t, alpha_prev)
        return torch.cat([z[:1] + corrections[i].to(z), z[1:]])

    return step

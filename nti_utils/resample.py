"""Sampling from an inversion with the sampler its method needs: the one place where
reconstruction (:func:`~nti_utils.inversion.reconstruct`) and editing
(:func:`~nti_utils.editing.edit`) turn an :class:`~nti_utils.result.InversionResult` into latents.

All of them start every row (the source prompt's, and in an edit the targets') from the result's
z̄_T with its ∅_t at step t and guidance w:

* null-text, negative-prompt, DDIM and fixed-point inversion: DDIM sampling
  (:func:`~nti_utils.ddim.sample`), with the per-step conditional offsets where C was optimized;
* Direct Inversion (``source_corrections``): the same, with d_t added to the source row after each
  step (:func:`~nti_utils.direct_inversion.corrected_step`);
* edit-friendly DDPM inversion (``noise_maps``): stochastic steps with the noise maps, from the first
  step that runs (:func:`~nti_utils.ddpm_inversion.noise_map_step`); a controller still counts the
  steps of the full N-step schedule (its windows are fractions of N, and the skipped steps are
  behind it when sampling starts);
* EDICT (``coupled_latent_T``): the coupled sampler on (x, y) (:func:`~nti_utils.edict.edict_sample`),
  returning x_0.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
from diffusers import StableDiffusionPipeline

from nti_utils.attention import AttentionController, controlled_attention
from nti_utils.ddim import DDIMSchedule, sample
from nti_utils.ddpm_inversion import noise_map_step
from nti_utils.direct_inversion import corrected_step
from nti_utils.edict import edict_sample
from nti_utils.result import InversionResult


def start_step(result: InversionResult) -> int:
    """The first sampling step that runs: edit-friendly DDPM inversion's ``skip``, else 0."""
    return getattr(result.method_settings, "skip", 0) if result.noise_maps is not None else 0


def sampling_schedule(pipe: StableDiffusionPipeline, result: InversionResult) -> DDIMSchedule:
    """The steps a result is sampled with: the N-step schedule of its settings, from
    :func:`start_step` on."""
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, result.settings.num_steps)
    start = start_step(result)
    return (
        dataclasses.replace(schedule, timesteps=schedule.timesteps[start:]) if start else schedule
    )


def resample(
    pipe: StableDiffusionPipeline,
    result: InversionResult,
    cond: torch.Tensor,
    guidance_scale: float,
    controller: AttentionController | None = None,
    progress: bool = True,
    target_uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample every prompt of `cond` from `result` with the sampler its method needs (see the
    module docstring).

    Args:
        pipe (`StableDiffusionPipeline`): the model `result` was made with (not checked here).
        result (`InversionResult`): the inversion.
        cond (`torch.Tensor`): C of each prompt, (P, L, D); row 0 is the source (Direct Inversion
            corrects that row only).
        guidance_scale (`float`): w.
        controller (`AttentionController`, *optional*): installed on the UNet for the run; told
            about it with ``begin(P, (h, w))``, its ``step_end`` is the step callback.
        progress (`bool`, defaults to `True`): show a tqdm bar.
        target_uncond (`torch.Tensor`, *optional*): a null embedding (1, L', D) for every row but
            the source's at every step, instead of the result's ∅_t (the source row keeps ∅_t, so
            it still retraces the image).

    Returns:
        `torch.Tensor`: z_0 of each prompt, (P, C, h, w).

    Raises:
        ValueError: an EDICT or DDPM result without its `method_settings`.
    """
    needs = "coupled_latent_T" if result.coupled_latent_T is not None else "noise_maps"
    if getattr(result, needs) is not None and result.method_settings is None:
        raise ValueError(
            f"this {result.method!r} result has {needs} but no method_settings (EDICT's mixing p, "
            "DDPM's η and skip): make it with the method's inversion function"
        )
    unet, dev, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    schedule, start = sampling_schedule(pipe, result), start_step(result)
    rows = cond.shape[0]
    latents = result.latent_T.to(dev, dtype).expand(rows, -1, -1, -1).clone()
    nulls = [u.to(dev, dtype) for u in result.uncond_per_step()][start:]
    if target_uncond is not None and rows > 1:
        others = target_uncond.to(dev, dtype).expand(rows - 1, -1, -1)
        nulls = [torch.cat([u, others]) for u in nulls]
    callback = None
    if controller is not None:
        controller.begin(rows, tuple(latents.shape[2:]))
        callback = controller.step_end
        if start:  # count the steps of the full schedule
            controller.cur_step = start

            def callback(i, t, z):
                return controller.step_end(i + start, t, z)

    ctx = controlled_attention(unet, controller) if controller is not None else nullcontext()
    common = dict(
        cond=cond,
        schedule=schedule,
        guidance_scale=guidance_scale,
        uncond=nulls,
        callback=callback,
        progress=progress,
    )
    with ctx:
        if result.coupled_latent_T is not None:  # x_T and y_T in their own (float32+) precision
            x, y = (
                v.to(dev).expand(rows, -1, -1, -1)
                for v in (result.latent_T, result.coupled_latent_T)
            )
            x0, _ = edict_sample(unet, x, y, edict=result.method_settings, **common)
            return x0
        step = None
        if result.source_corrections is not None:
            step = corrected_step(list(result.source_corrections))
        elif result.noise_maps is not None:
            step = noise_map_step(list(result.noise_maps), result.method_settings.eta)
        out = sample(
            unet, latents, cond_offsets=result.cond_offsets_per_step(), step=step, **common
        )
    return out.latents

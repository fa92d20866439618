"""EDICT (Wallace et al., CVPR 2023, "EDICT: Exact Diffusion Inversion via Coupled
Transformations"): two coupled latents (x, y) whose DDIM steps can be undone exactly.

A DDIM step is affine in the latent, ``DDIM_step(z, ε) = a_t z + b_t ε`` with
``a_t = sqrt(ᾱ_{t-1} / ᾱ_t)`` and ``b_t = sqrt(1 - ᾱ_{t-1}) - sqrt(ᾱ_{t-1} (1 - ᾱ_t) / ᾱ_t)``
(:func:`~nti_utils.ddim.ddim_step`), but its ε is evaluated at the latent it updates, so it cannot
be inverted without approximating ε(z_t) by ε(z_{t-1}). EDICT updates each latent with ε of the
*other* (EDICT eq. 14), for sampling step i from t to t-1:

    x_inter = a_t x_t + b_t ε̃(y_t, t)
    y_inter = a_t y_t + b_t ε̃(x_inter, t)
    x_{t-1} = p x_inter + (1 - p) y_inter
    y_{t-1} = p y_inter + (1 - p) x_{t-1}

with guided ε̃ and the mixing p (0.93): each line can be solved for its left-hand input given the
other latent, so inversion runs them backwards exactly (EDICT eq. 15), starting from
x_0 = y_0 = z_0. With ``leapfrog`` (the official code's default) the roles of x and y swap on odd
steps. The mixing keeps x and y close; the inverse mixing divides by p at every step, so the latents
are kept in float64 (float32 on MPS, which has no float64) and only the UNet's inputs are cast. The
result keeps x_T and y_T in float32 or wider, also for a half-precision UNet: rounded to float16
or bfloat16 they would no longer sample back to z_0 (the sampler amplifies their rounding: up to
0.26 on unit-sized latents with the tiny SD 2-shaped test pipeline in bfloat16, 6 steps, w = 7.5);
kept, they sample back to z_0 within the UNet dtype's rounding.

Editing (:func:`edict_sample` with a controller, through :func:`~nti_utils.editing.edit`) runs
source and targets in one batch through both sequences: each step makes two UNet calls (on y_t,
then on x_inter; on x_t, then on y_inter after a leapfrog swap), both at the same step index of the
Prompt-to-Prompt controller, which therefore edits and records the attention of both. The step
callback (a :class:`~nti_utils.local_blend.LocalBlend`) runs once per step, after the mixing, on the
pair joined along channels, ``[x; y]`` of shape (P, 2C, h, w): its mask (per row and pixel) is
computed once and blends both latents alike, so that x and y of a target stay coupled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm

from nti_utils.ddim import (
    DDIMSchedule,
    StepCallback,
    ddim_inverse_step,
    ddim_step,
    guided_noise,
)
from nti_utils.images import ImageLike
from nti_utils.inputs import encode_inputs, package
from nti_utils.result import InversionResult, InversionSettings, check_fields, is_finite_real

METHOD = "edict"


@dataclass(frozen=True)
class EDICTSettings:
    """EDICT's own settings (checked when made: `ValueError`).

    Attributes:
        mix (`float`, defaults to 0.93): the mixing p, in (0, 1]; the paper's 0.93. Smaller p
            couples x and y more tightly but amplifies rounding errors more in the inversion (it
            divides by p twice per step); p = 1 does not mix (still exact, less stable).
        leapfrog (`bool`, defaults to `True`): swap the roles of x and y on odd sampling steps, as
            the official code does.
    """

    mix: float = 0.93
    leapfrog: bool = True

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "mix": (is_finite_real(self.mix) and 0 < self.mix <= 1, "a number in (0, 1]"),
                "leapfrog": (isinstance(self.leapfrog, bool), "True or False"),
            },
        )


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _order(i: int, leapfrog: bool) -> tuple[int, int]:
    """(first, second): which of (x, y) = (0, 1) sampling step i updates first."""
    return (1, 0) if leapfrog and i % 2 == 1 else (0, 1)


class _Noise:
    """ε̃(z, t) for one run: the UNet on `z` cast to its dtype, the output in the state's dtype."""

    def __init__(self, unet, cond, schedule, guidance_scale, uncond):
        self.unet, self.cond, self.schedule = unet, cond, schedule
        self.w, self.uncond, self.calls = guidance_scale, uncond, 0

    def __call__(self, z: torch.Tensor, i: int) -> torch.Tensor:
        t = self.schedule.timesteps[i]
        null = None if self.uncond is None else self.uncond[i]
        zu = z.to(self.unet.dtype)
        eps = guided_noise(self.unet, zu, t, self.cond, null, self.w, self.schedule)
        self.calls += z.shape[0] * (1 if self.w == 1.0 else 2)
        return eps.to(z.dtype)


@torch.no_grad()
def edict_sample(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cond: torch.Tensor,
    schedule: DDIMSchedule,
    guidance_scale: float,
    uncond: list[torch.Tensor] | None,
    edict: EDICTSettings = EDICTSettings(),
    callback: StepCallback | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDICT's coupled denoising sampler (EDICT eq. 14, see the module docstring).

    Args:
        unet (`UNet2DConditionModel`): the noise predictor ε.
        x, y (`torch.Tensor`): x_T and y_T, (B, C, h, w).
        cond (`torch.Tensor`): C per row, (B, L, D).
        schedule (`DDIMSchedule`): timesteps and ᾱ.
        guidance_scale (`float`): w.
        uncond (list of `torch.Tensor`, *optional*): ∅_t per step, each (1 or B, L, D); unused
            at w = 1.
        edict (`EDICTSettings`): p and the leapfrog swap.
        callback (`StepCallback`, *optional*): ``callback(i, t, [x; y])`` once per step after the
            mixing, with x and y joined along channels, (B, 2C, h, w); a returned tensor of that
            shape replaces both (a LocalBlend's mask then blends x and y alike).
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: x_0 and y_0, (B, C, h, w), in the UNet's dtype.

    Raises:
        ValueError: w != 1 without `uncond`.
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs the null embeddings `uncond`")
    dtype, p = _state_dtype(x.device), edict.mix
    noise = _Noise(unet, cond, schedule, guidance_scale, uncond)
    pair = [x.to(dtype), y.to(dtype)]
    channels = x.shape[1]
    for i in tqdm(range(len(schedule)), desc="EDICT sampling", disable=not progress):
        a, b = _order(i, edict.leapfrog)
        alphas = schedule.alphas(i)
        pair[a] = ddim_step(pair[a], noise(pair[b], i), *alphas)
        pair[b] = ddim_step(pair[b], noise(pair[a], i), *alphas)
        x = p * pair[0] + (1 - p) * pair[1]
        pair = [x, p * pair[1] + (1 - p) * x]
        if callback is not None:
            replaced = callback(i, int(schedule.timesteps[i]), torch.cat(pair, dim=1))
            if replaced is not None:
                pair = list(replaced.to(dtype).split(channels, dim=1))
    return pair[0].to(unet.dtype), pair[1].to(unet.dtype)


@torch.no_grad()
def edict_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    edict: EDICTSettings = EDICTSettings(),
    progress: bool = True,
) -> InversionResult:
    """EDICT inversion of one image (method ``"edict"``): EDICT eq. 15, the sampler's steps undone
    in reverse order from x_0 = y_0 = z_0, with the source prompt at w = `settings.guidance_scale`
    and ∅ = encoder(""). Sampling at that w from (x_T, y_T) gives z_0 back to float rounding.

    For sampling step i (t = timesteps[i]), last step first:

        y_inter = (y_{t-1} - (1 - p) x_{t-1}) / p
        x_inter = (x_{t-1} - (1 - p) y_inter) / p
        y_t = (y_inter - b_t ε̃(x_inter, t)) / a_t
        x_t = (x_inter - b_t ε̃(y_t, t)) / a_t

    (x and y swapped on the leapfrog steps), each ``(z - b_t ε) / a_t`` being
    :func:`~nti_utils.ddim.ddim_inverse_step`.

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P.
        settings (`InversionSettings`): `num_steps` N and `guidance_scale` w are used.
        edict (`EDICTSettings`): p and the leapfrog swap.
        progress (`bool`, defaults to `True`): show tqdm bars.

    Returns:
        :class:`~nti_utils.result.InversionResult`: `latent_T` x_T, `coupled_latent_T` y_T (both
        (1, C, h, w), in float32, or the UNet's dtype where that is wider: see the module
        docstring), ∅ = encoder("") at every step, `method_settings` the `edict`, `unet_calls`
        (two guided evaluations per step: 2N rows at w = 1, 4N otherwise).
    """
    s = InversionSettings.check(settings)
    if not isinstance(edict, EDICTSettings):
        raise TypeError(f"edict must be an EDICTSettings, got {type(edict).__name__}")
    prep = encode_inputs(pipe, image, prompt, s)
    schedule, p = prep.schedule, edict.mix
    noise = _Noise(pipe.unet, prep.cond, schedule, s.guidance_scale, [prep.null] * len(schedule))
    z0 = prep.pivots[0].to(_state_dtype(prep.pivots[0].device))
    pair = [z0, z0.clone()]
    t0 = time.perf_counter()
    n = len(schedule)
    for i in tqdm(reversed(range(n)), total=n, desc="EDICT inversion", disable=not progress):
        y = (pair[1] - (1 - p) * pair[0]) / p
        pair = [(pair[0] - (1 - p) * y) / p, y]
        a, b = _order(i, edict.leapfrog)
        alpha_t, alpha_prev = schedule.alphas(i)
        pair[b] = ddim_inverse_step(pair[b], noise(pair[a], i), alpha_prev, alpha_t)
        pair[a] = ddim_inverse_step(pair[a], noise(pair[b], i), alpha_prev, alpha_t)
    prep.timings["edict_inversion"] = time.perf_counter() - t0
    dtype = torch.promote_types(pipe.unet.dtype, torch.float32)
    return package(
        pipe,
        prep,
        prompt,
        METHOD,
        s,
        pair[0].to(dtype),
        coupled_latent_T=pair[1].to(dtype),
        method_settings=edict,
        unet_calls={"forward": noise.calls, "backward": 0},
    )

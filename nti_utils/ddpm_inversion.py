"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024, "An
Edit Friendly DDPM Noise Space: Inversion and Manipulations"): the noise maps of a stochastic
(η = 1) sampler that reproduce the image exactly.

The DDPM sampler on the DDIM-subsampled timesteps (DDIM eq. 12 with σ_t(η), η = 1) takes, for
sampling step i from t to t-1,

    x_{t-1} = μ_t(x_t) + σ_t z_t,   μ_t(x_t) = sqrt(ᾱ_{t-1}) x0(x_t, ε̃) + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̃

(:func:`~nti_utils.ddim.stochastic_step`, σ_t from :func:`~nti_utils.ddim.ddim_sigma`), with fresh
Gaussian noise z_t. Edit-friendly inversion instead draws every x_t *independently* from z_0,

    x_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε_t,   ε_t ~ N(0, I) independent per t     (paper eq. 6)

and solves each step for its noise, ``z_t = (x_{t-1} - μ_t(x_t)) / σ_t`` (paper eq. 5), from the
noisiest step down. As the official code does, the x_{t-1} the next step starts from is the one the
sampler will compute, μ_t(x_t) + σ_t z_t, so that sampling from x_T with these maps retraces the
chain to float rounding and ends at z_0 (:func:`noise_map_step`; the official code sets the last
map to zero, which leaves the last step σ_1 z_1 short of z_0: here it is kept). A step with σ_t = 0
(ᾱ_{t-1} = 1, the last step of a scheduler with ``set_alpha_to_one=True``; not SD's) is
deterministic: its map is 0 and it ends at the step's mean, not exactly at z_0. The maps are not Gaussian
white noise: they carry the image's structure, which is why editing works by keeping them and
changing the prompt (with or without Prompt-to-Prompt: every row of an edit batch takes the same
z_t). ``skip`` starts the sampler at step ``skip`` (the paper's T_skip: the noisiest steps, which
decide the layout, are not re-sampled).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from nti_utils.ddim import StepRule, ddim_sigma, guided_noise, stochastic_step
from nti_utils.images import ImageLike
from nti_utils.inputs import encode_inputs, package
from nti_utils.result import (
    InversionResult,
    InversionSettings,
    check_fields,
    is_finite_real,
    is_int,
)

METHOD = "ddpm"


@dataclass(frozen=True)
class DDPMInversionSettings:
    """Edit-friendly DDPM inversion's own settings (checked when made: `ValueError`).

    Attributes:
        eta (`float`, defaults to 1.0): η of σ_t(η), in (0, 1]; 1 is DDPM (the paper's).
        skip (`int`, defaults to 0): sampling steps skipped at the start (the paper's T_skip,
            e.g. 36 of 100 for its edits); reconstruction and editing start from x_t at step
            ``skip``. Must be below the inversion's step count.
    """

    eta: float = 1.0
    skip: int = 0

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "eta": (is_finite_real(self.eta) and 0 < self.eta <= 1, "a number in (0, 1]"),
                "skip": (is_int(self.skip) and self.skip >= 0, "an integer >= 0"),
            },
        )


def noised_latents(
    z0: torch.Tensor,
    alphas: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """x_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε_t with an independent ε_t per entry of `alphas`.

    Args:
        z0 (`torch.Tensor`): clean latents, (1, C, h, w).
        alphas (sequence of `torch.Tensor`): ᾱ_t of each latent to draw.
        generator (`torch.Generator`, *optional*): the noise is drawn on its device (the CPU
            without one, so a seed gives the same maps on every device), then moved to z_0's.

    Returns:
        `list[torch.Tensor]`: one x_t per entry of `alphas`, each (1, C, h, w).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = []
    for a in alphas:
        eps = torch.randn(z0.shape, generator=generator, device=gen_device, dtype=torch.float32)
        a = a.to(z0.device, z0.dtype)
        out.append(a.sqrt() * z0 + (1 - a).sqrt() * eps.to(z0.device, z0.dtype))
    return out


@torch.no_grad()
def ddpm_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    ddpm: DDPMInversionSettings = DDPMInversionSettings(),
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> InversionResult:
    """Edit-friendly DDPM inversion of one image (method ``"ddpm"``, see the module docstring),
    with the source prompt at w = `settings.guidance_scale` and ∅ = encoder("").

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P.
        settings (`InversionSettings`): `num_steps` N and `guidance_scale` w are used.
        ddpm (`DDPMInversionSettings`): η and the skipped steps.
        progress (`bool`, defaults to `True`): show tqdm bars.
        generator (`torch.Generator`, *optional*): the noise of the independent x_t
            (:func:`noised_latents`).

    Returns:
        :class:`~nti_utils.result.InversionResult`: `latent_T` x_t at the first step that runs
        (step ``skip``), `noise_maps` z_t of the N - skip steps that run, (N - skip, 1, C, h, w) in
        sampling order, ∅ = encoder("") at every step, `method_settings` the `ddpm`, `step_errors`
        the mean z_t² per step (1 for white noise), `unet_calls` (one guided evaluation per step
        that runs).

    Raises:
        ValueError: ``ddpm.skip`` is not below N.
    """
    s = InversionSettings.check(settings)
    if not isinstance(ddpm, DDPMInversionSettings):
        raise TypeError(f"ddpm must be a DDPMInversionSettings, got {type(ddpm).__name__}")
    if ddpm.skip >= s.num_steps:
        raise ValueError(
            f"DDPMInversionSettings.skip={ddpm.skip} must be below the {s.num_steps} steps "
            "(at least one step must run)"
        )
    prep = encode_inputs(pipe, image, prompt, s)
    schedule, z0, w, n = prep.schedule, prep.pivots[0], s.guidance_scale, len(prep.schedule)
    t0 = time.perf_counter()
    steps = range(ddpm.skip, n)
    xs = noised_latents(z0, [schedule.alphas(i)[0] for i in steps], generator)
    prep.timings["noising"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    x, maps = xs[0], []
    for k, i in enumerate(tqdm(steps, desc="DDPM inversion", disable=not progress)):
        alpha_t, alpha_prev = schedule.alphas(i)
        sigma = ddim_sigma(alpha_t, alpha_prev, ddpm.eta)
        eps = guided_noise(pipe.unet, x, schedule.timesteps[i], prep.cond, prep.null, w, schedule)
        mean = stochastic_step(x, eps, alpha_t, alpha_prev, sigma)
        target = xs[k + 1] if k + 1 < len(xs) else z0
        z = (target - mean) / sigma if sigma > 0 else torch.zeros_like(mean)
        maps.append(z)
        x = stochastic_step(x, eps, alpha_t, alpha_prev, sigma, z)  # what the sampler will take
    prep.timings["noise_maps"] = time.perf_counter() - t0
    return package(
        pipe,
        prep,
        prompt,
        METHOD,
        s,
        xs[0],
        noise_maps=torch.stack(maps),
        method_settings=ddpm,
        step_errors=[z.float().pow(2).mean().item() for z in maps],
        unet_calls={"forward": len(steps) * (1 if w == 1.0 else 2), "backward": 0},
    )


def noise_map_step(noise_maps: Sequence[torch.Tensor], eta: float) -> StepRule:
    """The sampler's step for edit-friendly DDPM inversion: ``x_{t-1} = μ_t(x_t) + σ_t z_t`` with
    the i-th noise map for every row of the batch (source and targets alike).

    Args:
        noise_maps (sequence of `torch.Tensor`): z_t per step that runs, each (1, C, h, w).
        eta (`float`): η of σ_t(η).

    Returns:
        `StepRule` for :func:`~nti_utils.ddim.sample`'s `step` (over the steps that run).
    """

    def step(i, x_t, eps, alpha_t, alpha_prev):
        sigma = ddim_sigma(alpha_t, alpha_prev, eta)
        return stochastic_step(x_t, eps, alpha_t, alpha_prev, sigma, noise_maps[i].to(x_t))

    return step

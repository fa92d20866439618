"""Fixed-point inversion, as in ReNoise (Garibi et al., ECCV 2024, "ReNoise: Real Image Inversion
Through Iterative Noising"): solve each DDIM inversion step's implicit equation by iterating it.

The sampler's step z_{t-1} = DDIM_step(z_t, ε̃(z_t, t)) is exactly undone by the z_t that solves

    z_t = InvStep(z_{t-1}, ε̃(z_t, t))

(InvStep: :func:`~nti_utils.ddim.ddim_inverse_step`). Plain DDIM inversion approximates ε̃(z_t, t)
by ε̃(z_{t-1}, t); the fixed-point iteration refines that estimate K times, for sampling step i
(t = timesteps[i]), first step t = 1:

    z_t^(0)   = InvStep(z_{t-1}, ε̃(z_{t-1}, t))            (DDIM inversion)
    z_t^(k+1) = InvStep(z_{t-1}, ε̃(z_t^(k), t)),  k = 0..K-1

and z_t is z_t^(K), or with ``average_last`` = m > 1 the mean of the last m estimates
z_t^(K-m+1)..z_t^(K) (InvStep is affine in ε, so that is InvStep with the mean of their ε̃, ReNoise's
averaging). The ε̃ are guided with the source prompt at w = `settings.guidance_scale` and
∅ = encoder(""), so that DDIM sampling at that w (:func:`~nti_utils.inversion.reconstruct`) retraces
the trajectory where the iteration converged: inversion *under guidance*, where plain DDIM inversion
is poor. Each iteration costs one guided UNet evaluation; nothing is optimized.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from nti_utils.ddim import ddim_inverse_step, guided_noise
from nti_utils.images import ImageLike
from nti_utils.inputs import encode_inputs, package
from nti_utils.result import InversionResult, InversionSettings, check_fields, is_int

METHOD = "fixed-point"


@dataclass(frozen=True)
class FixedPointSettings:
    """The fixed-point inversion's own settings (checked when made: `ValueError`).

    Attributes:
        iterations (`int`, defaults to 3): K, fixed-point iterations per step (>= 0; 0 is DDIM
            inversion at the settings' w).
        average_last (`int`, defaults to 1): m, how many of the last estimates z_t^(K-m+1..K) are
            averaged, 1 <= m <= K + 1 (1: the last estimate alone).
    """

    iterations: int = 3
    average_last: int = 1

    def __post_init__(self) -> None:
        k, m = self.iterations, self.average_last
        check_fields(self, {"iterations": (is_int(k) and k >= 0, "an integer >= 0")})
        # only once K is known to be an integer: the bound below needs it
        allowed = f"an integer in [1, iterations + 1 = {k + 1}]"
        check_fields(self, {"average_last": (is_int(m) and 1 <= m <= k + 1, allowed)})


def fixed_point_step(
    z_prev: torch.Tensor,
    eps_at: Callable[[torch.Tensor], torch.Tensor],
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    fixed_point: FixedPointSettings,
) -> tuple[torch.Tensor, list[float]]:
    """One inversion step from level t-1 to t by fixed-point iteration (see the module docstring).

    Args:
        z_prev (`torch.Tensor`): z_{t-1}, (B, C, h, w).
        eps_at (`Callable`): ``eps_at(z)`` is ε̃(z, t), the guided noise prediction at timestep t.
        alpha_t, alpha_prev (`torch.Tensor`): ᾱ_t and ᾱ_{t-1}.
        fixed_point (`FixedPointSettings`): K and the averaging m.

    Returns:
        `tuple[torch.Tensor, list[float]]`: z_t (B, C, h, w), and the K residuals
        mean((z_t^(k+1) - z_t^(k))²).
    """
    used = [eps_at(z_prev)]  # ε̃ of z_t^(0), z_t^(1), ...: z_t^(k) = InvStep(z_{t-1}, used[k])
    z = ddim_inverse_step(z_prev, used[0], alpha_prev, alpha_t)
    residuals = []
    for _ in range(fixed_point.iterations):
        used.append(eps_at(z))
        z_next = ddim_inverse_step(z_prev, used[-1], alpha_prev, alpha_t)
        residuals.append((z_next.float() - z.float()).pow(2).mean().item())
        z = z_next
    m = fixed_point.average_last
    if m > 1:
        z = ddim_inverse_step(z_prev, torch.stack(used[-m:]).mean(0), alpha_prev, alpha_t)
    return z, residuals


@torch.no_grad()
def fixed_point_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    fixed_point: FixedPointSettings = FixedPointSettings(),
    progress: bool = True,
) -> InversionResult:
    """Fixed-point (ReNoise) inversion of one image (method ``"fixed-point"``, see the module
    docstring).

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P.
        settings (`InversionSettings`): `num_steps` N and `guidance_scale` w (of the inversion and
            of the sampler that reconstructs it) are used.
        fixed_point (`FixedPointSettings`): K and the averaging.
        progress (`bool`, defaults to `True`): show tqdm bars.

    Returns:
        :class:`~nti_utils.result.InversionResult` with z̄_T = z_T of the fixed-point trajectory,
        ∅ = encoder("") at every step (so it reconstructs and edits as DDIM sampling does),
        `method_settings` the `fixed_point`, `losses[i]` the residuals mean((z_t^(k+1) -
        z_t^(k))²) of step i's K iterations (in sampling order; they shrink where the iteration
        converges), `pivots` the trajectory z_0..z_N and `unet_calls` ((K + 1) guided evaluations
        per step).
    """
    s = InversionSettings.check(settings)
    if not isinstance(fixed_point, FixedPointSettings):
        raise TypeError(
            f"fixed_point must be a FixedPointSettings, got {type(fixed_point).__name__}"
        )
    prep = encode_inputs(pipe, image, prompt, s)
    schedule, w, n = prep.schedule, s.guidance_scale, len(prep.schedule)
    traj, residuals = [prep.pivots[0]], []
    t0 = time.perf_counter()
    for i in tqdm(reversed(range(n)), total=n, desc="fixed-point inversion", disable=not progress):
        eps_at = partial(
            guided_noise,
            pipe.unet,
            t=schedule.timesteps[i],
            cond=prep.cond,
            null=prep.null,
            guidance_scale=w,
            schedule=schedule,
        )
        z, res = fixed_point_step(traj[-1], eps_at, *schedule.alphas(i), fixed_point)
        traj.append(z)
        residuals.append(res)
    prep.timings["fixed_point_inversion"] = time.perf_counter() - t0
    calls = n * (fixed_point.iterations + 1) * (1 if w == 1.0 else 2)
    return package(
        pipe,
        prep,
        prompt,
        METHOD,
        s,
        traj[-1],
        method_settings=fixed_point,
        losses=residuals[::-1],
        pivots=traj,
        unet_calls={"forward": calls, "backward": 0},
    )

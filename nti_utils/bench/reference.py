"""The benchmark's yardstick: a deliberately faithful copy of the original notebook's null-text loop.

google/prompt-to-prompt's ``null_text_w_ptp.ipynb`` is how most people first ran Null-text
Inversion; the benchmark measures the library against it, so it is kept here as it was written,
including what the library does differently on purpose: the UNet's weights keep ``requires_grad``
(weight gradients are computed and thrown away), every timestep makes at least one update (the
early-stop test runs after the update), and z̄ advances with one more batched [∅_t; C] call. It is
not a second implementation of the method for use: the library's is
:func:`nti_utils.inversion.null_text_inversion`.
"""

from __future__ import annotations

import torch

from nti_utils.ddim import DDIMSchedule, ddim_step, guide, invert, predict_noise
from nti_utils.images import image_to_latents
from nti_utils.models import embed_prompts
from nti_utils.result import InversionResult, InversionSettings


def reference_null_text_inversion(
    pipe, image, prompt: str, settings: InversionSettings = InversionSettings()
) -> InversionResult:
    """Null-text inversion written as plainly as the original code.

    Per timestep: ε(z̄_t, t, C) once without gradients; then up to ``inner_steps`` times one
    ε(z̄_t, t, ∅_t) call, a backward pass (weight gradients too, as in the original), an Adam step,
    and only then the early-stop test ``loss < epsilon + i · epsilon_growth`` on the loss measured
    before that step; finally one batched [∅_t; C] call to advance z̄. The weight gradients the
    original leaves behind are cleared at the end so that later runs start clean. Only the paper's
    settings are read (`update_rule`, `step_scale` and the ablation switches are not).

    Returns:
        :class:`~nti_utils.result.InversionResult` with method ``"null-text-reference"``.
    """
    s, unet = settings, pipe.unet
    z0 = image_to_latents(pipe, image).to(unet.device, unet.dtype)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, s.num_steps)
    cond, null = embed_prompts(pipe, [prompt, ""]).chunk(2)
    pivots = invert(unet, z0, cond, schedule, progress=False)
    n, latent, uncond = len(schedule), pivots[-1], null
    nulls, counts = [], []
    for i in range(n):
        t = schedule.timesteps[i]
        alpha_t, alpha_prev = schedule.alphas(i)
        target = pivots[n - 1 - i]
        uncond = uncond.detach().float().clone().requires_grad_(True)  # float32 leaf (fp16 Adam
        # underflows); the original ran in float32, where this changes nothing
        opt = torch.optim.Adam([uncond], lr=s.lr * (1.0 - i / 100.0))
        with torch.no_grad():
            eps_c = predict_noise(unet, latent, t, cond, schedule)
        done = 0
        for _ in range(s.inner_steps):
            eps_u = predict_noise(unet, latent, t, uncond.to(unet.dtype), schedule)
            z_prev = ddim_step(latent, guide(eps_u, eps_c, s.guidance_scale), alpha_t, alpha_prev)
            loss = torch.nn.functional.mse_loss(z_prev, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if loss.item() < s.epsilon + i * s.epsilon_growth:
                break
        counts.append(done)
        nulls.append(uncond.detach().to(unet.dtype))
        with torch.no_grad():
            both = torch.cat([uncond.to(cond.dtype), cond])
            eps_u, eps_c = predict_noise(unet, torch.cat([latent] * 2), t, both, schedule).chunk(2)
            latent = ddim_step(latent, guide(eps_u, eps_c, s.guidance_scale), alpha_t, alpha_prev)
    for p in unet.parameters():
        p.grad = None
    return InversionResult.for_pipeline(
        pipe,
        latent_T=pivots[-1],
        null_embeddings=torch.stack(nulls),
        prompt=prompt,
        method="null-text-reference",
        settings=s,
        inner_steps=counts,
    )

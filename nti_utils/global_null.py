"""The paper's global null-text ablation (Mokady et al. 2023, Appendix D, Algorithm 2): one null
embedding ∅ shared by all timesteps, optimized over many passes along the trajectory.

Algorithm 1 gives every timestep its own ∅_t, optimized once, in one sweep from t = T to 1. The
ablation asks whether a single ∅ can do the same job. It can, the paper reports, but slowly: an
accurate reconstruction after about 7,500 optimization steps (150 passes over 50 timesteps), against
a few hundred for Algorithm 1. Each pass here:

1. z̄_T = z*_T;
2. for t = T..1: ε̃ = ε(z̄_t, t, ∅) + w·(ε(z̄_t, t, C) - ε(z̄_t, t, ∅)),
   z̄_{t-1} = DDIM_step(z̄_t, ε̃), one Adam update of ∅ on ‖z*_{t-1} - z̄_{t-1}‖², then z̄ moves on
   from z̄_{t-1} (detached: no gradient through the trajectory).

One optimization step is one such update. The paper does not give this loop's learning rate or
schedule; we use Adam with the settings' `lr`, constant, and no early stop (documented choices).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from nti_utils.ddim import ddim_step, guide, predict_noise
from nti_utils.images import ImageLike
from nti_utils.models import frozen
from nti_utils.pivots import prepare, single
from nti_utils.result import InversionResult, InversionSettings

PAPER_STEPS = 7_500
"""Optimization steps after which the paper reports an accurate reconstruction with one ∅."""


def global_null_text_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    passes: int = PAPER_STEPS // 50,
    on_pass: Callable[[int, InversionResult], None] | None = None,
    progress: bool = True,
) -> InversionResult:
    """Algorithm 2 of the paper's appendix: one ∅ for every timestep, `passes` passes of updates.

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): the image, or its latents z_0 (1, C, h, w).
        prompt (`str`): the source prompt P.
        settings (`InversionSettings`): N, w and Adam's learning rate `lr` are read (the others
            belong to Algorithm 1).
        passes (`int`, defaults to 150): passes over the N timesteps; ``passes * N`` optimization
            steps (7,500 for N = 50, the paper's figure).
        on_pass (`Callable`, *optional*): ``on_pass(k, result)`` after pass k (1-based) with the
            result so far (∅ as it is now at every step): to follow reconstruction against
            optimization steps.
        progress (`bool`, defaults to `True`): show a tqdm bar over passes.

    Returns:
        :class:`~nti_utils.result.InversionResult` with method ``"global-null"``: the same ∅ at
        every step; `losses[i]` holds step i's loss in each pass (before that pass's update of ∅
        there) and `inner_steps[i]` the updates made at step i (one per pass).
    """
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
    s, unet = InversionSettings.check(settings), pipe.unet
    prep = prepare(pipe, single(image), [prompt], s, progress=False)
    schedule, pivots, cond = prep.schedule, prep.pivots, prep.cond
    n = len(schedule)
    null = prep.null.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([null], lr=s.lr)
    losses, calls = [], {"forward": 0, "backward": 0}
    t0 = time.perf_counter()

    def result() -> InversionResult:
        emb = null.detach().to(unet.dtype).expand(n, -1, -1).unsqueeze(1).contiguous()
        timings = dict(prep.timings, optimization=time.perf_counter() - t0)
        return InversionResult.for_pipeline(
            pipe,
            latent_T=pivots[-1].detach(),
            null_embeddings=emb,
            prompt=prompt,
            method="global-null",
            settings=s,
            losses=[[row[i] for row in losses] for i in range(n)] if losses else [],
            inner_steps=[len(losses)] * n if losses else [],
            timings=timings,
            pivots=pivots,
            unet_calls=dict(calls),
        )

    with frozen(unet):
        for k in tqdm(range(passes), desc="global null (Alg. 2)", disable=not progress):
            latent, row = pivots[-1], []
            for i in range(n):
                t = schedule.timesteps[i]
                with torch.no_grad():
                    eps_c = predict_noise(unet, latent, t, cond, schedule, torch.float32)
                eps_u = predict_noise(unet, latent, t, null.to(unet.dtype), schedule, torch.float32)
                z_prev = ddim_step(
                    latent, guide(eps_u, eps_c, s.guidance_scale), *schedule.alphas(i)
                )
                loss = (z_prev.float() - pivots[n - 1 - i].float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                calls["forward"] += 2
                calls["backward"] += 1
                row.append(loss.item())
                latent = z_prev.detach().to(pivots[-1].dtype)
            losses.append(row)
            if on_pass is not None:
                on_pass(k + 1, result())
    return result()

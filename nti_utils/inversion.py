"""Null-text inversion (Mokady et al. 2023, Algorithm 1), its baselines (plain DDIM inversion,
negative-prompt inversion of Miyake et al. 2023), and reconstruction.

Each function returns an :class:`~nti_utils.result.InversionResult`: the starting latent z̄_T and one
null embedding ∅_t per sampling step, so that ``reconstruct(pipe, result)`` (or a Prompt-to-Prompt
edit) re-samples the image with guidance w using ∅_t at step t.

Null-text inversion is written once, for a batch of B images in lockstep
(:func:`batched_null_text_inversion`); :func:`null_text_inversion` is that core with one image.
Algorithm 1 is sequential over timesteps but independent across images, and a small UNet at batch 1
is bound by per-call overhead, so B images cost far less than B separate runs. In both:

1. pivots: DDIM inversion at w = 1 gives z*_0..z*_N (all images in one batched loop);
2. for t = T..1, ε(z̄_t, t, C) once per step for all rows, then up to ``max_updates`` Adam updates of
   ∅_t (one leaf and one Adam state per image, learning rate :func:`lr_at`, ``lr · (1 - i/100)`` up to
   100 steps), minimizing
   ``‖z*_{t-1} - DDIM_step(z̄_t, ε̃(∅_t))‖²`` with ε̃ = ε(∅_t) + w·(ε(C) - ε(∅_t)); each image leaves
   the batch when its loss is under ``epsilon + i · epsilon_growth`` (at w = 1, where ∅ has no
   weight in ε̃, no update is made);
3. z̄_{t-1} = DDIM_step(z̄_t, ε̃(∅_t)) with the final ∅_t, and ∅_{t-1} starts from ∅_t.

The UNet's weights are frozen during the optimization (gradients flow to ∅_t only), and the
optimized embeddings are float32 leaves whatever the UNet's dtype (cast inside each forward), so
half-precision weights do not turn Adam's small updates into zeros or NaNs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nti_utils.caption import Captioner, source_prompt
from nti_utils.ddim import DDIMSchedule, ddim_step, guide, predict_noise
from nti_utils.images import ImageLike
from nti_utils.models import Pipeline, embed_prompts, frozen
from nti_utils.pivots import Prepared, prepare, single
from nti_utils.resample import resample
from nti_utils.result import InversionResult, InversionSettings, check_compatible

_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _baseline(pipe, image, prompt, settings, progress, method: str, captioner) -> InversionResult:
    prompt, source = source_prompt(image, prompt, captioner, pipe.device)
    prep = prepare(pipe, single(image), [prompt], InversionSettings.check(settings), progress)
    null = prep.cond if method == "negative-prompt" else prep.null
    return InversionResult.for_pipeline(
        pipe,
        latent_T=prep.pivots[-1].detach(),
        null_embeddings=torch.stack([null.detach()] * len(prep.schedule)),
        prompt=prompt,
        prompt_source=source,
        method=method,
        settings=settings,
        timings=prep.timings,
        pivots=prep.pivots,
    )


def ddim_inversion(
    pipe: Pipeline,
    image: ImageLike | torch.Tensor,
    prompt: str | None = None,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
    captioner: str | Captioner = "toy",
) -> InversionResult:
    """Plain DDIM inversion at w = 1, packaged with ∅ = encoder("") at every step (method
    ``"ddim"``): reconstructing it at w = `settings.guidance_scale` shows how guidance amplifies the
    inversion error. Without a `prompt` the image is captioned (as in :func:`null_text_inversion`)."""
    return _baseline(pipe, image, prompt, settings, progress, "ddim", captioner)


def negative_prompt_inversion(
    pipe: Pipeline,
    image: ImageLike | torch.Tensor,
    prompt: str | None = None,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
    captioner: str | Captioner = "toy",
) -> InversionResult:
    """Negative-prompt inversion (Miyake et al. 2023, method ``"negative-prompt"``): ∅_t := C at
    every step, no optimization. With ∅_t = C the guidance term vanishes, so sampling retraces the
    w = 1 DDIM trajectory. Without a `prompt` the image is captioned."""
    return _baseline(pipe, image, prompt, settings, progress, "negative-prompt", captioner)


# ------------------------------------------------------------------------------ the one core
@dataclass
class _Step:
    """State of one sampling step of the optimization for B images."""

    latent: torch.Tensor  # z̄_t, (B, C, h, w)
    t: torch.Tensor
    alphas: tuple[torch.Tensor, torch.Tensor]  # ᾱ_t, ᾱ_{t-1}
    schedule: DDIMSchedule  # its prediction type turns the UNet's output into ε
    eps_fixed: torch.Tensor  # ε(z̄_t, t, C), or ε(z̄_t, t, ∅) when C is optimized; float32
    target: torch.Tensor  # z*_{t-1}, float32
    threshold: float
    emb: list[torch.Tensor]  # the optimized embedding per image, (1, L', D) float32 leaves
    z_next: torch.Tensor  # z̄_{t-1} of the rows that are done (check-first rule)
    losses: list[list[float]]
    counts: list[int]


def lr_at(settings: InversionSettings, i: int, n: int) -> float:
    """Adam's learning rate at step index `i` of an `n`-step null-text optimization:
    ``effective_lr * (1 - i / max(100, n))``. Up to 100 steps (the paper's 50 among them) that is
    the official code's ``lr * (1 - i / 100)`` exactly; longer runs stretch the same linear decay
    over their own steps, so it stays > 0 (the official formula reaches 0 at i = 100 and goes
    negative after)."""
    if not 0 <= i < n:
        raise ValueError(f"step index must satisfy 0 <= i < n = {n}, got {i}")
    return settings.effective_lr * (1.0 - i / max(100.0, float(n)))


def _eps(
    unet,
    z: torch.Tensor,
    t: torch.Tensor,
    emb: torch.Tensor,
    max_rows: int | None,
    schedule: DDIMSchedule,
):
    """ε for a batch of rows, in calls of at most `max_rows` rows, as float32 (guidance amplifies
    rounding errors of half-precision outputs by w)."""
    size = max_rows or z.shape[0]
    parts = []
    for k in range(0, z.shape[0], size):
        emb_k = emb[k : k + size].to(unet.dtype)
        parts.append(predict_noise(unet, z[k : k + size], t, emb_k, schedule, torch.float32))
    return torch.cat(parts)


def _guided(st: _Step, eps_var: torch.Tensor, rows: torch.Tensor, s: InversionSettings):
    """ε̃ for `rows`, with the optimized embedding's prediction on the right side of guidance."""
    fixed = st.eps_fixed[rows]
    eps_u, eps_c = (fixed, eps_var) if s.optimize == "cond" else (eps_var, fixed)
    return guide(eps_u, eps_c, s.guidance_scale)


def _evaluate(unet, st: _Step, active: list[int], last: bool, s: InversionSettings, calls):
    """One inner step over the `active` rows, in chunks of `s.max_rows` (each chunk's backward runs
    before the next chunk's forward, so memory is bounded by the chunk). Accumulates the embeddings'
    gradients (the caller steps Adam) and returns the rows that stay active."""
    still = []
    size = s.max_rows or len(active)
    for k in range(0, len(active), size):
        chunk = active[k : k + size]
        idx = torch.tensor(chunk, device=st.latent.device)
        with torch.set_grad_enabled(not last):
            emb = torch.cat([st.emb[b] for b in chunk]).to(unet.dtype)
            eps_var = predict_noise(unet, st.latent[idx], st.t, emb, st.schedule, torch.float32)
            z_prev = ddim_step(st.latent[idx], _guided(st, eps_var, idx, s), *st.alphas)
            loss = (z_prev.float() - st.target[idx]).pow(2).flatten(1).mean(1)
        calls["forward"] += len(chunk)
        values = loss.tolist()
        below = [v < st.threshold for v in values]
        for b, v in zip(chunk, values):
            st.losses[b].append(v)
        if s.update_rule == "check-first":  # rows below the threshold are done: keep z_prev
            update = [] if last else [j for j, ok in enumerate(below) if not ok]
            for j, b in enumerate(chunk):
                if j not in update:
                    st.z_next[b] = z_prev[j].detach()
        else:  # "reference": update every active row, then drop those that were below
            update = list(range(len(chunk)))
        if update:
            loss[update].sum().backward()
            calls["backward"] += len(chunk)  # the backward runs through the whole chunk
            for j, b in enumerate(chunk):
                if j in update:
                    st.counts[b] += 1
                else:
                    st.emb[b].grad = None  # no Adam step for rows that are done
        still += [b for j, b in enumerate(chunk) if j in update and not below[j]]
    return still


def _optimize(unet, prep: Prepared, latent, s: InversionSettings, progress: bool):
    """Steps 2 and 3 of Algorithm 1 for B images in lockstep. Returns per step: the optimized
    embedding of each image (1, L, D), losses, updates and step errors; and the UNet row counts."""
    schedule, pivots = prep.schedule, prep.pivots
    n, batch = len(schedule), prep.cond.shape[0]
    calls = {"forward": 0, "backward": 0}
    if s.optimize == "cond":  # optimize C_b of each image, ∅ fixed
        fixed = prep.null.expand(batch, -1, -1)
        prev = [c.detach().float() for c in prep.cond.split(1)]
    else:  # optimize ∅_t of each image from encoder(""), C fixed
        fixed = prep.cond
        prev = [prep.null.detach().float()] * batch
    # at w = 1, ε̃ = ε(C): ∅'s branch has weight 1 - w = 0, its gradient is exactly zero and no
    # update can move z̄, so none is made (C's branch, optimized with optimize="cond", still can)
    updates = 0 if s.optimize != "cond" and s.guidance_scale == 1 else s.max_updates
    out = {"emb": [], "losses": [], "counts": [], "errors": []}
    for i in tqdm(range(n), desc="null-text optimization", disable=not progress):
        t = schedule.timesteps[i]
        with torch.no_grad():
            eps_fixed = _eps(unet, latent, t, fixed, s.max_rows, schedule)  # once for all rows
        calls["forward"] += batch
        st = _Step(
            latent=latent,
            t=t,
            alphas=schedule.alphas(i),
            schedule=schedule,
            eps_fixed=eps_fixed,
            target=pivots[n - 1 - i].float(),
            threshold=s.epsilon + i * s.epsilon_growth,
            emb=[e.clone().requires_grad_(True) for e in prev],  # ∅_t starts from ∅_{t+1}
            z_next=latent.clone(),
            losses=[[] for _ in range(batch)],
            counts=[0] * batch,
        )
        opt = torch.optim.Adam(st.emb, lr=lr_at(s, i, n))  # per-row state
        active = list(range(batch))
        for k in range(updates + 1):
            last = k == updates
            if not active or (last and s.update_rule == "reference"):
                break
            active = _evaluate(unet, st, active, last, s, calls)
            opt.step()  # rows without a gradient are skipped
            opt.zero_grad(set_to_none=True)
        if s.update_rule == "reference":  # advance z̄ with the final embeddings, all rows
            with torch.no_grad():
                eps_var = _eps(unet, latent, t, torch.cat(st.emb), s.max_rows, schedule)
                rows = torch.arange(batch, device=latent.device)
                st.z_next = ddim_step(latent, _guided(st, eps_var, rows, s), *st.alphas)
            calls["forward"] += batch
        latent = st.z_next.detach().to(pivots[-1].dtype)
        prev = [e.detach() for e in st.emb]
        out["emb"].append(prev)
        out["losses"].append(st.losses)
        out["counts"].append(st.counts)
        out["errors"].append((latent.float() - st.target).pow(2).flatten(1).mean(1).tolist())
    return out, calls


def batched_null_text_inversion(
    pipe: Pipeline,
    images: Sequence[ImageLike] | torch.Tensor,
    prompts: Sequence[str],
    settings: InversionSettings = InversionSettings(),
    start_latents: torch.Tensor | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> list[InversionResult]:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1) of B images at once (see the module
    docstring for the steps).

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): from :func:`~nti_utils.models.load_pipeline`.
        images (sequence of images, or `torch.Tensor`): B images (loaded and resized to the model's
            resolution), or their latents z_0, (B, C, h, w).
        prompts (`Sequence[str]`): the source prompt P of each image.
        settings (`InversionSettings`): the paper's by default; also chooses the update rule, a
            shorter optimizer schedule, a global ∅ (``per_timestep=False``), optimizing C instead
            of ∅ (``optimize="cond"``), rows per UNet call and CUDA autocast.
        start_latents (`torch.Tensor`, *optional*): start from these z̄_T, (B, C, h, w), instead of
            the pivots z*_T; the targets stay the pivots.
        progress (`bool`, defaults to `True`): show tqdm bars.
        generator (`torch.Generator`, *optional*): the noise of ``settings.pivots == "random"``.

    Returns:
        `list[InversionResult]`, one per image, method ``"null-text"`` (``"cond-text"`` when C is
        optimized: ∅ = encoder("") then, and `cond_offsets` holds C_t - C). `losses[i]` holds the
        losses of step i's evaluations, `inner_steps[i]` its Adam updates, `step_errors` the MSE of
        z̄_{t-1} to the pivot. `timings` and `unet_calls` are the whole batch's (see
        :class:`~nti_utils.result.InversionResult`), with ``timings["batch_size"] = B``.
    """
    s, unet = InversionSettings.check(settings), pipe.unet
    if s.autocast is not None and unet.device.type != "cuda":
        raise ValueError(f"autocast={s.autocast!r} needs CUDA, the UNet is on {unet.device}")
    amp = torch.autocast("cuda", _AUTOCAST[s.autocast]) if s.autocast else nullcontext()
    with frozen(unet):
        # pivots in the weights' own precision; autocast only for the optimization
        prep = prepare(pipe, images, prompts, s, progress, generator)
        latent_T = prep.pivots[-1]
        if start_latents is not None:
            if start_latents.shape != latent_T.shape:
                raise ValueError(
                    f"start_latents must be {tuple(latent_T.shape)} like the images' latents, got "
                    f"{tuple(start_latents.shape)}"
                )
            latent_T = start_latents.to(latent_T)
        t0 = time.perf_counter()
        with amp:
            out, calls = _optimize(unet, prep, latent_T, s, progress)
        prep.timings["optimization"] = time.perf_counter() - t0
    n = len(prep.schedule)
    results = []
    for b, prompt in enumerate(prompts):
        emb = torch.stack([step[b] for step in out["emb"]])  # (N, 1, L, D), float32
        if not s.per_timestep:  # a global embedding: the last one, at every step
            emb = emb[-1:].expand(n, -1, -1, -1)
        offsets = None
        if s.optimize == "cond":
            offsets = (emb - prep.cond[b : b + 1].float()).to(unet.dtype).contiguous()
            nulls = prep.null.expand(n, -1, -1).unsqueeze(1)
        else:
            nulls = emb
        result = InversionResult.for_pipeline(
            pipe,
            latent_T=latent_T[b : b + 1].detach(),
            null_embeddings=nulls.to(unet.dtype).contiguous(),
            prompt=prompt,
            method="cond-text" if s.optimize == "cond" else "null-text",
            settings=s,
            losses=[step[b] for step in out["losses"]],
            inner_steps=[step[b] for step in out["counts"]],
            timings=dict(prep.timings),
            pivots=[p[b : b + 1] for p in prep.pivots],
            step_errors=[step[b] for step in out["errors"]],
            unet_calls=dict(calls),
            cond_offsets=offsets,
        )
        results.append(result)
    return results


def null_text_inversion(
    pipe: Pipeline,
    image: ImageLike | torch.Tensor,
    prompt: str | None = None,
    settings: InversionSettings = InversionSettings(),
    start_latent: torch.Tensor | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    captioner: str | Captioner = "toy",
) -> InversionResult:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1) of one image: the core,
    :func:`batched_null_text_inversion`, with a batch of one.

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image (loaded and resized to the model's
            resolution) or its latents z_0, (1, C, h, w).
        prompt (`str`, *optional*): the source prompt P describing the image; if omitted, the
            image is captioned by `captioner` (as the paper suggests) and the result's
            `prompt_source` says so.
        settings (`InversionSettings`): defaults are the paper's (see its fields for the options).
        start_latent (`torch.Tensor`, *optional*): start from this z̄_T, (1, C, h, w), instead of the
            pivot z*_T; the targets stay the pivots.
        progress (`bool`, defaults to `True`): show tqdm bars.
        generator (`torch.Generator`, *optional*): the noise of ``settings.pivots == "random"``.
        captioner (`str` or :class:`~nti_utils.caption.Captioner`, defaults to ``"toy"``): writes
            the prompt when none is given (see :func:`~nti_utils.caption.load_captioner`).

    Returns:
        :class:`~nti_utils.result.InversionResult` with method ``"null-text"`` (``"cond-text"`` with
        ``settings.optimize == "cond"``).

    With the default check-first rule, per timestep the UNet runs once for ε(z̄_t, t, C) and once
    per evaluation for ε(z̄_t, t, ∅_t), with a backward pass to ∅_t per update: when the loss is below
    the threshold, that forward pass already gives z̄_{t-1} and no extra UNet call is needed.
    """
    prompt, source = source_prompt(image, prompt, captioner, pipe.device)
    result = batched_null_text_inversion(
        pipe, single(image), [prompt], settings, start_latent, progress, generator
    )[0]
    return dataclasses.replace(result, prompt_source=source)


def reconstruct(
    pipe: Pipeline,
    result: InversionResult,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Re-sample the inverted image: latents z_0 (1, C, h, w) from z̄_T with ∅_t at step t, with the
    sampler the result's method needs (:func:`~nti_utils.resample.resample`: DDIM, Direct
    Inversion's corrected steps, edit-friendly DDPM's noise maps or EDICT's coupled sampler).

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): the model the image was inverted with (SD
            1.x/2.x or SDXL; checked, :func:`~nti_utils.result.check_compatible`).
        result (`InversionResult`): the inversion.
        guidance_scale (`float`, *optional*): defaults to the result's own w.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `torch.Tensor`: z_0, (1, C, h, w) in the UNet's dtype.
    """
    check_compatible(result, pipe)
    w = result.settings.guidance_scale if guidance_scale is None else guidance_scale
    cond = embed_prompts(pipe, result.prompt)
    return resample(pipe, result, cond, w, progress=progress)

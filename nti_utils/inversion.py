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
   the batch when its loss is under ``epsilon + i · epsilon_growth``;
3. z̄_{t-1} = DDIM_step(z̄_t, ε̃(∅_t)) with the final ∅_t, and ∅_{t-1} starts from ∅_t.

The UNet's weights are frozen during the optimization (gradients flow to ∅_t only), and the
optimized embeddings are float32 leaves whatever the UNet's dtype (cast inside each forward), so
half-precision weights do not turn Adam's small updates into zeros or NaNs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from nti_utils.align import check_prompt
from nti_utils.ddim import DDIMSchedule, ddim_step, guide, invert, predict_noise, sample
from nti_utils.images import ImageLike, encode, load_image, model_resolution, pil_to_tensor
from nti_utils.models import embed_prompts, frozen
from nti_utils.result import InversionResult, InversionSettings, check_compatible

_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Prepared:
    """The shared first steps of every inversion, for B images."""

    schedule: DDIMSchedule
    cond: torch.Tensor  # C, (B, L, D)
    null: torch.Tensor  # ∅ = encoder(""), (1, L, D)
    pivots: list[torch.Tensor]  # z*_0..z*_N, each (B, C, h, w)
    timings: dict[str, float]


def _prepare(
    pipe: StableDiffusionPipeline,
    images: Sequence[ImageLike] | torch.Tensor,
    prompts: Sequence[str],
    settings: InversionSettings,
    progress: bool,
) -> _Prepared:
    """Latents z_0, schedule, C, ∅ and the guidance-1 DDIM trajectory (the pivots).

    Every input is checked first, before any model call: prompts (strings the tokenizer can
    represent, :func:`~nti_utils.align.check_prompt`), step count (at most the scheduler's training
    timesteps), images (loaded) or latents (shape against the UNet's config, finite values).
    """
    if isinstance(images, (str, bytes)) or not isinstance(images, (torch.Tensor, Sequence)):
        raise TypeError(
            "images must be a list of images (PIL images, arrays or paths) or latents (B, C, h, w); "
            f"got {type(images).__name__}. For one image use null_text_inversion(pipe, image, ...)"
        )
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of strings, one per image; got {type(prompts).__name__} "
            f"({prompts!r})"
        )
    if len(images) == 0:
        raise ValueError("no images to invert")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    for prompt in prompts:
        check_prompt(pipe.tokenizer, prompt)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    if settings.num_steps > n_train:
        raise ValueError(
            f"InversionSettings.num_steps={settings.num_steps} is more than the scheduler's "
            f"{n_train} training timesteps; use at most {n_train} (the paper uses 50)"
        )
    unet = pipe.unet
    if isinstance(images, torch.Tensor):
        _check_latents(pipe, images)
    else:
        res = model_resolution(pipe)
        loaded = [load_image(im, res) for im in images]
    timings: dict[str, float] = {"batch_size": float(len(prompts))}
    t0 = time.perf_counter()
    if isinstance(images, torch.Tensor):
        z0 = images
    else:
        z0 = encode(pipe.vae, pil_to_tensor(loaded))
    z0 = z0.to(device=unet.device, dtype=unet.dtype)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, settings.num_steps)
    cond = embed_prompts(pipe, list(prompts))
    null = embed_prompts(pipe, "")
    timings["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pivots = invert(unet, z0, cond, schedule, guidance_scale=1.0, progress=progress)
    timings["ddim_inversion"] = time.perf_counter() - t0
    return _Prepared(schedule, cond, null, pivots, timings)


def _check_latents(pipe: StableDiffusionPipeline, z: torch.Tensor) -> None:
    """Latents z_0 must be (B, C, h, w) with the UNet's channels and sample size, and finite."""
    cfg, shape = pipe.unet.config, tuple(z.shape)
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    want = f"(B, {cfg.in_channels}, {size[0]}, {size[1]})"
    res = model_resolution(pipe)
    if z.dim() == 4 and shape[1] == 3 and shape[1] != cfg.in_channels:
        raise ValueError(
            f"latents must be {want}, got {shape}: this looks like an image tensor (B, 3, H, W). "
            "Pass the image itself (PIL image, array or path), or its latents from "
            "nti_utils.images.image_to_latents(pipe, image)"
        )
    if z.dim() != 4 or shape[1] != cfg.in_channels or shape[2:] != size:
        raise ValueError(
            f"latents must be {want} for this model (its UNet's channels and sample size, "
            f"{res}x{res} px images), got {shape}; encode images with "
            "nti_utils.images.image_to_latents(pipe, image)"
        )
    if not z.is_floating_point():
        raise TypeError(f"latents must be a floating point tensor, got {z.dtype}")
    if not torch.isfinite(z).all():
        raise ValueError("latents hold NaN or infinite values")


def _single(image: ImageLike | torch.Tensor) -> Sequence[ImageLike] | torch.Tensor:
    """One image as a batch of one (latents must already be (1, C, h, w))."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(
                f"invert one image at a time: latents must be (1, C, h, w), got {tuple(image.shape)}"
            )
        return image
    if isinstance(image, (list, tuple)):
        raise TypeError(
            f"invert one image at a time (got a {type(image).__name__} of {len(image)}); for "
            "several use batched_null_text_inversion(pipe, images, prompts, ...)"
        )
    return [image]


def _baseline(pipe, image, prompt, settings, progress, method: str) -> InversionResult:
    prep = _prepare(pipe, _single(image), [prompt], settings, progress)
    null = prep.cond if method == "negative-prompt" else prep.null
    return InversionResult.for_pipeline(
        pipe,
        latent_T=prep.pivots[-1].detach(),
        null_embeddings=torch.stack([null.detach()] * len(prep.schedule)),
        prompt=prompt,
        method=method,
        settings=settings,
        timings=prep.timings,
        pivots=prep.pivots,
    )


def ddim_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
) -> InversionResult:
    """Plain DDIM inversion at w = 1, packaged with ∅ = encoder("") at every step (method
    ``"ddim"``): reconstructing it at w = `settings.guidance_scale` shows how guidance amplifies the
    inversion error."""
    return _baseline(pipe, image, prompt, settings, progress, "ddim")


def negative_prompt_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
) -> InversionResult:
    """Negative-prompt inversion (Miyake et al. 2023, method ``"negative-prompt"``): ∅_t := C at
    every step, no optimization. With ∅_t = C the guidance term vanishes, so sampling retraces the
    w = 1 DDIM trajectory."""
    return _baseline(pipe, image, prompt, settings, progress, "negative-prompt")


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
    emb: list[torch.Tensor]  # the optimized embedding per image, (1, L, D) float32 leaves
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


def _optimize(unet, prep: _Prepared, latent, s: InversionSettings, progress: bool):
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
        for k in range(s.max_updates + 1):
            last = k == s.max_updates
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


def random_trajectory(
    z0: torch.Tensor, schedule: DDIMSchedule, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The paper's random pivots: z*_k = √ᾱ_t·z_0 + √(1-ᾱ_t)·ε at the timestep t of trajectory
    point k, with one Gaussian sample ε shared by all points (the forward process's marginals).

    Args:
        z0 (`torch.Tensor`): clean latents, (B, C, h, w).
        schedule (`DDIMSchedule`): the sampling schedule.
        generator (`torch.Generator`, *optional*): for ε (on the CPU, so results do not depend on
            the device).

    Returns:
        `list[torch.Tensor]`: z*_0 (= z_0), ..., z*_N, ordered like
        :func:`~nti_utils.ddim.invert`'s trajectory.
    """
    noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device=z0.device, dtype=z0.dtype)
    n = len(schedule)
    out = [z0]
    for k in range(1, n + 1):
        a = schedule.alpha(int(schedule.timesteps[n - k])).to(z0.device, z0.dtype)
        out.append(a.sqrt() * z0 + (1 - a).sqrt() * noise)
    return out


def batched_null_text_inversion(
    pipe: StableDiffusionPipeline,
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
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
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
    s, unet = settings, pipe.unet
    if s.autocast is not None and unet.device.type != "cuda":
        raise ValueError(f"autocast={s.autocast!r} needs CUDA, the UNet is on {unet.device}")
    amp = torch.autocast("cuda", _AUTOCAST[s.autocast]) if s.autocast else nullcontext()
    with frozen(unet):
        # pivots in the weights' own precision; autocast only for the optimization
        prep = _prepare(pipe, images, prompts, s, progress)
        if s.pivots == "random":  # the DDIM trajectory's z*_0 is the image's z_0
            prep.pivots = random_trajectory(prep.pivots[0], prep.schedule, generator)
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
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    start_latent: torch.Tensor | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> InversionResult:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1) of one image: the core,
    :func:`batched_null_text_inversion`, with a batch of one.

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image (loaded and resized to the model's
            resolution) or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P describing the image.
        settings (`InversionSettings`): defaults are the paper's (see its fields for the options).
        start_latent (`torch.Tensor`, *optional*): start from this z̄_T, (1, C, h, w), instead of the
            pivot z*_T; the targets stay the pivots.
        progress (`bool`, defaults to `True`): show tqdm bars.
        generator (`torch.Generator`, *optional*): the noise of ``settings.pivots == "random"``.

    Returns:
        :class:`~nti_utils.result.InversionResult` with method ``"null-text"`` (``"cond-text"`` with
        ``settings.optimize == "cond"``).

    With the default check-first rule, per timestep the UNet runs once for ε(z̄_t, t, C) and once
    per evaluation for ε(z̄_t, t, ∅_t), with a backward pass to ∅_t per update: when the loss is below
    the threshold, that forward pass already gives z̄_{t-1} and no extra UNet call is needed.
    """
    return batched_null_text_inversion(
        pipe, _single(image), [prompt], settings, start_latent, progress, generator
    )[0]


def reconstruct(
    pipe: StableDiffusionPipeline,
    result: InversionResult,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Re-sample the inverted image: latents z_0 (1, C, h, w) from z̄_T with ∅_t at step t.

    Args:
        guidance_scale (`float`, *optional*): defaults to the result's own w.
    """
    check_compatible(result, pipe)
    w = result.settings.guidance_scale if guidance_scale is None else guidance_scale
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, result.settings.num_steps)
    cond = embed_prompts(pipe, result.prompt)
    dev = pipe.unet.device
    nulls = [u.to(dev) for u in result.uncond_per_step()]
    out = sample(
        pipe.unet,
        result.latent_T.to(dev),
        cond,
        schedule,
        w,
        nulls,
        progress=progress,
        cond_offsets=result.cond_offsets_per_step(),
    )
    return out.latents

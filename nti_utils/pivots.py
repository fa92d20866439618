"""The first steps every inversion shares: checked inputs, z_0, the embeddings C and ∅, and the
pivots, the trajectory the optimization aims at.

Pivotal inversion (Mokady et al. 2023, Sec. 3.2): DDIM inversion at w = 1 gives z*_0..z*_N, and
null-text optimization then makes each guided step from z̄_t land on z*_{t-1}. The paper's random-pivot
ablation replaces that trajectory by a random one (:func:`random_trajectory`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nti_utils.align import check_prompt
from nti_utils.ddim import DDIMSchedule, invert
from nti_utils.images import ImageLike, encode, load_image, model_resolution, pil_to_tensor
from nti_utils.models import Pipeline, embed_prompts, null_embedding
from nti_utils.result import InversionSettings


@dataclass
class Prepared:
    """The shared first steps of every inversion, for B images."""

    schedule: DDIMSchedule
    cond: torch.Tensor  # C, (B, L', D): L' = L, or L + 1 with SDXL's row token
    null: torch.Tensor  # ∅ (models.null_embedding: encoder(""); SDXL base: zeros), (1, L', D)
    pivots: list[torch.Tensor]  # z*_0..z*_N, each (B, C, h, w); [z_0] from prepare_inputs
    timings: dict[str, float]


def prepare_inputs(
    pipe: Pipeline,
    images: Sequence[ImageLike] | torch.Tensor,
    prompts: Sequence[str],
    settings: InversionSettings,
) -> Prepared:
    """Checked inputs of B images, without pivots: latents z_0, the schedule, C and ∅ (the
    inversions that start from z_0 itself, e.g. EDICT, use this; :func:`prepare` adds the pivots).

    Every input is checked first, before any model call: prompts (strings the tokenizer can
    represent, :func:`~nti_utils.align.check_prompt`), step count (at most the scheduler's training
    timesteps), images (loaded) or latents (shape against the UNet's config, finite values). No UNet
    call is made.

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): from :func:`~nti_utils.models.load_pipeline`.
        images (sequence of image-likes, or `torch.Tensor`): B images, or their latents
            (B, C, h, w).
        prompts (sequence of `str`): one source prompt per image.
        settings (`InversionSettings`): its `num_steps` N sets the schedule.

    Returns:
        :class:`Prepared` whose `pivots` is ``[z_0]``, z_0 (B, C, h, w) in the UNet's device and
        dtype; `timings` has ``"batch_size"`` and ``"encode"``.

    Raises:
        TypeError: `images` is neither a list nor a latents tensor, or `prompts` is not a list.
        ValueError: no images, a count mismatch, a prompt, step count or latents that do not fit.
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
    null = null_embedding(pipe)
    timings["encode"] = time.perf_counter() - t0
    return Prepared(schedule, cond, null, [z0], timings)


def prepare(
    pipe: Pipeline,
    images: Sequence[ImageLike] | torch.Tensor,
    prompts: Sequence[str],
    settings: InversionSettings,
    progress: bool,
    generator: torch.Generator | None = None,
) -> Prepared:
    """Latents z_0, schedule, C, ∅ and the pivots: the guidance-1 DDIM trajectory, or with
    ``settings.pivots == "random"`` a random trajectory (:func:`random_trajectory`, from
    `generator`; no DDIM inversion is run then).

    Every input is checked first, before any model call (:func:`prepare_inputs`).
    """
    prep = prepare_inputs(pipe, images, prompts, settings)
    z0, schedule = prep.pivots[0], prep.schedule
    t0 = time.perf_counter()
    if settings.pivots == "random":
        prep.pivots = random_trajectory(z0, schedule, generator)
        prep.timings["random_trajectory"] = time.perf_counter() - t0
    else:
        prep.pivots = invert(
            pipe.unet, z0, prep.cond, schedule, guidance_scale=1.0, progress=progress
        )
        prep.timings["ddim_inversion"] = time.perf_counter() - t0
    return prep


def _check_latents(pipe: Pipeline, z: torch.Tensor) -> None:
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


def single(image: ImageLike | torch.Tensor) -> Sequence[ImageLike] | torch.Tensor:
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

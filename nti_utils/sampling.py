"""Text-to-image generation with the library's own DDIM sampler (what notebook 1 walks through)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

from nti_utils.attention import AttentionController, controlled_attention
from nti_utils.ddim import DDIMSchedule, SampleOutput, sample
from nti_utils.images import latents_to_pil
from nti_utils.models import Pipeline, embed_prompts, null_embedding


@dataclass
class Generated:
    """Images and the sampler's output (final latents, and the trajectory when kept)."""

    images: list[Image.Image]
    output: SampleOutput


def initial_latents(
    pipe: Pipeline, batch: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z_T ~ N(0, I), (batch, C, h, w) at the model's latent size, drawn on the CPU from
    `generator` (so a seed gives the same noise on every device) as diffusers' pipeline does.

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): SD or SDXL.
        batch (`int`): B.
        generator (`torch.Generator`, *optional*): a CPU generator.

    Returns:
        `torch.Tensor`: (B, C, h, w) on the UNet's device, in its dtype.
    """
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    z = torch.randn((batch, c, s, s), generator=generator, dtype=torch.float32)
    return z.to(pipe.unet.device, pipe.unet.dtype)


def generate(
    pipe: Pipeline,
    prompts: str | Sequence[str],
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    controller: AttentionController | None = None,
    keep_trajectory: bool = False,
    progress: bool = True,
) -> Generated:
    """Sample images for `prompts` with classifier-free guidance.

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`): from :func:`~nti_utils.models.load_pipeline`,
            SD 1.x/2.x or SDXL (whose time ids describe the latents' size times the VAE's factor).
        prompts (`str` or `Sequence[str]`): one image per prompt.
        num_steps (`int`, defaults to 50): DDIM steps.
        guidance_scale (`float`, defaults to 7.5): w.
        generator (`torch.Generator`, *optional*): CPU generator for z_T.
        latents (`torch.Tensor`, *optional*): z_T (B, C, h, w) instead of drawing it.
        controller (`AttentionController`, *optional*): installed on every attention layer for
            the run (e.g. an `AttentionStore` to look at cross-attention maps).
        keep_trajectory (`bool`, defaults to `False`): keep z_t and predicted x0 of every step.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        :class:`Generated`: B images and the sampler's output (latents z_0, (B, C, h, w)).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if latents is None:
        latents = initial_latents(pipe, len(prompts), generator)
    factor = pipe.vae_scale_factor
    size = (latents.shape[2] * factor, latents.shape[3] * factor)
    cond = embed_prompts(pipe, prompts, size)
    null = null_embedding(pipe, size)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, num_steps)
    callback = None
    if controller is not None:
        controller.begin(len(prompts), tuple(latents.shape[2:]))
        callback = controller.step_end
    ctx = controlled_attention(pipe.unet, controller) if controller is not None else nullcontext()
    with ctx:
        out = sample(
            pipe.unet,
            latents,
            cond,
            schedule,
            guidance_scale,
            null,
            callback=callback,
            keep_trajectory=keep_trajectory,
            progress=progress,
        )
    return Generated(latents_to_pil(pipe, out.latents), out)

"""A tiny SD-architecture pipeline with random weights, built from configs (no download).

Used by the test suite and handy for trying code paths quickly: same classes as Stable Diffusion
(`AutoencoderKL`, `CLIPTextModel` + `CLIPTokenizer`, `UNet2DConditionModel`, `DDIMScheduler`), with
cross-attention at two resolutions and sizes chosen so nothing coincides with SD's or the embedded
model's (16 tokens, 32-dim text, 32x32 images, 16x16 latents): the config
:data:`~nti_utils.shapes.model.TINY_TEST`, built by the builders of :mod:`nti_utils.shapes.model`.
:func:`tiny_sd2_pipeline` is the same shaped like SD 2.x-768 (v-prediction, linear projections,
per-block head counts, upcast attention); :func:`tiny_sdxl_pipeline` is a `StableDiffusionXLPipeline`
(two text encoders, a pooled embedding and time ids through ``addition_embed_type="text_time"``).
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from nti_utils.models import SD_SCHEDULER_CONFIG, sd_ddim_scheduler
from nti_utils.shapes.model import (
    TINY_TEST,
    ModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
)
from nti_utils.shapes.tokenizer import build_tokenizer


def tiny_config(
    image_size: int = 32, max_tokens: int = 16, latent_size: int | None = None
) -> ModelConfig:
    """:data:`~nti_utils.shapes.model.TINY_TEST` at another image size or token length (the
    arguments of :func:`tiny_pipeline`)."""
    return dataclasses.replace(
        TINY_TEST,
        resolution=image_size,
        max_tokens=max_tokens,
        unet_sample_size=latent_size,
    )


def tiny_pipeline(
    seed: int = 0, image_size: int = 32, max_tokens: int = 16, latent_size: int | None = None
) -> StableDiffusionPipeline:
    """Build the tiny pipeline deterministically from `seed` (CPU, float32).

    Args:
        seed (`int`, defaults to 0): seeds the random weights.
        image_size (`int`, defaults to 32): image side; the VAE halves it once.
        max_tokens (`int`, defaults to 16): tokenizer's padded length L.
        latent_size (`int`, *optional*): UNet sample size; defaults to ``image_size // 2``.
    """
    return _tiny(seed, tiny_config(image_size, max_tokens, latent_size), build_unet)


SD2_SCHEDULER_CONFIG: dict = {
    **SD_SCHEDULER_CONFIG,
    "prediction_type": "v_prediction",
    "skip_prk_steps": True,
    "trained_betas": None,
}
"""The scheduler config of SD 2.x-768 checkpoints (``stabilityai/stable-diffusion-2-1``), as they ship
it: DDIM with v-prediction."""


def _sd2_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """:func:`~nti_utils.shapes.model.build_unet` with SD 2.x's UNet options: linear projections in
    and out of the transformers, a head count per block (SD 2's ``attention_head_dim=[5, 10, 20,
    20]``) and attention upcast to float32."""
    return build_unet(
        cfg, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True
    )


def tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline shaped like SD 2.x-768 (CPU, float32): the UNet of :func:`_sd2_unet`
    (linear projections, per-block head counts, upcast attention) and a v-prediction DDIM scheduler
    (:data:`SD2_SCHEDULER_CONFIG`). Random weights, tamed like :func:`tiny_pipeline`'s, so its
    v-prediction is small: that of a model of unit-variance Gaussian latents."""
    pipe = _tiny(seed, TINY_TEST, _sd2_unet)
    pipe.scheduler = sd_ddim_scheduler(SD2_SCHEDULER_CONFIG)
    pipe.register_to_config(_name_or_path="tiny-test-sd2")
    return pipe


def _tiny(seed: int, cfg: ModelConfig, unet_builder) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.max_tokens)
    # keep this order (UNet, VAE, text encoder): it fixes which random weights a seed gives
    unet = unet_builder(cfg)
    vae = build_vae(cfg)
    text_encoder = build_text_encoder(cfg, tokenizer)
    pipe = assemble_pipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval())
    # Tame the random weights so the model behaves like a trained one where the tests need it:
    # an untrained UNet predicts O(1) noise that jumps with z and t (DDIM inversion then fails even
    # at w = 1), so its output layer is scaled down; the VAE's scaling factor is set so latents of
    # rendered scenes have about unit variance, as SD's 0.18215 does for SD's VAE.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    vae.register_to_config(scaling_factor=4.0)
    pipe.register_to_config(_name_or_path="tiny-test")
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_TEXT_2_HIDDEN = 48
"""Width of :func:`tiny_sdxl_pipeline`'s second text encoder (the first is TINY_TEST's 32): token
embeddings are 32 + 48 = 80 wide, as SDXL's are 768 + 1280."""
SDXL_POOLED_DIM = 24
"""`projection_dim` of the tiny second text encoder: the pooled embedding's size P (SDXL: 1280)."""
SDXL_TIME_EMBED_DIM = 8
"""The tiny UNet's ``addition_time_embed_dim`` (SDXL: 256)."""


def _sdxl_text_encoder_2(cfg: ModelConfig, tokenizer) -> CLIPTextModelWithProjection:
    """A `CLIPTextModelWithProjection` (its ``text_embeds`` is SDXL's pooled embedding) over
    `tokenizer`'s vocabulary, wider than the first encoder."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=SDXL_TEXT_2_HIDDEN,
        intermediate_size=2 * SDXL_TEXT_2_HIDDEN,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens,
        projection_dim=SDXL_POOLED_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _sdxl_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """:func:`~nti_utils.shapes.model.build_unet` with SDXL's UNet options: text+time added
    conditioning, cross-attention over both encoders' widths, linear projections, per-block head
    counts and transformer depths (SDXL: ``transformer_layers_per_block=[1, 2, 10]``)."""
    return build_unet(
        cfg,
        cross_attention_dim=cfg.text_hidden + SDXL_TEXT_2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny `StableDiffusionXLPipeline` with random weights (CPU, float32), built from configs.

    TINY_TEST's sizes (16 tokens, 32x32 images, 16x16 latents) with SDXL's parts: the UNet of
    :func:`_sdxl_unet` (``addition_embed_type="text_time"``), a `CLIPTextModel` (32 wide) and a
    `CLIPTextModelWithProjection` (:data:`SDXL_TEXT_2_HIDDEN` wide, pooled size
    :data:`SDXL_POOLED_DIM`) over the shapes-world tokenizer (one instance per encoder), the tiny
    VAE with ``force_upcast=True`` (as SDXL's), SD's DDIM scheduler
    (:func:`~nti_utils.models.sd_ddim_scheduler`) and ``force_zeros_for_empty_prompt=True`` (as
    SDXL base). Tamed like :func:`tiny_pipeline`'s (UNet output layer scaled down, VAE scaling
    factor 4), and the UNet's ``add_embedding`` output scaled by 0.3.

    Args:
        seed (`int`, defaults to 0): seeds the random weights.

    Returns:
        `StableDiffusionXLPipeline` named ``"tiny-test-sdxl"``, progress bar off.
    """
    cfg = TINY_TEST
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(cfg.max_tokens), build_tokenizer(cfg.max_tokens)
    # keep this order: it fixes which random weights a seed gives
    unet = _sdxl_unet(cfg)
    vae = build_vae(cfg)
    text_encoder = build_text_encoder(cfg, tokenizer)
    text_encoder_2 = _sdxl_text_encoder_2(cfg, tokenizer_2)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
        # the random added-conditioning path (pooled embedding and time ids) shifts the time
        # embedding as much as the timestep does; scaled down so that the pooled embedding, which
        # null-text inversion keeps fixed, does not dominate the guidance term
        unet.add_embedding.linear_2.weight.mul_(0.3)
        unet.add_embedding.linear_2.bias.mul_(0.3)
    vae.register_to_config(scaling_factor=4.0, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=sd_ddim_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.register_to_config(_name_or_path="tiny-test-sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FixedCaptions(torch.nn.Module):
    """A stand-in image-to-text model whose every caption is `text` (tests of the captioning
    plumbing; :attr:`seen` records the shape of each batch given to :meth:`generate`)."""

    def __init__(self, tokenizer, text: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the captioner's device/dtype
        self.ids = torch.tensor(tokenizer(text).input_ids)
        self.seen: list[tuple[int, ...]] = []

    def generate(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        self.seen.append(tuple(pixel_values.shape))
        return self.ids.expand(pixel_values.shape[0], -1)


def fixed_captioner(tokenizer, text: str, size: int):
    """A :class:`~nti_utils.caption.Captioner` named ``"fixed"`` that captions every image `text`,
    reading images at `size` pixels."""
    from transformers import ViTImageProcessor

    from nti_utils.caption import Captioner

    processor = ViTImageProcessor(size={"height": size, "width": size})
    return Captioner(FixedCaptions(tokenizer, text), processor, tokenizer, "fixed")


SAME_RUN_ATOL = 1e-4
"""How far two runs of the same computation may differ and still count as the same (latents of
order 1): float32 rounding that depends on the kernel, which depends on the batch size, the memory
layout of the inputs, the attention processor and the CPU, and grows over a sampler's steps (1e-6
to 2e-5 measured on the CPUs at hand). A broken step, controller or loader is off by 1e-2 or more."""


def assert_same_run(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Assert two tensors are the same computation's result up to :data:`SAME_RUN_ATOL`."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=SAME_RUN_ATOL)

"""A tiny SD-architecture pipeline with random weights, built from configs (no download).

Used by the test suite and handy for trying code paths quickly: same classes as Stable Diffusion
(`AutoencoderKL`, `CLIPTextModel` + `CLIPTokenizer`, `UNet2DConditionModel`, `DDIMScheduler`), with
cross-attention at two resolutions and sizes chosen so nothing coincides with SD's or the embedded
model's (16 tokens, 32-dim text, 32x32 images, 16x16 latents).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from nti_utils.models import sd_ddim_scheduler
from nti_utils.shapes.tokenizer import build_tokenizer


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
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_tokens)
    unet = UNet2DConditionModel(
        sample_size=latent_size or image_size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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

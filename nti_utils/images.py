"""Image I/O: load and normalize real images, and move them in and out of the VAE's latent space.

Latents are ``z_0 = vae.encode(I) * scaling_factor`` with the model's *own* scaling factor (0.18215
for SD 1.x, something else for the embedded model), never a hard-coded constant.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

ImageLike = Image.Image | np.ndarray | str | os.PathLike
_CONVERTIBLE_MODES = {"RGB", "RGBA", "LA", "L", "P", "CMYK", "YCbCr", "1", "PA"}


def model_resolution(pipe: StableDiffusionPipeline) -> int:
    """Image side in pixels the pipeline was trained at: UNet sample size x VAE downsampling."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_image(image: ImageLike, size: int | None = None) -> Image.Image:
    """Load an image and make it a square RGB picture of `size` pixels.

    Transparent images are composited over white; grayscale and palette images are converted;
    non-square images are center-cropped to a square, then resized (Lanczos) to `size`.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` or path): uint8 (H, W), (H, W, 3) or (H, W, 4) arrays,
            or float arrays in [0, 1].
        size (`int`, *optional*): side in pixels, e.g. ``model_resolution(pipe)``; kept if omitted.

    Returns:
        `PIL.Image.Image` in mode RGB.

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for images that cannot be used (empty, odd array shapes, 16-bit or float modes).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"expected a PIL image, a numpy array or a path, got {type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is empty ({image.width}x{image.height})")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(
            f"image mode {image.mode!r} (16-bit or floating point) is not supported; convert it to "
            "8-bit RGB first, e.g. with `image.convert('RGB')` after scaling its values to 0..255"
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an array (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"array images must be uint8 or float in [0, 1]; got {arr.dtype} with values in "
                f"[{arr.min()}, {arr.max()}]"
            )
        arr = np.round(arr * 255).astype(np.uint8)
    return Image.fromarray(arr)


def pil_to_tensor(images: Image.Image | list[Image.Image]) -> torch.Tensor:
    """RGB PIL image(s) -> float tensor (B, 3, H, W) in [-1, 1]."""
    images = [images] if isinstance(images, Image.Image) else images
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


@torch.no_grad()
def encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = False,
) -> torch.Tensor:
    """Encode images to scaled latents ``z_0 = E(I) * scaling_factor``.

    Args:
        vae (`AutoencoderKL`): the pipeline's VAE.
        images (`torch.Tensor`): (B, 3, H, W) in [-1, 1].
        generator (`torch.Generator`, *optional*): used when `sample` is True.
        sample (`bool`, defaults to `False`): draw from the posterior instead of taking its mean
            (the paper's code takes the mean).

    Returns:
        `torch.Tensor`: latents (B, C, H / f, W / f) in the VAE's dtype, f the VAE's downsampling.
    """
    x = images.to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents (B, C, h, w) to images (B, 3, H, W) in [-1, 1] (clamped)."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.clamp(-1, 1)


def image_to_latents(pipe: StableDiffusionPipeline, image: ImageLike) -> torch.Tensor:
    """Load `image` at the model's resolution and encode it: latents (1, C, h, w)."""
    return encode(pipe.vae, pil_to_tensor(load_image(image, model_resolution(pipe))))


def latents_to_pil(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Decode latents (B, C, h, w) to a list of RGB PIL images."""
    return tensor_to_pil(decode(pipe.vae, latents))

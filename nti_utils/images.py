"""Image I/O: load and normalize real images, and move them in and out of the VAE's latent space.

Latents are ``z_0 = vae.encode(I) * scaling_factor`` with the model's *own* scaling factor (0.18215
for SD 1.x, something else for the embedded model), never a hard-coded constant.
"""

from __future__ import annotations

import numbers
import os
import struct
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image, ImageOps

ImageLike = Image.Image | np.ndarray | str | os.PathLike
_CONVERTIBLE_MODES = {"RGB", "RGBA", "LA", "L", "P", "CMYK", "YCbCr", "1", "PA"}


def model_resolution(pipe: StableDiffusionPipeline) -> int:
    """Image side in pixels the pipeline was trained at: UNet sample size x VAE downsampling."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_image(image: ImageLike, size: int | None = None) -> Image.Image:
    """Load an image and make it a square RGB picture of `size` pixels.

    The EXIF orientation of photos (and of PIL images opened from them) is applied, so the picture
    is upright as viewers show it. Transparent images are composited over white; grayscale and
    palette images are converted; non-square images are center-cropped to a square, then resized
    (Lanczos) to `size`.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` or path): uint8 (H, W), (H, W, 3) or (H, W, 4) arrays,
            or float arrays in [0, 1] (finite).
        size (`int`, *optional*): side in pixels, e.g. ``model_resolution(pipe)``; kept if omitted.

    Returns:
        `PIL.Image.Image` in mode RGB.

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for images that cannot be used (unreadable or truncated files, empty images,
            odd array shapes or dtypes, NaN or infinite values, 16-bit or float modes).
        TypeError: for anything else than an image, an array or a path, or a `size` that is not an
            integer.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
        raise TypeError(f"size must be an integer number of pixels, got {size!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    if isinstance(image, (str, os.PathLike)):
        image = _read_image(Path(image))
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    else:
        hint = (
            " (for a tensor in [-1, 1], pass tensor_to_pil(t)[0]; latents go to the inversion "
            "functions directly)"
            if isinstance(image, torch.Tensor)
            else ""
        )
        raise ValueError(
            f"expected a PIL image, a numpy array or a path, got {type(image).__name__}{hint}"
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


def _read_image(path: Path) -> Image.Image:
    """Open and fully decode an image file, upright (EXIF orientation applied)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ValueError(
            f"could not read {path} as an image ({type(err).__name__}: {err}); the file is not an "
            "image format PIL reads (PNG, JPEG, WebP, ...), or it is truncated or corrupt: "
            "re-export or re-download it"
        ) from err


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.size == 0:
        raise ValueError(f"array image is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        hint = " (channels first? use arr.transpose(1, 2, 0))" if arr.ndim == 3 else ""
        raise ValueError(
            f"expected an array (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}{hint}"
        )
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(
                f"array images must be uint8 or float in [0, 1]; got dtype {arr.dtype} (scale "
                "integer images to 0..255 and convert with arr.astype(np.uint8))"
            )
        if not np.isfinite(arr).all():
            raise ValueError(
                f"array image has {int((~np.isfinite(arr)).sum())} NaN or infinite values; "
                "fix or mask them before loading (they would silently become black pixels)"
            )
        if arr.min() < 0 or arr.max() > 1:
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
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        what = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"encode needs images (B, 3, H, W) in [-1, 1], got {what}; make them with "
            "pil_to_tensor(load_image(...))"
        )
    x = images.to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents (B, C, h, w) to images (B, 3, H, W) in [-1, 1] (clamped)."""
    channels = vae.config.latent_channels
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != channels:
        what = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"decode needs latents (B, {channels}, h, w), got {what}")
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.clamp(-1, 1)


def image_to_latents(pipe: StableDiffusionPipeline, image: ImageLike) -> torch.Tensor:
    """Load `image` at the model's resolution and encode it: latents (1, C, h, w)."""
    return encode(pipe.vae, pil_to_tensor(load_image(image, model_resolution(pipe))))


def latents_to_pil(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Decode latents (B, C, h, w) to a list of RGB PIL images."""
    return tensor_to_pil(decode(pipe.vae, latents))

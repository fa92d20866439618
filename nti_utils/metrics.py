"""Image metrics (MSE, PSNR, SSIM) and the VAE round trip that bounds every reconstruction."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from skimage.metrics import structural_similarity

from nti_utils.images import ImageLike, decode, encode, load_image, model_resolution, pil_to_tensor

ArrayLike = Image.Image | np.ndarray | torch.Tensor


def to_float_array(image: ArrayLike) -> np.ndarray:
    """Image -> float64 array (H, W, C) in [0, 1].

    PIL images and uint8 arrays are divided by 255; float arrays are taken as [0, 1]; torch tensors
    (3, H, W) or (1, 3, H, W) are taken as [-1, 1] (the VAE's range).

    Raises:
        ValueError: batches, odd shapes, other dtypes, NaN or infinite values (they would make every
            metric NaN without saying why).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(
                f"expected a tensor (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError("image tensor has NaN or infinite values")
        return ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy().astype(np.float64)
    if not isinstance(image, (np.ndarray, list, tuple)):
        raise TypeError(
            f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}"
        )
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"expected an image array (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"array images must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("image array has NaN or infinite values")
    return arr.astype(np.float64)


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = to_float_array(a), to_float_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def mse(a: ArrayLike, b: ArrayLike, mask: np.ndarray | None = None) -> float:
    """Mean squared error in [0, 1] units; with `mask` (H, W) bool, over the masked pixels only."""
    x, y = _pair(a, b)
    err = ((x - y) ** 2).mean(axis=-1)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise ValueError(
                f"mask must be a boolean array (H, W), got dtype {mask.dtype}; e.g. `mask > 0.5`"
            )
        if mask.shape != err.shape:
            raise ValueError(f"mask {mask.shape} does not match image {err.shape}")
        if not mask.any():
            raise ValueError("mask selects no pixel")
        err = err[mask]
    return float(err.mean())


def psnr(a: ArrayLike, b: ArrayLike, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB (data range 1), optionally within a mask; `inf` if equal."""
    m = mse(a, b, mask)
    return float("inf") if m == 0 else float(10 * np.log10(1.0 / m))


def ssim(a: ArrayLike, b: ArrayLike) -> float:
    """Structural similarity (scikit-image, data range 1, channels averaged)."""
    x, y = _pair(a, b)
    win = min(7, x.shape[0], x.shape[1])
    win -= 1 - win % 2  # odd window that fits small images
    return float(structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=win))


def vae_roundtrip(pipe: StableDiffusionPipeline, image: ImageLike) -> Image.Image:
    """Decode(encode(image)) at the model's resolution: the best any inversion can reconstruct
    (the paper's "VAE upper bound")."""
    x = pil_to_tensor(load_image(image, model_resolution(pipe)))
    return Image.fromarray(
        np.round(to_float_array(decode(pipe.vae, encode(pipe.vae, x))) * 255).astype(np.uint8)
    )


def vae_bound(pipe: StableDiffusionPipeline, image: ImageLike) -> float:
    """PSNR (dB) of the VAE round trip against the image at the model's resolution."""
    return psnr(load_image(image, model_resolution(pipe)), vae_roundtrip(pipe, image))

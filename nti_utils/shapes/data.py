"""The embedded model's training data: rendered scenes with their captions, optionally with some
captions made wrong (web-like label noise), and the tensors and measures the trainer needs."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from nti_utils.shapes.world import BACKGROUNDS, OBJECT_COLORS, SHAPES, make_caption, scene_from_seed


def render_dataset(seeds: range, p_two: float = 0.3) -> tuple[np.ndarray, list[str]]:
    """Render scenes numbered `seeds`: images (N, 64, 64, 3) uint8 and their captions."""
    images, captions = [], []
    for s in tqdm(seeds, desc="render", leave=False):
        rng = np.random.default_rng(s)
        scene = scene_from_seed(s, n_objects=2 if rng.random() < p_two else 1)
        images.append(np.asarray(scene.render()))
        captions.append(scene.caption())
    return np.stack(images), captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vae_psnr(vae: AutoencoderKL, images: np.ndarray, batch: int = 50) -> float:
    """Mean PSNR (dB) of the VAE round trip (posterior mean) over uint8 images (N, H, W, 3)."""
    vals = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_tensor(images[i : i + batch])
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            mse = ((y - x) / 2).pow(2).flatten(1).mean(1)
            vals.append(10 * torch.log10(1.0 / mse))
    return float(torch.cat(vals).mean())


_WORD_SETS = (tuple(OBJECT_COLORS), SHAPES, tuple(BACKGROUNDS))


def corrupt_caption(
    caption: str,
    p_wrong: float,
    rng: np.random.Generator,
    p_shape: float | None = None,
    p_background: float | None = None,
) -> str:
    """Replace each attribute word (object color, shape, background) independently with
    probability `p_wrong` by another word of the same kind, as web captions are sometimes wrong.
    Shape and background words use `p_shape` and `p_background` instead when they are given (e.g.
    both 0: only object colors are ever wrong).

    The word count and positions are kept, so token positions (attention targets) stay valid. With
    such labels the conditional model follows a prompt only partly and classifier-free guidance
    sharpens it, as in Stable Diffusion.
    """
    probs = {kind: p_wrong for kind in _WORD_SETS}
    if p_shape is not None:
        probs[SHAPES] = p_shape
    if p_background is not None:
        probs[tuple(BACKGROUNDS)] = p_background
    if max(probs.values()) <= 0:
        return caption
    words = caption.split(" ")
    for i, word in enumerate(words):
        for kind, p in probs.items():
            if word in kind and rng.random() < p:
                words[i] = str(rng.choice([w for w in kind if w != word]))
    return " ".join(words)


def wrong_attribute(caption: str, rng: np.random.Generator) -> str:
    """`caption` with exactly one attribute word (object color, shape or background, chosen at
    random) replaced by another of its kind: a source prompt that is wrong in one respect."""
    words = caption.split(" ")
    slots = [(i, kind) for i, w in enumerate(words) for kind in _WORD_SETS if w in kind]
    if not slots:
        raise ValueError(f"{caption!r} names no color, shape or background")
    i, kind = slots[int(rng.integers(len(slots)))]
    words[i] = str(rng.choice([w for w in kind if w != words[i]]))
    return " ".join(words)


def single_object_prompts() -> list[str]:
    """All 45 single-object captions (5 colors x 3 shapes x 3 backgrounds)."""
    return [
        make_caption(((c, k),), bg) for bg in BACKGROUNDS for c in OBJECT_COLORS for k in SHAPES
    ]

"""Cross-attention supervision from the renderer's masks, for training the embedded model.

A miniature SD trained only on the denoising loss learns to pass a global summary of the caption
through near-uniform cross-attention (every token gets about 1/K of every pixel): it draws the
right picture, but its attention maps say nothing about *where* a word is, and Prompt-to-Prompt
needs exactly that. Real SD's maps are localized because of its scale and data; ours can be taught
directly, since every training scene comes with per-object masks.

For every training caption we know which token positions name which object (its color and shape
words) and which name the background (its color word). Two terms tie words and regions together,
with ``a[q, j]`` the head-averaged cross-attention probability of latent pixel ``q`` for token
``j`` in a layer and ``m_j`` the coverage of ``j``'s region at the layer's resolution
(area-averaged from the 64x64 mask)::

    token side:  mass_j  = sum_q a[q, j] m_j[q] / sum_q a[q, j]       (the word's map lies inside)
    pixel side:  share_g = sum_q m_g[q] sum_{j in g} a[q, j] / sum_q m_g[q]   (the region's pixels
                                                                     listen to its words)
    L_attn = mean_j (1 - mass_j) + mean_g (1 - share_g),  averaged over cross-attention layers

The token side alone is not enough: the model then keeps each word's (localized) attention tiny and
still routes the content through the end and padding tokens, which the causal text encoder fills
with a summary of the whole caption, so swapping a word changes little where it should. The pixel
side makes the words carry their content. ``1 - x`` rather than ``-log x`` keeps the gradient
bounded at high noise levels, where the object's place cannot be read from the latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nti_utils.align import word_token_indices
from nti_utils.attention import AttentionController, LayerInfo
from nti_utils.shapes.score import analyze
from nti_utils.shapes.world import Scene, parse_caption, scene_from_seed

SLOTS = ("color 1", "shape 1", "color 2", "shape 2", "background")
"""What each supervised token slot names; missing objects leave their slots at -1."""

GROUPS = ((0, 1), (2, 3), (4,))
"""Slots naming the same region (an object's color and shape words; the background's color)."""


def scene_targets(
    scene: Scene, tokenizer: PreTrainedTokenizerBase, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token positions and target regions of one scene's caption.

    Args:
        scene: a shapes-world scene; its caption is what the model reads.
        tokenizer: the model's tokenizer.
        size (`int`): side of the region maps (the latent size, e.g. 16).

    Returns:
        ``tokens``: int (5,) token positions per :data:`SLOTS` (-1 where absent; a word split into
        several tokens is represented by its last token); ``regions``: float32 (5, size, size),
        the share of each latent pixel covered by the slot's region.
    """
    caption = scene.caption()
    masks = scene.masks().astype(np.float32)  # (n, R, R)
    f = scene.resolution // size
    cov = masks.reshape(len(masks), size, f, size, f).mean((2, 4))
    tokens = np.full(len(SLOTS), -1, dtype=np.int64)
    regions = np.zeros((len(SLOTS), size, size), dtype=np.float32)
    for i in range(len(scene.objects)):
        # caption words: "a <color> <shape> [and a <color> <shape>] on a <bg> background"
        for k, word in enumerate((4 * i + 1, 4 * i + 2)):
            tokens[2 * i + k] = word_token_indices(tokenizer, caption, word)[-1]
            regions[2 * i + k] = cov[i]
    tokens[4] = word_token_indices(tokenizer, caption, -2)[-1]
    regions[4] = np.clip(1.0 - cov.sum(0), 0.0, 1.0)
    return tokens, regions


def build_targets(
    seeds: range, n_objects: list[int], tokenizer: PreTrainedTokenizerBase, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scene_targets` for the scenes numbered `seeds` with the given object counts:
    tokens (N, 5) int64 and regions (N, 5, size, size) float16."""
    toks, regs = [], []
    for s, n in tqdm(zip(seeds, n_objects), total=len(seeds), desc="attention targets"):
        t, r = scene_targets(scene_from_seed(s, n), tokenizer, size)
        toks.append(t)
        regs.append(r.astype(np.float16))
    return np.stack(toks), np.stack(regs)


def attention_mass_inside(maps: torch.Tensor, token: list[int], mask: np.ndarray) -> float:
    """Share of a word's cross-attention mass inside `mask`.

    Args:
        maps: (h, w, K) averaged cross-attention of one prompt.
        token: the word's token positions (their maps are summed).
        mask: bool (H, W) at image resolution; the map is upsampled bilinearly to it.
    """
    m = maps[..., token].sum(-1)[None, None].float()
    m = F.interpolate(m, size=mask.shape, mode="bilinear", align_corners=False)[0, 0].clamp_min(0)
    m = m / m.sum()
    return float(m[torch.from_numpy(mask)].sum())


def shape_attention_inside(
    maps: torch.Tensor, tokenizer: PreTrainedTokenizerBase, prompt: str, image
) -> float | None:
    """The quality measure of the model card: for a single-object `prompt` whose `image` shows
    exactly one object (as :func:`~nti_utils.shapes.score.analyze` reads it), the share of the shape
    word's cross-attention mass inside that object (:func:`attention_mass_inside`); else None.

    Args:
        maps: (h, w, K) averaged cross-attention of the prompt.
        tokenizer: the model's tokenizer.
        prompt (`str`): a shapes-world caption.
        image: the sample drawn with those maps.
    """
    objects, _ = parse_caption(prompt)
    found = analyze(image).objects
    if len(objects) != 1 or len(found) != 1:
        return None
    token = word_token_indices(tokenizer, prompt, objects[0][1])
    return attention_mass_inside(maps, token, found[0].mask)


class AttentionSupervision(AttentionController):
    """Keeps every cross-attention layer's probabilities (with their graph) for :meth:`loss`.

    Install with :func:`nti_utils.attention.controlled_attention` around the training loop, call
    :meth:`begin` before each UNet forward and :meth:`loss` after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recorded: list[torch.Tensor] = []

    def begin(self, num_prompts: int, latent_hw: tuple[int, int]) -> None:
        super().begin(num_prompts, latent_hw)
        self.recorded = []

    def wants(self, info: LayerInfo) -> bool:
        return info.is_cross

    def __call__(self, probs: torch.Tensor, info: LayerInfo) -> torch.Tensor:
        self.recorded.append(probs)
        return probs

    def loss(
        self,
        tokens: torch.Tensor,
        regions: torch.Tensor,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Both supervision terms, averaged over recorded layers.

        Args:
            tokens: int (B, S) token positions, -1 for slots to skip (absent objects, captions
                dropped for classifier-free guidance).
            regions: (B, S, h, w) region coverage at the latent resolution.
            groups (*optional*): slots that share one region (an object's color and shape words);
                defaults to :data:`GROUPS` for the :data:`SLOTS` layout, else one slot per group.

        Returns:
            The loss (a scalar with gradient) and, for logging (floats): ``shape_mass``, the mean
            token-side mass of the shape slots; ``mass``, of all slots; ``pixel_mass``, the mean
            pixel-side share.
        """
        if not self.recorded:
            raise RuntimeError("no cross-attention recorded; was the UNet run inside the context?")
        n_slots = tokens.shape[1]
        if groups is None:
            groups = GROUPS if n_slots == len(SLOTS) else [[i] for i in range(n_slots)]
        shapes = [i for i, name in enumerate(SLOTS) if name.startswith("shape")]
        if n_slots != len(SLOTS):
            shapes = list(range(n_slots))
        valid = tokens >= 0
        idx = tokens.clamp_min(0)
        losses, logs = [], {"shape_mass": [], "mass": [], "pixel_mass": []}
        for probs in self.recorded:
            p = probs.float().mean(1)  # (B, Q, K), averaged over heads
            h, w = self.resolution(p.shape[1])
            cov = F.adaptive_avg_pool2d(regions.float(), (h, w)).flatten(2)  # (B, S, Q)
            a = p.gather(2, idx[:, None, :].expand(-1, p.shape[1], -1)).transpose(1, 2)
            a = a * valid[..., None]  # (B, S, Q); skipped slots attend nowhere
            # token side: each word's map lies in its region
            mass = (a * cov).sum(-1) / a.sum(-1).clamp_min(1e-8)  # (B, S)
            token_loss = (1 - mass)[valid].mean()
            # pixel side: each region's pixels attend to its words
            share = torch.stack([a[:, list(g)].sum(1) for g in groups], 1)  # (B, G, Q)
            gcov = torch.stack([cov[:, g[0]] for g in groups], 1)
            gvalid = torch.stack([valid[:, g[0]] for g in groups], 1) & (gcov.sum(-1) > 0)
            pix = (gcov * share).sum(-1) / gcov.sum(-1).clamp_min(1e-8)  # (B, G)
            losses.append(token_loss + (1 - pix)[gvalid].mean())
            with torch.no_grad():
                logs["shape_mass"].append(mass[:, shapes][valid[:, shapes]].mean())
                logs["mass"].append(mass[valid].mean())
                logs["pixel_mass"].append(pix[gvalid].mean())
        self.recorded = []
        stats = {k: float(torch.stack(v).mean()) for k, v in logs.items()}
        return torch.stack(losses).mean(), stats

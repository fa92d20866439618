"""Prompt-to-Prompt's LocalBlend (Hertz et al. 2022): keep an edit inside the region of chosen words.

After each denoising step the target latents are blended with the source's,
``z_target <- z_source + mask * (z_target - z_source)``, with a mask from the (averaged, low
resolution) cross-attention maps of the chosen words in the source and target prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from nti_utils.align import word_token_indices
from nti_utils.attention import AttentionStore
from nti_utils.p2p import _finite_number, check_prompts


@dataclass
class LocalBlend:
    """Restrict an edit to the region of chosen words.

    Args:
        words (`Sequence[Sequence[str]]`): for each prompt (source first), the words whose
            cross-attention marks the region; the union over prompts is kept.
        tokenizer: the pipeline's tokenizer.
        prompts (`Sequence[str]`): the edit's prompts.
        threshold (`float`, defaults to 0.3): of the max-normalized map.
        start_step (`int`, defaults to 0): blend only after this many steps.
        subtract_words (`Sequence[Sequence[str]]`, *optional*): regions to remove from the mask.
        resolution (`int`, *optional*): map resolution; defaults to
            :func:`~nti_utils.attention.default_map_resolution`.

    Attributes:
        masks (`list[torch.Tensor]`): the mask used at each blended step, (P, 1, h, w).
    """

    words: Sequence[Sequence[str]]
    tokenizer: PreTrainedTokenizerBase
    prompts: Sequence[str]
    threshold: float = 0.3
    start_step: int = 0
    subtract_words: Sequence[Sequence[str]] | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        self.prompts = check_prompts(self.prompts)
        t = self.threshold
        if not _finite_number(t) or not 0 <= float(t) <= 1:
            raise ValueError(
                f"LocalBlend threshold must be a number in [0, 1] (of the max-normalized map), "
                f"got {t!r}"
            )
        self.alpha = self._word_alpha(self.words)
        self.subtract = self._word_alpha(self.subtract_words) if self.subtract_words else None
        self.masks: list[torch.Tensor] = []

    def _word_alpha(self, words: Sequence[Sequence[str]]) -> torch.Tensor:
        if len(words) != len(self.prompts):
            raise ValueError(f"give words for each of the {len(self.prompts)} prompts (maybe [])")
        alpha = torch.zeros(len(self.prompts), self.tokenizer.model_max_length)
        for i, (prompt, ws) in enumerate(zip(self.prompts, words)):
            for w in [ws] if isinstance(ws, str) else ws:
                alpha[i, word_token_indices(self.tokenizer, prompt, w)] = 1.0
        return alpha

    def _mask(self, maps: torch.Tensor, alpha: torch.Tensor, size: tuple[int, int], pool: bool):
        m = (maps * alpha.to(maps)[:, None, None, :]).sum(-1)[:, None]  # (P, 1, h, w)
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
        mask = m > self.threshold
        return mask[:1] | mask  # the source's region counts for every prompt

    def __call__(self, store: AttentionStore, i: int, latents: torch.Tensor) -> torch.Tensor | None:
        if i < self.start_step:
            return None
        res = self.resolution or store.map_resolution
        maps = store.maps(res)  # (P, h, w, L)
        mask = self._mask(maps, self.alpha, latents.shape[2:], pool=True)
        if self.subtract is not None:
            mask = mask & ~self._mask(maps, self.subtract, latents.shape[2:], pool=False)
        self.masks.append(mask.cpu())
        mask = mask.to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])

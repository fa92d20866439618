"""Prompt-to-Prompt (Hertz et al. 2022) controllers and the edit entry point.

Source and target prompts run in one batch from the same inverted latent z̄_T (prompt 0 is the source,
the rest are targets). Controllers change the targets' attention:

* :class:`Replace` (word swap): targets use the source's cross-attention maps.
* :class:`Refine` (words added or changed): aligned target tokens take the source's maps, new tokens
  keep their own.
* :class:`Reweight`: multiply the maps of chosen target words by a factor (the "equalizer"); wraps a
  Replace or Refine to compose with it.
* both Replace and Refine inject the source's *self*-attention for the first steps.
* :class:`LocalBlend`: after each step, keep the source latent outside a mask built from the
  cross-attention of chosen words, ``z_target <- z_source + mask * (z_target - z_source)``.

Cross-attention replacement runs during a fraction (or a window, or per word) of the steps,
`cross_replace_steps`; self-attention injection during `self_replace_steps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import PreTrainedTokenizerBase

from nti_utils.align import refine_alignment, replace_mapper, word_token_indices
from nti_utils.attention import (
    AttentionStore,
    LayerInfo,
    controlled_attention,
)
from nti_utils.ddim import DDIMSchedule, sample
from nti_utils.images import latents_to_pil
from nti_utils.models import embed_prompts
from nti_utils.result import InversionResult, check_compatible

Steps = float | tuple[float, float]


def _window(steps: Steps, num_steps: int) -> tuple[int, int]:
    lo, hi = (0.0, steps) if isinstance(steps, (int, float)) else steps
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"step fractions must satisfy 0 <= start <= end <= 1, got {steps}")
    return int(lo * num_steps), int(hi * num_steps)


def cross_replace_alphas(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_steps: int,
    steps: Steps | dict[str, Steps],
) -> torch.Tensor:
    """When each target token takes the source's cross-attention: (num_steps, T, L) of 0/1.

    Args:
        steps: a fraction of the steps (``0.8`` = the first 80%), a window ``(start, end)`` of
            fractions, or a dict of those per target word with ``"default_"`` for all other tokens,
            e.g. ``{"default_": 0.8, "square": 0.4}``.
    """
    per_word = steps if isinstance(steps, dict) else {"default_": steps}
    n_targets, max_len = len(prompts) - 1, tokenizer.model_max_length
    alphas = torch.zeros(num_steps, n_targets, max_len)
    lo, hi = _window(per_word.get("default_", 1.0), num_steps)
    alphas[lo:hi] = 1.0
    for word, window in per_word.items():
        if word == "default_":
            continue
        lo, hi = _window(window, num_steps)
        for j, prompt in enumerate(prompts[1:]):
            if word in prompt.split():
                idx = word_token_indices(tokenizer, prompt, word)
                alphas[:, j, idx] = 0.0
                alphas[lo:hi, j, idx] = 1.0
    return alphas


class AttentionEdit(AttentionStore):
    """Common part of Replace and Refine: windows of cross/self replacement, LocalBlend, and the
    store of cross-attention maps (LocalBlend and plots read it).

    Args:
        tokenizer: the pipeline's tokenizer.
        prompts (`Sequence[str]`): source first, then targets.
        num_steps (`int`): DDIM steps of the run.
        cross_replace_steps: see :func:`cross_replace_alphas`.
        self_replace_steps (`float` or `(start, end)`, defaults to 0.4): when targets take the
            source's self-attention.
        self_replace_max_side (`int`, *optional*): only layers at most this large get
            self-attention injection; defaults to the map resolution of
            :func:`~nti_utils.attention.default_map_resolution` (16 for SD, as in the paper's code).
        local_blend (`LocalBlend`, *optional*): restrict the edit to a region.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        num_steps: int,
        cross_replace_steps: Steps | dict[str, Steps] = 0.8,
        self_replace_steps: Steps = 0.4,
        self_replace_max_side: int | None = None,
        local_blend: LocalBlend | None = None,
    ) -> None:
        super().__init__(cross=True, self_attention=False)
        if len(prompts) < 2:
            raise ValueError("an edit needs a source prompt and at least one target prompt")
        self.prompts, self.num_steps = list(prompts), num_steps
        self.tokenizer = tokenizer
        self.cross_alphas = cross_replace_alphas(tokenizer, prompts, num_steps, cross_replace_steps)
        self.self_window = _window(self_replace_steps, num_steps)
        self.self_replace_max_side = self_replace_max_side
        self.local_blend = local_blend

    def attach(self, unet) -> None:
        super().attach(unet)
        if self.self_replace_max_side is None:
            self.self_replace_max_side = self.map_resolution

    def wants(self, info: LayerInfo) -> bool:
        return True

    def replace_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """source: (heads, Q, K), target: (T, heads, Q, K) -> new target maps (T, heads, Q, K)."""
        raise NotImplementedError

    def _edit_self(self, probs: torch.Tensor) -> torch.Tensor:
        lo, hi = self.self_window
        side = max(self.resolution(probs.shape[2]))
        if lo <= self.cur_step < hi and side <= (self.self_replace_max_side or 0):
            probs = probs.clone()
            probs[1:] = probs[:1].expand_as(probs[1:])
        return probs

    def _edit_cross(self, probs: torch.Tensor) -> torch.Tensor:
        alpha = self.cross_alphas[min(self.cur_step, self.num_steps - 1)]  # (T, L)
        alpha = alpha.to(probs)[:, None, None, :]
        new = self.replace_cross(probs[0], probs[1:])
        return torch.cat([probs[:1], alpha * new + (1 - alpha) * probs[1:]])

    def __call__(self, probs: torch.Tensor, info: LayerInfo) -> torch.Tensor:
        if probs.shape[0] not in (self.num_prompts, 2 * self.num_prompts):
            raise ValueError(
                f"attention batch {probs.shape[0]} does not fit {self.num_prompts} prompts"
            )
        rows = self.cond_slice(probs.shape[0])
        cond = probs[rows]
        cond = self._edit_cross(cond) if info.is_cross else self._edit_self(cond)
        probs = torch.cat([probs[: rows.start], cond]) if rows.start else cond
        return super().__call__(probs, info)  # record what is used

    def begin(self, num_prompts: int, latent_hw: tuple[int, int]) -> None:
        if num_prompts != len(self.prompts):
            raise ValueError(
                f"controller built for {len(self.prompts)} prompts, run has {num_prompts}"
            )
        super().begin(num_prompts, latent_hw)

    def step_end(self, i: int, t: int, latents: torch.Tensor) -> torch.Tensor | None:
        super().step_end(i, t, latents)
        if self.local_blend is not None:
            return self.local_blend(self, i, latents)
        return None


class Replace(AttentionEdit):
    """Word swap: targets take the source's cross-attention maps token for token.

    Raises:
        ValueError: if a target does not align token for token with the source (use :class:`Refine`).
    """

    def __init__(self, tokenizer, prompts, num_steps, **kwargs) -> None:
        super().__init__(tokenizer, prompts, num_steps, **kwargs)
        self.mapper = torch.stack([replace_mapper(tokenizer, prompts[0], p) for p in prompts[1:]])

    def replace_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hqk,tkn->thqn", source, self.mapper.to(source))


class Refine(AttentionEdit):
    """Refinement: aligned target tokens take the source's maps, new tokens keep their own."""

    def __init__(self, tokenizer, prompts, num_steps, **kwargs) -> None:
        super().__init__(tokenizer, prompts, num_steps, **kwargs)
        aligned = [refine_alignment(tokenizer, prompts[0], p) for p in prompts[1:]]
        self.mapper = torch.stack([a.mapper for a in aligned])  # (T, L)
        self.token_alphas = torch.stack([a.alphas for a in aligned])  # (T, L)

    def replace_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        taken = source[:, :, self.mapper].permute(2, 0, 1, 3)  # (T, heads, Q, L)
        a = self.token_alphas.to(source)[:, None, None, :]
        return taken * a + target * (1 - a)


class Reweight(AttentionEdit):
    """Re-weighting: scale the cross-attention of chosen target words.

    Args:
        equalizer (`torch.Tensor`): (T, L) factors per target and token, see :func:`equalizer`.
        base (`AttentionEdit`, *optional*): a Replace or Refine to apply first (composition).
        Other arguments as :class:`AttentionEdit` (taken from `base` when it is given).
    """

    def __init__(
        self,
        tokenizer,
        prompts,
        num_steps,
        equalizer: torch.Tensor,
        base: AttentionEdit | None = None,
        **kwargs,
    ) -> None:
        if base is not None:
            kwargs = dict(
                cross_replace_steps=1.0, self_replace_steps=(0.0, 0.0), local_blend=base.local_blend
            )
        super().__init__(tokenizer, prompts, num_steps, **kwargs)
        if base is not None:
            self.cross_alphas, self.self_window = base.cross_alphas, base.self_window
            self.self_replace_max_side = base.self_replace_max_side
            base.local_blend = None  # this controller runs it
        self.base, self.equalizer = base, equalizer

    def replace_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            target = self.base.replace_cross(source, target)
        return target * self.equalizer.to(source)[:, None, None, :]

    def attach(self, unet) -> None:
        super().attach(unet)
        if self.base is not None:
            self.base.attach(unet)

    def begin(self, num_prompts: int, latent_hw: tuple[int, int]) -> None:
        super().begin(num_prompts, latent_hw)
        if self.base is not None:
            self.base.begin(num_prompts, latent_hw)


def equalizer(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], weights: dict[str, float]
) -> torch.Tensor:
    """(T, L) factors: `weights[word]` on the tokens of that word in each target, 1 elsewhere."""
    eq = torch.ones(len(prompts) - 1, tokenizer.model_max_length)
    for j, prompt in enumerate(prompts[1:]):
        for word, w in weights.items():
            eq[j, word_token_indices(tokenizer, prompt, word)] = w
    return eq


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


EDITS = ("replace", "refine")
"""The edits :func:`build_controller` makes: a word swap (:class:`Replace`) or a refinement
(:class:`Refine`)."""


def build_controller(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_steps: int,
    *,
    edit: str = "replace",
    cross_replace_steps: Steps | dict[str, Steps] = 0.8,
    self_replace_steps: Steps = 0.4,
    self_replace_max_side: int | None = None,
    blend_words: Sequence[Sequence[str]] | None = None,
    blend_threshold: float = 0.3,
    blend_resolution: int | None = None,
    reweight: dict[str, float] | None = None,
) -> AttentionEdit:
    """Build a Prompt-to-Prompt controller from plain settings: a :class:`Replace` or
    :class:`Refine`, with a :class:`LocalBlend` and a :class:`Reweight` on top when asked for.

    This is the one place where settings become a controller (the batch command, the ablation panel
    and the shapes-world recipes all call it).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the pipeline's tokenizer.
        prompts (`Sequence[str]`): source first, then targets.
        num_steps (`int`): DDIM steps of the inversion to edit.
        edit (`str`, defaults to ``"replace"``): ``"replace"`` (word swap, prompts aligned token for
            token) or ``"refine"`` (words added or changed).
        cross_replace_steps (`float`, `(start, end)` or `dict`, defaults to 0.8): when targets take
            the source's cross-attention, see :func:`cross_replace_alphas`.
        self_replace_steps (`float` or `(start, end)`, defaults to 0.4): when targets take the
            source's self-attention.
        self_replace_max_side (`int`, *optional*): only layers at most this large get self-attention
            injection; defaults to the map resolution (see :class:`AttentionEdit`).
        blend_words (`Sequence[Sequence[str]]`, *optional*): words per prompt (source first) for a
            :class:`LocalBlend`; none (or empty) for no blend.
        blend_threshold (`float`, defaults to 0.3): the blend mask's threshold.
        blend_resolution (`int`, *optional*): the map resolution the blend mask is built from;
            defaults to the controller's map resolution.
        reweight (`dict[str, float]`, *optional*): target word -> factor for a :class:`Reweight`
            wrapping the edit; none (or empty) for no re-weighting.

    Returns:
        `AttentionEdit`: the controller, to pass to :func:`edit`.

    Raises:
        ValueError: if `edit` is not one of :data:`EDITS`, or the prompts do not fit the edit (a
            replace whose target does not align token for token, a blend or reweight word that is
            not in its prompt).

    Example:

    ```py
    >>> ctrl = build_controller(
    ...     pipe.tokenizer,
    ...     ["a red circle on a white background", "a red square on a white background"],
    ...     50,
    ...     blend_words=[["circle"], ["square"]],
    ... )
    >>> out = edit(pipe, inversion, ctrl.prompts, ctrl)
    ```
    """
    if edit not in EDITS:
        raise ValueError(f"`edit` must be one of {EDITS}, got {edit!r}")
    prompts = list(prompts)
    local_blend = None
    if blend_words:
        local_blend = LocalBlend(
            blend_words, tokenizer, prompts, threshold=blend_threshold, resolution=blend_resolution
        )
    cls = Replace if edit == "replace" else Refine
    ctrl: AttentionEdit = cls(
        tokenizer,
        prompts,
        num_steps,
        cross_replace_steps=cross_replace_steps,
        self_replace_steps=self_replace_steps,
        self_replace_max_side=self_replace_max_side,
        local_blend=local_blend,
    )
    if reweight:
        eq = equalizer(tokenizer, prompts, reweight)
        ctrl = Reweight(tokenizer, prompts, num_steps, eq, base=ctrl)
    return ctrl


@dataclass
class EditOutput:
    """What :func:`edit` returns: images (source reconstruction first), their latents (P, C, h, w),
    the prompts, and the controller (its stored attention maps can be plotted)."""

    images: list[Image.Image]
    latents: torch.Tensor
    prompts: list[str]
    controller: AttentionStore


def edit(
    pipe: StableDiffusionPipeline,
    inversion: InversionResult,
    prompts: Sequence[str],
    controller: AttentionStore | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> EditOutput:
    """Edit an inverted image: sample the source and target prompts in one batch from z̄_T with the
    per-step null embeddings ∅_t and the controller installed.

    Args:
        pipe (`StableDiffusionPipeline`): the model the image was inverted with.
        inversion (`InversionResult`): from null-text (or another) inversion; its per-step
            conditional offsets, if any, are added to every prompt's embedding.
        prompts (`Sequence[str]`): the source prompt (should be the inversion's) and targets.
        controller (`AttentionStore`, *optional*): e.g. :class:`Replace`; a plain `AttentionStore`
            (the default) edits nothing and only records maps.
        guidance_scale (`float`, *optional*): defaults to the inversion's w.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        :class:`EditOutput`; ``images[0]`` is the source reconstruction.
    """
    check_compatible(inversion, pipe)
    prompts = list(prompts)
    controller = controller if controller is not None else AttentionStore()
    w = inversion.settings.guidance_scale if guidance_scale is None else guidance_scale
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, inversion.settings.num_steps)
    if isinstance(controller, AttentionEdit) and controller.num_steps != len(schedule):
        raise ValueError(
            f"controller built for {controller.num_steps} steps, inversion has {len(schedule)}"
        )
    dev = pipe.unet.device
    cond = embed_prompts(pipe, prompts)
    latents = inversion.latent_T.to(dev, pipe.unet.dtype).expand(len(prompts), -1, -1, -1).clone()
    nulls = [u.to(dev, pipe.unet.dtype) for u in inversion.uncond_per_step()]
    controller.begin(len(prompts), tuple(latents.shape[2:]))
    with controlled_attention(pipe.unet, controller):
        out = sample(
            pipe.unet,
            latents,
            cond,
            schedule,
            w,
            nulls,
            callback=controller.step_end,
            progress=progress,
            cond_offsets=inversion.cond_offsets_per_step(),
        )
    return EditOutput(latents_to_pil(pipe, out.latents), out.latents, prompts, controller)

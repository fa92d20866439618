"""Prompt-to-Prompt (Hertz et al. 2022) controllers; :mod:`nti_utils.editing` builds them from
settings and runs the edit.

Source and target prompts run in one batch from the same inverted latent z̄_T (prompt 0 is the source,
the rest are targets). Controllers change the targets' attention:

* :class:`Replace` (word swap): targets use the source's cross-attention maps.
* :class:`Refine` (words added or changed): aligned target tokens take the source's maps, new tokens
  keep their own.
* :class:`Reweight`: the source's maps (or those a wrapped Replace or Refine gives the target) with
  chosen words multiplied by a factor (the "equalizer"), as the original ``AttentionReweight``.
* all of them inject the source's *self*-attention for the first steps (fused, without
  materializing the self-attention maps).
* a :class:`~nti_utils.local_blend.LocalBlend` (its own module) restricts any of them to the
  region of chosen words.

Cross-attention replacement runs during a fraction (or a window, or per word) of the steps,
`cross_replace_steps`; self-attention injection during `self_replace_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from nti_utils.align import prompt_tokens, refine_alignment, replace_mapper, word_token_indices
from nti_utils.attention import (
    AttentionStore,
    LayerInfo,
)

if TYPE_CHECKING:
    from nti_utils.local_blend import LocalBlend

Steps = float | tuple[float, float]


def _finite_number(v: object) -> bool:
    """A real number (a Python, NumPy or 0-dim torch one; not a bool) that is finite."""
    if isinstance(v, (bool, str)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, RuntimeError):
        return False


def check_prompts(prompts: object, what: str = "prompts") -> list[str]:
    """`prompts` as a list of strings, source first; a `TypeError` for a single string (which
    would otherwise be read as one prompt per character) or non-string items, a `ValueError` for
    an empty list."""
    if isinstance(prompts, str):
        raise TypeError(
            f"{what} must be a list of prompts, source first and then the targets, got the string "
            f"{prompts!r}; pass [{prompts!r}] for the source alone or [source, target, ...]"
        )
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    for k, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{what}[{k}] must be a string, got {type(p).__name__} ({p!r})")
    if not prompts:
        raise ValueError(f"{what} must hold at least the source prompt, got []")
    return prompts


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
            e.g. ``{"default_": 0.8, "square": 0.4}``. A word applies to the targets it is in.

    Raises:
        ValueError: for a window outside [0, 1], or a per-word key that is in no target prompt (a
            typo would otherwise change nothing, silently).
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
        found = False
        for j, prompt in enumerate(prompts[1:]):
            try:
                idx = word_token_indices(tokenizer, prompt, word)
            except ValueError:  # not in this target
                continue
            found = True
            alphas[:, j, idx] = 0.0
            alphas[lo:hi, j, idx] = 1.0
        if not found:
            raise ValueError(
                f"cross_replace_steps has a window for {word!r}, which is not a word of any target "
                f"prompt {list(prompts[1:])}; its keys must be target words or 'default_'"
            )
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
        materialize_self (`bool`, defaults to `False`): inject self-attention by computing the
            probabilities and copying the source's to the targets (the original code's way). By
            default the injection runs fused, ``scaled_dot_product_attention(q_source, k_source,
            v_target)``, which gives the same output without the (Q, Q) maps (4096² per head and
            row at SD's 64x64 level); only cross-attention layers, which this controller edits and
            stores, hand over their probabilities.
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
        materialize_self: bool = False,
    ) -> None:
        super().__init__(cross=True, self_attention=False)
        prompts = check_prompts(prompts)
        if len(prompts) < 2:
            raise ValueError("an edit needs a source prompt and at least one target prompt")
        if local_blend is not None and list(local_blend.prompts) != prompts:
            raise ValueError(
                f"local_blend was built for the prompts {list(local_blend.prompts)}, the edit is "
                f"for {prompts}; build the LocalBlend with the edit's prompts"
            )
        self.prompts, self.num_steps = prompts, num_steps
        self.tokenizer = tokenizer
        self.cross_replace_steps, self.self_replace_steps = cross_replace_steps, self_replace_steps
        self.cross_alphas = cross_replace_alphas(tokenizer, prompts, num_steps, cross_replace_steps)
        self.self_window = _window(self_replace_steps, num_steps)
        self.self_replace_max_side = self_replace_max_side
        self.local_blend = local_blend
        self.materialize_self = bool(materialize_self)

    def attach(self, unet) -> None:
        super().attach(unet)
        if self.self_replace_max_side is None:
            self.self_replace_max_side = self.map_resolution

    def _injects_self(self, side: int) -> bool:
        lo, hi = self.self_window
        return lo <= self.cur_step < hi and side <= (self.self_replace_max_side or 0)

    def wants(self, info: LayerInfo) -> bool:
        if info.is_cross:  # edited and stored
            return True
        if not self.materialize_self:
            return False
        res = self.layer_resolution(info)
        return res is None or self._injects_self(max(res))

    def inject_self(self, info: LayerInfo, num_queries: int) -> bool:
        return not self.materialize_self and self._injects_self(max(self.resolution(num_queries)))

    def replace_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """source: (heads, Q, K), target: (T, heads, Q, K) -> new target maps (T, heads, Q, K)."""
        raise NotImplementedError

    def _edit_self(self, probs: torch.Tensor) -> torch.Tensor:
        if self._injects_self(max(self.resolution(probs.shape[2]))):
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


_BASE_SETTINGS = (
    "cross_replace_steps",
    "self_replace_steps",
    "self_replace_max_side",
    "local_blend",
    "materialize_self",
)


class Reweight(AttentionEdit):
    """Re-weighting, Prompt-to-Prompt's ``AttentionReweight``: the targets' cross-attention maps are
    the source's, scaled per token by the equalizer.

    * Without `base`: target maps = source maps × equalizer (the original with no previous
      controller, meant for a target that is the source prompt, e.g. ``["a smiling bunny doll"] *
      2``; the targets must therefore align token for token with the source).
    * With `base` (the original's ``prev_controller``): target maps = the maps `base` gives the
      target (``base.replace_cross``: a Replace's word swap, a Refine's alignment) × equalizer.

    In both, during the cross-replacement window the target's maps are that product (mixed per
    token as :func:`cross_replace_alphas` says), outside it the target's own, as in the original.

    Args:
        equalizer (`torch.Tensor`): (T, L) finite factors per target and token, see
            :func:`equalizer`.
        base (`AttentionEdit`, *optional*): a Replace or Refine for the same prompts and steps,
            whose mapping is applied first. Only its ``replace_cross`` is used; it is not changed.
        Other arguments as :class:`AttentionEdit`: this controller's own windows and LocalBlend
            (in the original they are ``AttentionReweight``'s arguments too). With a `base`, those
            not given default to the base's (its ``cross_replace_steps``, ``self_replace_steps``,
            ``self_replace_max_side`` and ``local_blend``), so ``Reweight(..., base=Refine(...,
            local_blend=lb))`` edits like the Refine, blended by ``lb``, plus the re-weighting.

    Raises:
        ValueError: for an equalizer that is not (T, L) or not finite, a base built for other
            prompts or steps, or (without a base) a target that does not align token for token with
            the source.
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
        prompts = check_prompts(prompts)
        if base is not None:
            if base.prompts != prompts or base.num_steps != num_steps:
                raise ValueError(
                    f"base was built for {base.prompts} and {base.num_steps} steps, the Reweight "
                    f"for {prompts} and {num_steps} steps; build both for the same edit"
                )
            kwargs = {**{k: getattr(base, k) for k in _BASE_SETTINGS}, **kwargs}
        super().__init__(tokenizer, prompts, num_steps, **kwargs)
        want = (len(prompts) - 1, tokenizer.model_max_length)
        if not isinstance(equalizer, torch.Tensor) or tuple(equalizer.shape) != want:
            got = tuple(equalizer.shape) if isinstance(equalizer, torch.Tensor) else equalizer
            raise ValueError(
                f"equalizer must be a tensor of shape {want} (targets, tokens; see `equalizer()`), "
                f"got {got!r}"
            )
        bad = (~torch.isfinite(equalizer)).nonzero().tolist()
        if bad:
            values = [equalizer[j, k].item() for j, k in bad[:5]]
            raise ValueError(
                f"equalizer factors must be finite, got {values} at (target, token) {bad[:5]}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )
        if base is None:
            n_source = len(prompt_tokens(tokenizer, prompts[0]))
            for p in prompts[1:]:
                if len(prompt_tokens(tokenizer, p)) != n_source:
                    raise ValueError(
                        "Reweight without a base gives each target the source's maps token for "
                        f"token, but {p!r} has {len(prompt_tokens(tokenizer, p)) - 2} tokens and "
                        f"the source {prompts[0]!r} {n_source - 2}; pass base=Refine(...) (or "
                        "Replace for a word swap)"
                    )
        self.base, self.equalizer = base, equalizer.detach().clone()

    def replace_cross(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            maps = self.base.replace_cross(source, target)
        else:
            maps = source[None].expand_as(target)
        return maps * self.equalizer.to(source)[:, None, None, :]

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
    """(T, L) factors: `weights[word]` on the tokens of that word in each target, 1 elsewhere.

    Raises:
        ValueError: for a factor that is not a finite number, or a word missing from a target.
    """
    prompts = check_prompts(prompts)
    for word, w in weights.items():
        if not _finite_number(w):
            raise ValueError(f"re-weighting factor of {word!r} must be a finite number, got {w!r}")
    eq = torch.ones(len(prompts) - 1, tokenizer.model_max_length)
    for j, prompt in enumerate(prompts[1:]):
        for word, w in weights.items():
            eq[j, word_token_indices(tokenizer, prompt, word)] = w
    return eq

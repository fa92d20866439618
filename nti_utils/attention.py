"""Attention hooks through diffusers' attention-processor API, and the attention store.

Prompt-to-Prompt's one good idea: a *controller* object sees the attention probabilities of every
attention layer and returns the ones to use. Here it is installed only through
``unet.set_attn_processor`` inside :func:`controlled_attention`, which restores the original
processors on exit, and the processor always uses what the controller returns.

Layers are described by :class:`LayerInfo`, read from the model (processor names), and the spatial
resolution of a layer is worked out at run time from its query length and the latents' shape, so no
16x16, 77 or layer count is assumed anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class LayerInfo:
    """Where an attention layer sits.

    Attributes:
        name (`str`): the processor's key in ``unet.attn_processors``.
        place (`str`): ``"down"``, ``"mid"`` or ``"up"``.
        is_cross (`bool`): cross-attention (queries: pixels, keys: text tokens) or self-attention.
        scale (`int`, *optional*): the layer's feature map is the latents' size divided by this
            (1 at the finest level, 2 one level down, ...), read from the block it sits in (every
            down block but the last halves the size, as in SD); see
            :meth:`AttentionController.layer_resolution`. None when unknown.
    """

    name: str
    place: str
    is_cross: bool
    scale: int | None = None


def _layer_scale(unet: UNet2DConditionModel, name: str) -> int | None:
    parts = name.split(".")
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    if parts[0] == "mid_block":
        return 2 ** (n_down - 1)
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 and parts[1].isdigit():
        i = int(parts[1])
        return 2**i if parts[0] == "down_blocks" else 2 ** (n_up - 1 - i)
    return None


def layer_infos(unet: UNet2DConditionModel) -> dict[str, LayerInfo]:
    """:class:`LayerInfo` for every attention processor of `unet`, by name."""
    out = {}
    for name in unet.attn_processors:
        # "down_blocks.1....", "mid_block....", "up_blocks.2....": the first part says where (the
        # "_blocks" of "transformer_blocks" further on must not be read as the place)
        place = name.split(".")[0].removesuffix("_blocks").removesuffix("_block")
        module = unet.get_submodule(name.removesuffix(".processor"))
        scale = _layer_scale(unet, name)
        out[name] = LayerInfo(name, place, bool(module.is_cross_attention), scale)
    return out


def _n_transformer_blocks(block: torch.nn.Module | None) -> int:
    return sum(len(a.transformer_blocks) for a in getattr(block, "attentions", None) or [])


def cross_attention_resolutions(unet: UNet2DConditionModel) -> dict[str, list[int]]:
    """Side (in latent pixels) of the feature maps of each transformer layer, by place, for the
    UNet's own sample size: e.g. ``{"down": [64, 64, 32, 32, 16, 16], "mid": [8], "up": [16, 16, 16,
    32, 32, 32, 64, 64, 64]}`` for SD 1.x. Every down block but the last halves the size."""
    size = int(unet.config.sample_size)
    n_down = len(unet.down_blocks)
    mid = size // 2 ** (n_down - 1)
    return {
        "down": [
            size // 2**i
            for i, b in enumerate(unet.down_blocks)
            for _ in range(_n_transformer_blocks(b))
        ],
        "mid": [mid] * _n_transformer_blocks(unet.mid_block),
        "up": [
            mid * 2**i
            for i, b in enumerate(unet.up_blocks)
            for _ in range(_n_transformer_blocks(b))
        ],
    }


def default_map_resolution(unet: UNet2DConditionModel) -> int:
    """The resolution Prompt-to-Prompt reads cross-attention maps at: the coarsest cross-attention
    level outside the mid block (16 for SD's 64x64 latents, as in the paper; 8 for the embedded
    model's 16x16 latents)."""
    res = cross_attention_resolutions(unet)
    levels = res["down"] + res["up"] or res["mid"]
    if not levels:
        raise ValueError("this UNet has no cross-attention layers")
    return min(levels)


def finest_map_resolution(unet: UNet2DConditionModel) -> int:
    """The finest cross-attention level (64 for SD 1.x, 16 for the embedded model: its latent's
    own size)."""
    res = cross_attention_resolutions(unet)
    levels = res["down"] + res["mid"] + res["up"]
    if not levels:
        raise ValueError("this UNet has no cross-attention layers")
    return max(levels)


class AttentionController:
    """Base controller: sees attention probabilities and returns those to use (here, unchanged).

    Subclasses override :meth:`wants` (which layers need explicit probabilities; the others run
    fused scaled-dot-product attention), :meth:`__call__`, :meth:`step_end`, and
    :meth:`inject_self` (self-attention layers where the targets take the source's attention
    without materializing it).

    The sampler tells the controller about a run with :meth:`begin` and after each step calls
    :meth:`step_end`; ``self.cur_step`` is the index of the step being computed.
    """

    def __init__(self) -> None:
        self.cur_step = 0
        self.num_prompts = 1
        self.latent_hw: tuple[int, int] = (0, 0)
        self.map_resolution: int | None = None

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Called by :func:`controlled_attention` on installation: read what the controller needs
        from the model (here the resolution maps are read at, :func:`default_map_resolution`)."""
        self.map_resolution = default_map_resolution(unet)

    def begin(self, num_prompts: int, latent_hw: tuple[int, int]) -> None:
        """Start a sampling run of `num_prompts` prompts with latents of spatial size `latent_hw`."""
        self.cur_step, self.num_prompts, self.latent_hw = 0, num_prompts, tuple(latent_hw)

    def wants(self, info: LayerInfo) -> bool:
        """Whether the layer must hand its probabilities to :meth:`__call__` at this step (costly:
        (B, heads, Q, K) floats, e.g. 4096² per head for SD's 64x64 self-attention)."""
        return False

    def inject_self(self, info: LayerInfo, num_queries: int) -> bool:
        """Whether, in this self-attention layer at this step (and when :meth:`wants` is False),
        the target rows of the conditional branch attend with the source's attention: their
        output is then ``softmax(Q_s K_sᵀ / √d) V_t``, computed fused as
        ``scaled_dot_product_attention(q_source, k_source, v_target)``."""
        return False

    def __call__(self, probs: torch.Tensor, info: LayerInfo) -> torch.Tensor:
        """probs: (B, heads, Q, K) -> the probabilities to use, same shape."""
        return probs

    def layer_resolution(self, info: LayerInfo) -> tuple[int, int] | None:
        """(h, w) of a layer's feature map for this run's latents, from ``info.scale`` (None when
        the scale is unknown or no run has begun)."""
        if info.scale is None or not all(self.latent_hw):
            return None
        h, w = self.latent_hw
        return -(-h // info.scale), -(-w // info.scale)

    def step_end(self, i: int, t: int, latents: torch.Tensor) -> torch.Tensor | None:
        """Called by the sampler after step `i`; may return replacement latents."""
        self.cur_step = i + 1
        return None

    def resolution(self, num_queries: int) -> tuple[int, int]:
        """(h, w) of a layer's feature map from its query count and the latents' shape."""
        h, w = self.latent_hw
        f = math.isqrt(h * w // num_queries)
        return h // f, w // f

    def cond_slice(self, batch: int) -> slice:
        """Rows of a UNet batch that hold the prompts' conditional branch: the second half when the
        sampler batches [∅; C] for guidance, all rows otherwise."""
        if batch == 2 * self.num_prompts:
            return slice(self.num_prompts, batch)
        if batch == self.num_prompts:
            return slice(0, batch)
        raise ValueError(f"batch of {batch} does not fit {self.num_prompts} prompts; call begin()")


class ControlledAttnProcessor:
    """Attention processor that hands probabilities to a controller for the layers it wants, and
    runs fused scaled-dot-product attention for the others. Same arithmetic as diffusers'
    `AttnProcessor` / `AttnProcessor2_0` otherwise."""

    def __init__(self, controller: AttentionController, info: LayerInfo) -> None:
        self.controller, self.info = controller, info

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, N, heads * d) -> (B, heads, N, d)
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if self.controller.wants(self.info):
            mask = (
                attention_mask.view(batch, attn.heads, -1, seq_len)
                if attention_mask is not None
                else None
            )
            scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1).to(query.dtype)  # (B, heads, Q, K)
            probs = self.controller(probs, self.info)
            out = probs @ value
        else:
            if not self.info.is_cross and self.controller.inject_self(self.info, query.shape[2]):
                query, key = _source_for_targets(query, key, self.controller.cond_slice(batch))
            if attention_mask is not None:
                attention_mask = attention_mask.view(
                    batch, attn.heads, -1, attention_mask.shape[-1]
                )
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _source_for_targets(
    query: torch.Tensor, key: torch.Tensor, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (B, heads, N, d) where the target rows of `rows` (all but its first, the
    source) hold the source's: attention with them and the rows' own values gives each target
    ``softmax(Q_s K_sᵀ / √d) V_t``, the source's self-attention applied to the target's values."""
    src, lo, hi = rows.start, rows.start + 1, rows.stop
    query, key = query.clone(), key.clone()
    query[lo:hi] = query[src : src + 1]
    key[lo:hi] = key[src : src + 1]
    return query, key


@contextmanager
def controlled_attention(
    unet: UNet2DConditionModel, controller: AttentionController
) -> Iterator[AttentionController]:
    """Install `controller` on every attention layer of `unet`; restore the original processors on
    exit (also when an exception is raised).

    Example:
        >>> with controlled_attention(pipe.unet, AttentionStore()) as store:
        ...     sample(pipe.unet, ..., callback=store.step_end)
    """
    originals = unet.attn_processors
    infos = layer_infos(unet)
    controller.attach(unet)
    unet.set_attn_processor({n: ControlledAttnProcessor(controller, i) for n, i in infos.items()})
    try:
        yield controller
    finally:
        restore_attention(unet, originals)


def restore_attention(unet: UNet2DConditionModel, processors: dict) -> None:
    """Put back processors saved from ``unet.attn_processors``."""
    unet.set_attn_processor(dict(processors))


class AttentionStore(AttentionController):
    """Records attention maps of the conditional branch, summed over steps and averaged over heads.

    Args:
        cross (`bool`, defaults to `True`): record cross-attention maps.
        self_attention (`bool`, defaults to `False`): also record self-attention maps (large).
        max_side (`int`, *optional*): skip layers whose feature maps are larger than this.

    After a run, :meth:`maps` averages them over steps and layers for one resolution.
    """

    def __init__(
        self, cross: bool = True, self_attention: bool = False, max_side: int | None = None
    ):
        super().__init__()
        self.cross, self.self_attention, self.max_side = cross, self_attention, max_side
        self.sums: dict[tuple[str, bool, tuple[int, int]], torch.Tensor] = {}
        self.counts: dict[tuple[str, bool, tuple[int, int]], int] = {}
        self.steps = 0

    def begin(self, num_prompts: int, latent_hw: tuple[int, int]) -> None:
        super().begin(num_prompts, latent_hw)
        self.sums, self.counts, self.steps = {}, {}, 0

    def wants(self, info: LayerInfo) -> bool:
        if not (self.cross if info.is_cross else self.self_attention):
            return False
        res = self.layer_resolution(info)
        return self.max_side is None or res is None or max(res) <= self.max_side

    def __call__(self, probs: torch.Tensor, info: LayerInfo) -> torch.Tensor:
        if self.cross if info.is_cross else self.self_attention:
            res = self.resolution(probs.shape[2])
            if self.max_side is None or max(res) <= self.max_side:
                key = (info.place, info.is_cross, res)
                m = probs[self.cond_slice(probs.shape[0])].float().mean(1).detach()  # (P, Q, K)
                self.sums[key] = self.sums.get(key, 0) + m
                self.counts[key] = self.counts.get(key, 0) + 1
        return probs

    def step_end(self, i: int, t: int, latents: torch.Tensor) -> torch.Tensor | None:
        self.steps += 1
        return super().step_end(i, t, latents)

    def resolutions(self, is_cross: bool = True) -> list[tuple[int, int]]:
        """Resolutions recorded, largest first."""
        return sorted({k[2] for k in self.sums if k[1] == is_cross}, reverse=True)

    def maps(
        self,
        resolution: int | tuple[int, int],
        is_cross: bool = True,
        places: tuple[str, ...] = ("down", "mid", "up"),
    ) -> torch.Tensor:
        """Average maps at one resolution over steps, layers and heads.

        Returns:
            `torch.Tensor`: (P, h, w, K) for cross-attention (K text tokens; sums to 1 over K), or
            (P, h, w, h*w) for self-attention, P the number of prompts.
        """
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        keys = [k for k in self.sums if k[1] == is_cross and k[2] == res and k[0] in places]
        if not keys:
            raise ValueError(
                f"no {'cross' if is_cross else 'self'}-attention maps at {res}; recorded: "
                f"{self.resolutions(is_cross)}"
            )
        total = sum(self.sums[k] for k in keys) / sum(self.counts[k] for k in keys)
        return total.reshape(total.shape[0], *res, total.shape[-1])

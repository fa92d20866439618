"""SDXL's extra conditioning carried inside the text-embedding tensor.

Stable Diffusion XL's UNet takes, besides the token embeddings (B, L, D), a pooled text embedding
(B, P) and six "time ids" (B, 6): ``(original height, original width, crop top, crop left, target
height, target width)``, as ``added_cond_kwargs`` (``addition_embed_type="text_time"``). So that every
part of the library that concatenates, expands, slices, stores or optimizes embedding tensors keeps
handling *one* tensor, SDXL's conditioning is one tensor of L + 1 rows:

* rows ``0 .. L-1``: the token embeddings (the keys and values of cross-attention);
* row ``L`` (the "row token"): ``[pooled (P numbers), time ids (6 numbers), zeros]``.

:func:`pack` builds it (:func:`~nti_utils.models.embed_prompts` does for an SDXL pipeline) and
:func:`unpack` splits it for the UNet (:func:`~nti_utils.ddim.predict_noise`, the library's only UNet
call). The row is detached when it is split off, so an optimization of the embedding (null-text
inversion's ∅_t, the "optimize C" ablation) moves the token embeddings only: the pooled embedding
and the time ids stay what the text encoder and the image size made them.

Whether a UNet is SDXL-conditioned, and P, are read from its config
(:func:`added_cond_layout`), never assumed. SD 1.x/2.x UNets have no row token: their conditioning
is the token embeddings alone and :func:`unpack` returns it unchanged.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

NUM_TIME_IDS = 6
"""SDXL's time ids: original size (h, w), crop top-left (top, left), target size (h, w)."""


def added_cond_layout(unet: UNet2DConditionModel) -> int | None:
    """P, the size of the pooled text embedding the UNet takes, or None for a UNet without SDXL's
    added conditioning.

    Read from the UNet's config: ``addition_embed_type == "text_time"`` marks SDXL's conditioning;
    ``projection_class_embeddings_input_dim`` is ``P + NUM_TIME_IDS * addition_time_embed_dim`` (the
    input of the UNet's ``add_embedding``).

    Args:
        unet (`UNet2DConditionModel`): the noise predictor.

    Returns:
        `int` P (1280 for SDXL base; whatever the config says), or `None`.

    Raises:
        ValueError: for a ``"text_time"`` config whose sizes do not leave a positive P (a refiner
            with aesthetic scores, 5 time ids, is not supported).
    """
    cfg = unet.config
    if cfg.get("addition_embed_type") != "text_time":
        return None
    total = cfg.get("projection_class_embeddings_input_dim")
    per_id = cfg.get("addition_time_embed_dim")
    if not total or not per_id or total - NUM_TIME_IDS * per_id <= 0:
        raise ValueError(
            "the UNet has addition_embed_type='text_time' but its config gives no room for a pooled "
            f"embedding and {NUM_TIME_IDS} time ids (projection_class_embeddings_input_dim={total}, "
            f"addition_time_embed_dim={per_id}); only SDXL base-style UNets are supported"
        )
    return int(total - NUM_TIME_IDS * per_id)


def extra_rows(unet: UNet2DConditionModel) -> int:
    """Rows the conditioning tensor has beyond the L token embeddings: 1 for an SDXL-conditioned
    UNet (the row token), 0 otherwise."""
    return 0 if added_cond_layout(unet) is None else 1


def pack(tokens: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's conditioning as one tensor: the token embeddings and one row token.

    Args:
        tokens (`torch.Tensor`): token embeddings, (B, L, D).
        pooled (`torch.Tensor`): pooled text embeddings, (B, P).
        time_ids (`torch.Tensor`): (B, NUM_TIME_IDS) or (1, NUM_TIME_IDS) (shared by the batch).

    Returns:
        `torch.Tensor`: (B, L + 1, D) in `tokens`' dtype and device; the last row is ``[pooled,
        time_ids, 0...]``.

    Raises:
        ValueError: if P + NUM_TIME_IDS > D (the row token cannot hold them), or batch sizes differ.
    """
    b, _, d = tokens.shape
    p = pooled.shape[-1]
    if p + NUM_TIME_IDS > d:
        raise ValueError(
            f"the pooled embedding ({p} numbers) and {NUM_TIME_IDS} time ids do not fit in one row "
            f"of the {d}-wide token embeddings; this model's conditioning cannot be packed"
        )
    if pooled.shape[0] != b:
        raise ValueError(f"{pooled.shape[0]} pooled embeddings for {b} prompts")
    row = tokens.new_zeros(b, 1, d)
    row[:, 0, :p] = pooled.to(tokens)
    row[:, 0, p : p + NUM_TIME_IDS] = time_ids.to(tokens).expand(b, -1)
    return torch.cat([tokens, row], dim=1)


def unpack(
    unet: UNet2DConditionModel, emb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Split a conditioning tensor into what the UNet's forward takes.

    Args:
        unet (`UNet2DConditionModel`): says (:func:`added_cond_layout`) whether `emb` has a row
            token.
        emb (`torch.Tensor`): (B, L', D): L' = L for SD 1.x/2.x, L + 1 for SDXL (:func:`pack`).

    Returns:
        ``(encoder_hidden_states, added_cond_kwargs)``: the token embeddings (B, L, D) and, for
        SDXL, ``{"text_embeds": (B, P), "time_ids": (B, NUM_TIME_IDS)}`` cut from the (detached)
        row token; `None` otherwise.
    """
    p = added_cond_layout(unet)
    if p is None:
        return emb, None
    row = emb[:, -1].detach()
    return emb[:, :-1], {"text_embeds": row[:, :p], "time_ids": row[:, p : p + NUM_TIME_IDS]}

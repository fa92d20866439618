"""Null-text inversion (Mokady et al. 2023, Algorithm 1), negative-prompt inversion (Miyake et al.
2023), plain DDIM inversion as a baseline, and safetensors save/load of their results.

All three return an :class:`InversionResult`: the starting latent z̄_T and one null embedding ∅_t per
sampling step, so that ``reconstruct(pipe, result)`` (or a Prompt-to-Prompt edit) re-samples the image
with guidance w using ∅_t at step t.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from nti_utils.ddim import DDIMSchedule, ddim_step, guide, invert, predict_noise, sample
from nti_utils.images import ImageLike, image_to_latents
from nti_utils.models import embed_prompts, model_fingerprint, model_id, scheduler_hash

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class InversionSettings:
    """Settings of an inversion (defaults: the paper's).

    Attributes:
        num_steps (`int`, defaults to 50): DDIM steps N.
        guidance_scale (`float`, defaults to 7.5): w used when editing/reconstructing.
        inner_steps (`int`, defaults to 10): at most this many Adam steps per timestep.
        lr (`float`, defaults to 1e-2): Adam's learning rate at the first timestep; at step index i
            it is ``lr * (1 - i / 100)``.
        epsilon (`float`, defaults to 1e-5): early stop when the latent MSE falls below
            ``epsilon + i * epsilon_growth`` at step index i.
        epsilon_growth (`float`, defaults to 2e-5): see `epsilon`.
        per_timestep (`bool`, defaults to `True`): one null embedding per timestep (the paper's
            method); False keeps optimizing a single embedding through all timesteps and uses the
            final one everywhere (the paper's "global null embedding" ablation).
        optimize (`str`, defaults to ``"null"``): which embedding Algorithm 1 optimizes: ``"null"``
            (∅_t, the paper's method) or ``"cond"`` (the source prompt's C_t with ∅ fixed, the
            paper's textual-inversion-style ablation; the result then holds per-step offsets
            ``C_t - C`` that reconstruction and editing add to every prompt's embedding).
    """

    num_steps: int = 50
    guidance_scale: float = 7.5
    inner_steps: int = 10
    lr: float = 1e-2
    epsilon: float = 1e-5
    epsilon_growth: float = 2e-5
    per_timestep: bool = True
    optimize: str = "null"

    def __post_init__(self) -> None:
        if self.optimize not in ("null", "cond"):
            raise ValueError(f"optimize must be 'null' or 'cond', got {self.optimize!r}")


@dataclass
class InversionResult:
    """An inverted image, ready to be reconstructed or edited.

    Attributes:
        latent_T (`torch.Tensor`): z̄_T, (1, C, h, w).
        null_embeddings (`torch.Tensor`): ∅_t for each sampling step, (N, 1, L, D), in sampling order
            (first row for t = T).
        prompt (`str`): the source prompt P whose embedding C was used.
        method (`str`): ``"null-text"``, ``"negative-prompt"``, ``"ddim"``, ``"cond-text"`` (C_t
            optimized instead of ∅_t), ``"null-text-fast"``
            (:mod:`~nti_utils.fast_inversion`) or ``"null-text-reference"`` (the benchmark's
            reference loop, :func:`~nti_utils.bench.reference_null_text_inversion`).
        settings (`InversionSettings`): what was used.
        losses (`list[list[float]]`): per step, the latent MSE at each evaluation (before each Adam
            update, and once more after the last one); empty for methods without optimization.
        inner_steps (`list[int]`): per step, the Adam updates made (``len(losses[i]) - 1``).
        timings (`dict[str, float]`): seconds spent in each phase.
        model_id (`str`), model_fingerprint (`str`), scheduler_hash (`str`): model identity.
        pivots (`list[torch.Tensor]`): the w = 1 DDIM trajectory z*_0..z*_N (not saved to disk).
        step_errors (`list[float]`): per step, MSE between z̄_{t-1} and the pivot z*_{t-1}
            (null-text inversion only; not saved).
        unet_calls (`dict[str, int]`): UNet forward and backward passes of the optimization.
        cond_offsets (`torch.Tensor`, *optional*): ``C_t - C`` per sampling step, (N, 1, L, D), when
            the conditional embedding was optimized (``settings.optimize == "cond"``); added to the
            embedding of every prompt at step t when reconstructing or editing. `None` otherwise.
    """

    latent_T: torch.Tensor
    null_embeddings: torch.Tensor
    prompt: str
    method: str
    settings: InversionSettings
    losses: list[list[float]] = field(default_factory=list)
    inner_steps: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model_id: str = ""
    model_fingerprint: str = ""
    scheduler_hash: str = ""
    pivots: list[torch.Tensor] = field(default_factory=list, repr=False)
    step_errors: list[float] = field(default_factory=list)
    unet_calls: dict[str, int] = field(default_factory=dict)
    cond_offsets: torch.Tensor | None = None

    def uncond_per_step(self) -> list[torch.Tensor]:
        """The null embeddings as a list of (1, L, D) tensors, one per sampling step."""
        return list(self.null_embeddings)

    def cond_offsets_per_step(self) -> list[torch.Tensor] | None:
        """The conditional offsets as a list of (1, L, D) tensors, or `None` if there are none."""
        return None if self.cond_offsets is None else list(self.cond_offsets)


def _prepare(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings,
    progress: bool,
) -> tuple[DDIMSchedule, torch.Tensor, torch.Tensor, list[torch.Tensor], dict[str, float]]:
    """Shared first steps: schedule, C, ∅ and the guidance-1 DDIM trajectory (the pivots)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    z0 = image if isinstance(image, torch.Tensor) else image_to_latents(pipe, image)
    if z0.dim() != 4 or z0.shape[0] != 1:
        raise ValueError(
            f"invert one image at a time: latents must be (1, C, h, w), got {tuple(z0.shape)}"
        )
    z0 = z0.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, settings.num_steps)
    cond, null = embed_prompts(pipe, [prompt, ""]).chunk(2)
    timings["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pivots = invert(pipe.unet, z0, cond, schedule, guidance_scale=1.0, progress=progress)
    timings["ddim_inversion"] = time.perf_counter() - t0
    return schedule, cond, null, pivots, timings


def _result(
    pipe, method, prompt, settings, latent_T, nulls, pivots, timings, losses=None, counts=None
) -> InversionResult:
    return InversionResult(
        latent_T=latent_T.detach(),
        null_embeddings=torch.stack([n.detach() for n in nulls]),
        prompt=prompt,
        method=method,
        settings=settings,
        losses=losses or [],
        inner_steps=counts or [],
        timings=timings,
        model_id=model_id(pipe),
        model_fingerprint=model_fingerprint(pipe),
        scheduler_hash=scheduler_hash(pipe.scheduler),
        pivots=pivots,
    )


def ddim_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
) -> InversionResult:
    """Plain DDIM inversion at w = 1, packaged with ∅ = encoder("") at every step: reconstructing it
    at w = `settings.guidance_scale` shows how guidance amplifies the inversion error."""
    schedule, cond, null, pivots, timings = _prepare(pipe, image, prompt, settings, progress)
    return _result(
        pipe, "ddim", prompt, settings, pivots[-1], [null] * len(schedule), pivots, timings
    )


def negative_prompt_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    progress: bool = True,
) -> InversionResult:
    """Negative-prompt inversion (Miyake et al. 2023): ∅_t := C at every step, no optimization.

    With ∅_t = C the guidance term vanishes, so sampling retraces the w = 1 DDIM trajectory."""
    schedule, cond, _, pivots, timings = _prepare(pipe, image, prompt, settings, progress)
    return _result(
        pipe,
        "negative-prompt",
        prompt,
        settings,
        pivots[-1],
        [cond] * len(schedule),
        pivots,
        timings,
    )


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Turn off `requires_grad` on a module's weights for the block (gradients then flow to the
    inputs only, which is all null-text optimization needs), restoring the flags afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def null_text_inversion(
    pipe: StableDiffusionPipeline,
    image: ImageLike | torch.Tensor,
    prompt: str,
    settings: InversionSettings = InversionSettings(),
    start_latent: torch.Tensor | None = None,
    progress: bool = True,
) -> InversionResult:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1).

    ``settings.optimize == "cond"`` runs the same loop on the source prompt's embedding C_t instead,
    with ∅ = encoder("") fixed (the paper's textual-inversion-style ablation, method ``"cond-text"``).

    Args:
        pipe (`StableDiffusionPipeline`): from :func:`~nti_utils.models.load_pipeline`.
        image (image-like or `torch.Tensor`): a real image (loaded and resized to the model's
            resolution) or its latents z_0, (1, C, h, w).
        prompt (`str`): the source prompt P describing the image.
        settings (`InversionSettings`): defaults are the paper's; ``per_timestep=False`` optimizes
            one global null embedding instead (the paper's ablation).
        start_latent (`torch.Tensor`, *optional*): start from this z̄_T instead of the pivot z*_T
            (the paper's "random pivot" ablation passes Gaussian noise). The targets stay the pivots.
        progress (`bool`, defaults to `True`): show tqdm bars.

    Returns:
        :class:`InversionResult` with method ``"null-text"`` (``"cond-text"`` with
        ``settings.optimize == "cond"``).

    Per timestep the UNet runs once for ε(z̄_t, t, C) and once per inner step for ε(z̄_t, t, ∅_t)
    with a backward pass to ∅_t only (the weights are frozen). The loss is checked *before* each
    Adam update: when it is below the threshold, that forward pass already gives z̄_{t-1} and no
    extra UNet call is needed; otherwise, after the last update, one more forward pass does.
    """
    s = settings
    # 1. pivots z*_0..z*_N from DDIM inversion at w = 1
    schedule, cond, null, pivots, timings = _prepare(pipe, image, prompt, s, progress)
    unet = pipe.unet
    t0 = time.perf_counter()
    latent = pivots[-1] if start_latent is None else start_latent.to(pivots[-1])  # z̄_T
    opt_cond = s.optimize == "cond"
    fixed, null_t = (null, cond) if opt_cond else (cond, null)  # null_t: the embedding optimized
    null_t = null_t.detach().clone()  # ∅ initialized from encoder("") (or C from encoder(P))
    nulls, losses, counts, errors = [], [], [], []
    calls = {"forward": 0, "backward": 0}
    n = len(schedule)
    # 2. for t = T..1, optimize ∅_t so that the guided step from z̄_t lands on the pivot z*_{t-1}
    with frozen(unet):
        for i in tqdm(range(n), desc="null-text optimization", disable=not progress):
            t = schedule.timesteps[i]
            alpha_t, alpha_prev = schedule.alphas(i)
            target = pivots[n - 1 - i].float()
            threshold = s.epsilon + i * s.epsilon_growth
            with torch.no_grad():
                eps_fixed = predict_noise(unet, latent, t, fixed)  # ε(z̄_t, t, C): once per step
                # (ε(z̄_t, t, ∅) when C is the one optimized)
            calls["forward"] += 1
            null_t = null_t.detach().clone().requires_grad_(True)  # ∅_t starts from ∅_{t+1}
            opt = torch.optim.Adam([null_t], lr=s.lr * (1.0 - i / 100.0))
            step_losses: list[float] = []
            z_next = None
            for k in range(s.inner_steps + 1):
                eps_var = predict_noise(unet, latent, t, null_t)  # ε(z̄_t, t, ∅_t)
                calls["forward"] += 1
                eps_u, eps_c = (eps_fixed, eps_var) if opt_cond else (eps_var, eps_fixed)
                z_prev = ddim_step(
                    latent, guide(eps_u, eps_c, s.guidance_scale), alpha_t, alpha_prev
                )
                loss = F.mse_loss(z_prev.float(), target)
                step_losses.append(loss.item())
                if step_losses[-1] < threshold or k == s.inner_steps:
                    z_next = z_prev.detach()  # 3. z̄_{t-1} with the current ∅_t, no extra call
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                calls["backward"] += 1
                opt.step()
            latent = z_next
            errors.append(F.mse_loss(latent.float(), target).item())
            nulls.append(null_t.detach())
            losses.append(step_losses)
            counts.append(len(step_losses) - 1)  # Adam updates
    if not s.per_timestep:
        nulls = [nulls[-1]] * n
    offsets = None
    if opt_cond:
        offsets = torch.stack([c - cond for c in nulls]).detach()
        nulls = [null] * n
    timings["optimization"] = time.perf_counter() - t0
    result = _result(pipe, "cond-text" if opt_cond else "null-text", prompt, s,
                     latent_T=pivots[-1] if start_latent is None else start_latent, nulls=nulls,
                     pivots=pivots, timings=timings, losses=losses, counts=counts)  # fmt: skip
    result.step_errors, result.unet_calls, result.cond_offsets = errors, calls, offsets
    return result


def reconstruct(
    pipe: StableDiffusionPipeline,
    result: InversionResult,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Re-sample the inverted image: latents z_0 (1, C, h, w) from z̄_T with ∅_t at step t.

    Args:
        guidance_scale (`float`, *optional*): defaults to the result's own w.
    """
    check_compatible(result, pipe)
    w = result.settings.guidance_scale if guidance_scale is None else guidance_scale
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, result.settings.num_steps)
    cond = embed_prompts(pipe, result.prompt)
    dev = pipe.unet.device
    nulls = [u.to(dev) for u in result.uncond_per_step()]
    out = sample(pipe.unet, result.latent_T.to(dev), cond, schedule, w, nulls, progress=progress,
                 cond_offsets=result.cond_offsets_per_step())  # fmt: skip
    return out.latents


# ------------------------------------------------------------------------------ save / load
def check_compatible(result: InversionResult, pipe: StableDiffusionPipeline) -> None:
    """Raise a `ValueError` if `result` was made with another model or scheduler."""
    problems = []
    if result.model_fingerprint and result.model_fingerprint != model_fingerprint(pipe):
        problems.append(
            f"it was made with model {result.model_id!r} (fingerprint {result.model_fingerprint}), "
            f"this pipeline is {model_id(pipe)!r} ({model_fingerprint(pipe)})"
        )
    if result.scheduler_hash and result.scheduler_hash != scheduler_hash(pipe.scheduler):
        problems.append("its scheduler settings differ from this pipeline's")
    shape = tuple(result.null_embeddings.shape[-2:])
    want = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    if shape != want:
        problems.append(f"its null embeddings are {shape}, this model's are {want}")
    if problems:
        raise ValueError(
            "this inversion does not match the pipeline: "
            + "; ".join(problems)
            + ". Load the model it was made with, or invert the image again with this one."
        )


def save_inversion(result: InversionResult, path: str | Path, overwrite: bool = False) -> Path:
    """Write `result` to a `.safetensors` file with its settings and model identity as metadata.

    Raises:
        FileExistsError: if `path` exists and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    n = max((len(x) for x in result.losses), default=0)
    losses = torch.full((len(result.losses), n), float("nan"))
    for i, row in enumerate(result.losses):
        losses[i, : len(row)] = torch.tensor(row)
    tensors = {
        "latent_T": result.latent_T.detach().cpu().contiguous(),
        "null_embeddings": result.null_embeddings.detach().cpu().contiguous(),
        "losses": losses,
        "inner_steps": torch.tensor(result.inner_steps, dtype=torch.int64),
    }
    if result.cond_offsets is not None:
        tensors["cond_offsets"] = result.cond_offsets.detach().cpu().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "prompt": result.prompt,
        "method": result.method,
        "settings": json.dumps(asdict(result.settings)),
        "timings": json.dumps(result.timings),
        "model_id": result.model_id,
        "model_fingerprint": result.model_fingerprint,
        "scheduler_hash": result.scheduler_hash,
        "num_steps": str(result.settings.num_steps),
        "guidance_scale": str(result.settings.guidance_scale),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    _sort_header(tmp)
    tmp.replace(path)
    return path


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header as sorted JSON (safetensors writes its metadata in a random
    order), so that saving the same result twice gives the same bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


def load_inversion(
    path: str | Path,
    pipe: StableDiffusionPipeline | None = None,
    num_steps: int | None = None,
) -> InversionResult:
    """Read a result written by :func:`save_inversion`.

    Args:
        pipe (`StableDiffusionPipeline`, *optional*): if given, the result must match its model and
            scheduler (else `ValueError`), and tensors are moved to its device and dtype.
        num_steps (`int`, *optional*): if given, the result must have this many DDIM steps.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved inversion at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not an nti_utils inversion (format {meta.get('format_version')})"
        )
    tensors = load_file(str(path))
    settings = InversionSettings(**json.loads(meta["settings"]))
    losses = [[v for v in row.tolist() if v == v] for row in tensors["losses"]]
    result = InversionResult(
        latent_T=tensors["latent_T"],
        null_embeddings=tensors["null_embeddings"],
        prompt=meta["prompt"],
        method=meta["method"],
        settings=settings,
        losses=losses,
        inner_steps=tensors["inner_steps"].tolist(),
        timings=json.loads(meta["timings"]),
        model_id=meta["model_id"],
        model_fingerprint=meta["model_fingerprint"],
        scheduler_hash=meta["scheduler_hash"],
        cond_offsets=tensors.get("cond_offsets"),
    )
    if num_steps is not None and num_steps != settings.num_steps:
        raise ValueError(
            f"{path} was inverted with {settings.num_steps} DDIM steps, not {num_steps}; invert "
            "again with the step count you want to sample with"
        )
    if pipe is not None:
        check_compatible(result, pipe)
        dev, dt = pipe.unet.device, pipe.unet.dtype
        result.latent_T = result.latent_T.to(dev, dt)
        result.null_embeddings = result.null_embeddings.to(dev, dt)
        if result.cond_offsets is not None:
            result.cond_offsets = result.cond_offsets.to(dev, dt)
    return result

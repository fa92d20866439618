"""DDIM's arithmetic as small pure functions, and the two loops built on them.

Notation (paper-notes): ᾱ_t is the cumulative product of alphas at training timestep t.

* predicted x0:   ``x0 = (z_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)``                              (DDIM eq. 12)
* forward step:   ``z_{t-1} = sqrt(ᾱ_{t-1}) x0 + sqrt(1 - ᾱ_{t-1}) ε``                  (η = 0)
* inverse step:   the same update run from t-1 to t, with ε evaluated at (z_{t-1}, t)
* guidance (CFG): ``ε̃ = ε(∅) + w (ε(C) - ε(∅))``
* stochastic step: ``z_{t-1} = sqrt(ᾱ_{t-1}) x0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε + σ_t n`` with
  σ_t(η) of DDIM eq. 16 (η = 1: DDPM; edit-friendly DDPM inversion chooses the noise n)

Every formula is written in ε. A model that predicts v instead (SD 2.x-768,
``prediction_type="v_prediction"``) has its output converted where it is read, by
:func:`predict_noise` given the run's :class:`DDIMSchedule`, which carries the scheduler's prediction
type: ``ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) z_t`` (and ``x0 = sqrt(ᾱ_t) z_t - sqrt(1 - ᾱ_t) v``, which
is what :func:`predict_x0` gives for that ε), with ᾱ_t of the timestep the UNet was called at. Since
the conversion is affine in the output with the same z_t for both branches, guiding ε or guiding v
gives the same step (diffusers guides the raw output).

Text embeddings are (B, L, D) tensors throughout; for SDXL, L counts one more row, the row token
that carries the pooled embedding and the time ids (:mod:`nti_utils.conditioning`), which
:func:`predict_noise` splits off for the UNet.

:func:`sample` is text-conditioned sampling with classifier-free guidance (a null embedding per step or
one for all; its `step` option replaces the DDIM update, e.g. by a stochastic step with given noise);
:func:`invert` is DDIM inversion returning the whole latent trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from nti_utils.conditioning import unpack


# ------------------------------------------------------------------------------ pure maths
def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """Predicted clean latent ``x0 = (z_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)``."""
    return (z_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5


def ddim_step(
    z_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM step (η = 0) from level t to the previous level.

    Args:
        z_t (`torch.Tensor`): latents (B, C, h, w) at timestep t.
        eps (`torch.Tensor`): noise prediction for `z_t` (guided or not), same shape.
        alpha_t, alpha_prev (`torch.Tensor`): ᾱ_t and ᾱ_{t-1} (scalars).

    Returns:
        `torch.Tensor`: z_{t-1}, same shape. Equal to `DDIMScheduler.step(...).prev_sample`.
    """
    x0 = predict_x0(z_t, eps, alpha_t)
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def ddim_inverse_step(
    z_prev: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, alpha_t: torch.Tensor
) -> torch.Tensor:
    """DDIM inversion step from level t-1 up to level t: :func:`ddim_step` with the roles of the two
    alphas swapped, with ε approximated by ε(z_{t-1}, t). Equal to `DDIMInverseScheduler.step`."""
    return ddim_step(z_prev, eps, alpha_prev, alpha_t)


PREDICTION_TYPES = ("epsilon", "v_prediction")
"""The UNet outputs the library reads: ε (SD 1.x, SD 2.x-base) and v (SD 2.x-768)."""


def check_prediction_type(prediction_type: object) -> str:
    """`prediction_type` if the library supports it, else a `ValueError` saying what is allowed."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported: the scheduler's "
            f"`prediction_type` must be one of {PREDICTION_TYPES} (ε-prediction as SD 1.x, or "
            "v-prediction as SD 2.x-768); x0-prediction ('sample') models are not supported"
        )
    return str(prediction_type)


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """ε from a v-prediction: ``ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) z_t``."""
    return alpha_t**0.5 * v + (1 - alpha_t) ** 0.5 * z_t


def v_to_x0(v: torch.Tensor, z_t: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """x0 from a v-prediction: ``x0 = sqrt(ᾱ_t) z_t - sqrt(1 - ᾱ_t) v``."""
    return alpha_t**0.5 * z_t - (1 - alpha_t) ** 0.5 * v


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``ε̃ = ε(∅) + w (ε(C) - ε(∅))``."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def ddim_sigma(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's noise level σ_t(η) = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1})
    (DDIM eq. 16): η = 0 is the deterministic DDIM step, η = 1 the DDPM posterior's."""
    return eta * ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5 * (1 - alpha_t / alpha_prev) ** 0.5


def stochastic_step(
    z_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DDIM step with noise level σ_t (DDIM eq. 12):
    ``z_{t-1} = sqrt(ᾱ_{t-1}) x0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε + σ_t n``; without `noise` n it is
    the mean μ_t(z_t, ε) of the step (σ_t from :func:`ddim_sigma`; σ_t = 0 is :func:`ddim_step`).

    Args:
        z_t (`torch.Tensor`): latents (B, C, h, w) at timestep t.
        eps (`torch.Tensor`): noise prediction for `z_t`, same shape.
        alpha_t, alpha_prev, sigma (`torch.Tensor`): ᾱ_t, ᾱ_{t-1} and σ_t (scalars).
        noise (`torch.Tensor`, *optional*): n, (B or 1, C, h, w); edit-friendly DDPM inversion's
            noise map z_t.

    Returns:
        `torch.Tensor`: z_{t-1}, (B, C, h, w).
    """
    x0 = predict_x0(z_t, eps, alpha_t)
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - sigma**2) ** 0.5 * eps
    return mean if noise is None else mean + sigma * noise


# ------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps of an N-step DDIM run and the ᾱ they need.

    Attributes:
        timesteps (`torch.Tensor`): (N,) int64, descending (e.g. 981, 961, ..., 1 for N = 50 with
            SD's ``steps_offset=1``).
        alphas_cumprod (`torch.Tensor`): (num_train_timesteps,) float32, ᾱ.
        final_alpha_cumprod (`torch.Tensor`): ᾱ used below timestep 0 (``alphas_cumprod[0]`` when
            ``set_alpha_to_one=False``, as in SD).
        stride (`int`): num_train_timesteps // N.
        prediction_type (`str`, defaults to ``"epsilon"``): what the UNet predicts, one of
            :data:`PREDICTION_TYPES`; :func:`predict_noise` converts its output to ε with it.
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: torch.Tensor
    stride: int
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_steps: int) -> DDIMSchedule:
        """Build from a scheduler's config (the scheduler itself is not modified), with its
        prediction type.

        Raises:
            ValueError: if the scheduler's ``prediction_type`` is not one of
                :data:`PREDICTION_TYPES`.
        """
        prediction_type = check_prediction_type(scheduler.config.get("prediction_type", "epsilon"))
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(num_steps)
        return cls(
            timesteps=sched.timesteps.clone(),
            alphas_cumprod=sched.alphas_cumprod.clone(),
            final_alpha_cumprod=sched.final_alpha_cumprod.clone(),
            stride=sched.config.num_train_timesteps // num_steps,
            prediction_type=prediction_type,
        )

    def __len__(self) -> int:
        return len(self.timesteps)

    def alpha(self, t: int) -> torch.Tensor:
        """ᾱ_t, or the final ᾱ for t < 0."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def alphas(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, ᾱ_{t-1}) for the i-th sampling step, t = timesteps[i]."""
        t = int(self.timesteps[i])
        return self.alpha(t), self.alpha(t - self.stride)

    def to_eps(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε from the UNet's `output` for latents `z` at timestep `t` (ᾱ_t of that timestep): the
        output itself for ε-prediction, :func:`v_to_eps` for v-prediction."""
        if self.prediction_type == "epsilon":
            return output
        return v_to_eps(output, z.to(output.dtype), self.alpha(int(t)))


def predict_noise(
    unet: UNet2DConditionModel,
    z: torch.Tensor,
    t: torch.Tensor | int,
    emb: torch.Tensor,
    schedule: DDIMSchedule,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ε(z, t, emb): the noise prediction for latents and text embeddings, whatever the UNet
    predicts. The library's only UNet call.

    Args:
        unet (`UNet2DConditionModel`): the noise predictor; an SDXL-conditioned one
            (``addition_embed_type="text_time"`` in its config) gets the pooled embedding and time
            ids of `emb`'s row token as ``added_cond_kwargs``
            (:func:`~nti_utils.conditioning.unpack`, detached: gradients reach the token
            embeddings only).
        z (`torch.Tensor`): latents z_t, (B, C, h, w).
        t (`torch.Tensor` or `int`): the timestep.
        emb (`torch.Tensor`): conditioning, (B, L', D): the token embeddings (L' = L) for SD
            1.x/2.x, plus SDXL's row token (L' = L + 1), as
            :func:`~nti_utils.models.embed_prompts` makes them.
        schedule (`DDIMSchedule`): the run's schedule; its `prediction_type` says how to turn the
            UNet's output into ε (see :meth:`DDIMSchedule.to_eps`). Required, so that no caller
            can read a v-prediction model's output as ε by forgetting it.
        dtype (`torch.dtype`, *optional*): cast the UNet's output to this before converting it
            (float32 for a half-precision UNet whose ε feeds an optimization); its own otherwise.

    Returns:
        `torch.Tensor`: ε, (B, C, h, w).
    """
    hidden, added = unpack(unet, emb)
    if added is None:
        out = unet(z, t, encoder_hidden_states=hidden).sample
    else:
        out = unet(z, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    out = out if dtype is None else out.to(dtype)
    return schedule.to_eps(out, z, t)


def guided_noise(
    unet: UNet2DConditionModel,
    z: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    null: torch.Tensor | None,
    guidance_scale: float,
    schedule: DDIMSchedule,
) -> torch.Tensor:
    """ε̃(z_t, t, C, ∅) = ε(∅) + w (ε(C) - ε(∅)) for latents (B, C, h, w), in one UNet call on the
    batch [∅; C] (2B rows) as diffusers' pipeline does; at w = 1 one call on C alone (B rows).

    Args:
        cond (`torch.Tensor`): C, (B, L', D) (L' = L, or L + 1 with SDXL's row token: see
            :func:`predict_noise`).
        null (`torch.Tensor`, *optional*): ∅, (B or 1, L', D); unused (may be `None`) at w = 1.
        guidance_scale (`float`): w.
        schedule (`DDIMSchedule`): for :func:`predict_noise`.
    """
    if guidance_scale == 1.0:
        return predict_noise(unet, z, t, cond, schedule)
    emb = torch.cat([null.to(cond.dtype).expand(cond.shape[0], -1, -1), cond])
    eps_u, eps_c = predict_noise(unet, torch.cat([z] * 2), t, emb, schedule).chunk(2)
    return guide(eps_u, eps_c, guidance_scale)


# ------------------------------------------------------------------------------ loops
StepCallback = Callable[[int, int, torch.Tensor], torch.Tensor | None]
StepRule = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``rule(i, z_t, ε̃, ᾱ_t, ᾱ_{t-1}) -> z_{t-1}``: the update of sampling step i in place of
:func:`ddim_step` (:func:`sample`'s `step`)."""


@dataclass
class SampleOutput:
    """What :func:`sample` returns.

    Attributes:
        latents (`torch.Tensor`): z_0, (B, C, h, w).
        trajectory (`list[torch.Tensor]`): z_T, ..., z_0 when asked for, else empty.
        pred_x0 (`list[torch.Tensor]`): predicted x0 at each step when asked for, else empty.
    """

    latents: torch.Tensor
    trajectory: list[torch.Tensor]
    pred_x0: list[torch.Tensor]


def _per_step(
    uncond: torch.Tensor | Sequence[torch.Tensor] | None, n: int, batch: int
) -> list[torch.Tensor | None]:
    """Normalize null embeddings to one (B, L, D) tensor per step."""
    if uncond is None:
        return [None] * n
    if isinstance(uncond, torch.Tensor) and uncond.dim() == 3:
        uncond = [uncond] * n
    if len(uncond) != n:
        raise ValueError(f"got {len(uncond)} per-step null embeddings for {n} steps")
    return [u.expand(batch, -1, -1) if u.shape[0] == 1 else u for u in uncond]


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    schedule: DDIMSchedule,
    guidance_scale: float = 7.5,
    uncond: torch.Tensor | Sequence[torch.Tensor] | None = None,
    callback: StepCallback | None = None,
    keep_trajectory: bool = False,
    progress: bool = True,
    cond_offsets: Sequence[torch.Tensor] | None = None,
    step: StepRule | None = None,
) -> SampleOutput:
    """Text-conditioned DDIM sampling with classifier-free guidance.

    Args:
        unet (`UNet2DConditionModel`): the noise predictor ε.
        latents (`torch.Tensor`): z_T, (B, C, h, w).
        cond (`torch.Tensor`): conditional embeddings C, (B, L, D).
        schedule (`DDIMSchedule`): timesteps and ᾱ.
        guidance_scale (`float`, defaults to 7.5): w (finite). At exactly 1 the null branch is
            skipped.
        uncond (`torch.Tensor` or sequence of them, *optional*): null embeddings ∅, either one
            (B or 1, L, D) for all steps or one per step (N tensors, e.g. null-text inversion's ∅_t).
            Required unless w == 1.
        callback (`StepCallback`, *optional*): ``callback(i, t, z_{t-1})`` after each step; if it
            returns a tensor, that replaces the latents (Prompt-to-Prompt's LocalBlend uses this).
        keep_trajectory (`bool`, defaults to `False`): also return z_T..z_0 and the predicted x0s.
        progress (`bool`, defaults to `True`): show a tqdm bar.
        cond_offsets (sequence of `torch.Tensor`, *optional*): one (1 or B, L, D) tensor per step,
            added to every row of `cond` at that step (the "optimize C" ablation of null-text
            inversion shifts the source and target prompts by the same learned offset).
        step (`StepRule`, *optional*): ``step(i, z_t, ε̃, ᾱ_t, ᾱ_{t-1})`` gives z_{t-1} instead of
            :func:`ddim_step` (before `callback`): Direct Inversion adds its correction d_t to the
            source row (:func:`~nti_utils.direct_inversion.corrected_step`), edit-friendly DDPM
            inversion takes the stochastic step with its noise map
            (:func:`~nti_utils.ddpm_inversion.noise_map_step`).

    Returns:
        :class:`SampleOutput`. The arithmetic (batching [∅; C], then ε̃, then the DDIM step) matches
        diffusers' `StableDiffusionPipeline`.
    """
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    use_cfg = guidance_scale != 1.0
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale != 1 needs null embeddings `uncond`")
    nulls = _per_step(uncond if use_cfg else None, len(schedule), latents.shape[0])
    if cond_offsets is not None and len(cond_offsets) != len(schedule):
        raise ValueError(f"got {len(cond_offsets)} conditional offsets for {len(schedule)} steps")
    base = cond
    traj, x0s = ([latents], []) if keep_trajectory else ([], [])
    for i, t in enumerate(tqdm(schedule.timesteps, desc="DDIM sampling", disable=not progress)):
        if cond_offsets is not None:
            # in float32, then rounded once (half-precision C plus a half-precision offset would
            # round twice)
            cond = (base.float() + cond_offsets[i].to(base.device).float()).to(base.dtype)
        eps = guided_noise(unet, latents, t, cond, nulls[i], guidance_scale, schedule)
        alpha_t, alpha_prev = schedule.alphas(i)
        if keep_trajectory:
            x0s.append(predict_x0(latents, eps, alpha_t))
        if step is None:
            latents = ddim_step(latents, eps, alpha_t, alpha_prev)
        else:
            latents = step(i, latents, eps, alpha_t, alpha_prev)
        if callback is not None:
            replaced = callback(i, int(t), latents)
            latents = latents if replaced is None else replaced
        if keep_trajectory:
            traj.append(latents)
    return SampleOutput(latents, traj, x0s)


@torch.no_grad()
def invert(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    schedule: DDIMSchedule,
    guidance_scale: float = 1.0,
    uncond: torch.Tensor | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """DDIM inversion of clean latents up to noise.

    Args:
        unet (`UNet2DConditionModel`): the noise predictor ε.
        latents (`torch.Tensor`): z_0, (B, C, h, w).
        cond (`torch.Tensor`): conditional embeddings C, (B, L, D).
        schedule (`DDIMSchedule`): the same schedule you will sample with.
        guidance_scale (`float`, defaults to 1.0): w; the paper's pivots use w = 1.
        uncond (`torch.Tensor`, *optional*): null embedding ∅ (B or 1, L, D); needed when w != 1.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `list[torch.Tensor]`: the trajectory ``[z_0, z_1, ..., z_N]`` (N + 1 latents, least to most
        noisy); ``trajectory[-1]`` is z_T, the starting point for sampling.
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs the null embedding `uncond`")
    traj = [latents]
    n = len(schedule)
    for k in tqdm(range(n), desc="DDIM inversion", disable=not progress):
        i = n - 1 - k  # walk the sampling steps backwards: t = 1, 21, ..., 981 for N = 50
        t = schedule.timesteps[i]
        alpha_t, alpha_prev = schedule.alphas(i)
        eps = predict_noise(unet, latents, t, cond, schedule)
        if guidance_scale != 1.0:
            eps_u = predict_noise(unet, latents, t, uncond.expand_as(cond), schedule)
            eps = guide(eps_u, eps, guidance_scale)
        latents = ddim_inverse_step(latents, eps, alpha_prev, alpha_t)
        traj.append(latents)
    return traj

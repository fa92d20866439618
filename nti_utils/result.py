"""What an inversion produces: :class:`InversionSettings`, :class:`InversionResult` and the model
check (:func:`check_compatible`); :mod:`nti_utils.storage` saves and loads it.

This module holds data only: the algorithms that fill an :class:`InversionResult` live in
:mod:`nti_utils.inversion`; reconstruction and editing read it. A result is the starting latent
z̄_T and one null embedding ∅_t per sampling step, so that sampling with guidance w and ∅_t at step t
re-creates the inverted image.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

import torch

from nti_utils.models import (
    Pipeline,
    embedding_shape,
    model_fingerprint,
    model_id,
    scheduler_hash,
)

Optimize = Literal["null", "cond"]
Pivots = Literal["ddim", "random"]
UpdateRule = Literal["check-first", "reference"]
Autocast = Literal["float16", "bfloat16"]


def is_int(v: object) -> bool:
    """An integer that is not a bool (the settings' counts)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_finite_real(v: object) -> bool:
    """A finite real number that is not a bool (the settings' and the manifest's numbers)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_fields(settings: object, rules: dict[str, tuple[bool, str]]) -> None:
    """Raise a `ValueError` for the first field of `settings` whose rule fails: `rules` maps a field
    name to (whether its value is allowed, what is allowed), e.g. ``{"mix": (0 < p <= 1, "a number
    in (0, 1]")}``; the message names the class, the field, what is allowed and the value."""
    for name, (ok, allowed) in rules.items():
        if not ok:
            raise ValueError(
                f"{type(settings).__name__}.{name} must be {allowed}, got "
                f"{getattr(settings, name)!r}"
            )


@dataclass(frozen=True)
class InversionSettings:
    """Settings of an inversion (defaults: the paper's Algorithm 1 as the official code runs it).

    Every field is checked when the settings are made (`ValueError` says what is allowed).

    Attributes:
        num_steps (`int`, defaults to 50): DDIM steps N (>= 1).
        guidance_scale (`float`, defaults to 7.5): w used when optimizing, editing and
            reconstructing (finite).
        inner_steps (`int`, defaults to 10): at most this many Adam updates per timestep (>= 0);
            none at w = 1 when ∅ is optimized (its branch has weight 1 - w = 0 there).
        lr (`float`, defaults to 1e-2): Adam's learning rate at the first timestep; at step index i
            it is ``lr * (1 - i / max(100, N))`` (finite, > 0; see
            :func:`~nti_utils.inversion.lr_at`): the official code's ``lr * (1 - i / 100)`` for
            runs of up to 100 steps, stretched over the run beyond (so it stays > 0; the official
            formula goes negative after step 100). The paper gives no schedule.
        epsilon (`float`, defaults to 1e-5): early stop when the latent MSE falls below
            ``epsilon + i * epsilon_growth`` at step index i (>= 0). The paper gives ε = 1e-5; the
            growing threshold is the official code's.
        epsilon_growth (`float`, defaults to 2e-5): see `epsilon` (>= 0).
        per_timestep (`bool`, defaults to `True`): one null embedding per timestep (the paper's
            method); False keeps optimizing a single embedding through one sweep of the timesteps
            and uses the final one everywhere. (This is not the paper's global-∅ ablation, which
            optimizes one shared ∅ over many passes: :mod:`nti_utils.global_null`.)
        pivots (`"ddim"` or `"random"`, defaults to ``"ddim"``): the targets of the optimization.
            ``"ddim"``: the w = 1 DDIM inversion trajectory z*_0..z*_N (the paper's pivotal
            inversion). ``"random"``: the paper's random-pivot ablation, a random trajectory
            z*_t = √ᾱ_t·z_0 + √(1-ᾱ_t)·ε from one Gaussian sample ε (z*_0 = z_0).
        optimize (`"null"` or `"cond"`, defaults to ``"null"``): which embedding is optimized: ∅_t
            (the paper's method) or the source prompt's C_t with ∅ fixed (the paper's
            textual-inversion-style ablation; the result then holds per-step offsets ``C_t - C``
            that reconstruction and editing add to every prompt's embedding).
        update_rule (`"check-first"` or `"reference"`, defaults to ``"check-first"``): when the
            early-stop test runs. ``"check-first"``: the loss is tested before each update, and the
            evaluation that passes also gives z̄_{t-1} (no extra UNet call). ``"reference"``: the
            official code's order: update, then stop if the loss measured before the update was
            below the threshold (every step makes at least one update, except at w = 1: see
            `inner_steps`), then one more evaluation
            with the final ∅_t advances z̄.
        step_scale (`float`, defaults to 1.0): k >= 1, a shorter optimizer schedule: Adam's
            learning rate times k and at most ``ceil(inner_steps / k)`` updates per step
            (:attr:`effective_lr`, :attr:`max_updates`); 1 is the paper's schedule.
        max_rows (`int`, *optional*): at most this many latent rows per UNet call when several
            images are inverted together (bounds GPU memory); all rows by default. Does not change
            the arithmetic.
        autocast (`"float16"` or `"bfloat16"`, *optional*): run the UNet calls of the optimization
            under CUDA autocast (for float32 weights on a GPU); the optimized embeddings stay float32.
    """

    num_steps: int = 50
    guidance_scale: float = 7.5
    inner_steps: int = 10
    lr: float = 1e-2
    epsilon: float = 1e-5
    epsilon_growth: float = 2e-5
    per_timestep: bool = True
    pivots: Pivots = "ddim"
    optimize: Optimize = "null"
    update_rule: UpdateRule = "check-first"
    step_scale: float = 1.0
    max_rows: int | None = None
    autocast: Autocast | None = None

    def __post_init__(self) -> None:
        def positive_int(v, low):
            return is_int(v) and v >= low

        rules = {
            "num_steps": (positive_int(self.num_steps, 1), "an integer >= 1"),
            "guidance_scale": (is_finite_real(self.guidance_scale), "a finite number"),
            "inner_steps": (positive_int(self.inner_steps, 0), "an integer >= 0"),
            "lr": (is_finite_real(self.lr) and self.lr > 0, "a finite number > 0"),
            "epsilon": (is_finite_real(self.epsilon) and self.epsilon >= 0, "a finite number >= 0"),
            "epsilon_growth": (
                is_finite_real(self.epsilon_growth) and self.epsilon_growth >= 0,
                "a finite number >= 0",
            ),
            "per_timestep": (isinstance(self.per_timestep, bool), "True or False"),
            "pivots": (self.pivots in get_args(Pivots), f"one of {get_args(Pivots)}"),
            "optimize": (self.optimize in get_args(Optimize), f"one of {get_args(Optimize)}"),
            "update_rule": (
                self.update_rule in get_args(UpdateRule),
                f"one of {get_args(UpdateRule)}",
            ),
            "step_scale": (
                is_finite_real(self.step_scale) and self.step_scale >= 1,
                "a finite number >= 1 (1: the paper's schedule)",
            ),
            "max_rows": (
                self.max_rows is None or positive_int(self.max_rows, 1),
                "None or an integer >= 1",
            ),
            "autocast": (
                self.autocast is None or self.autocast in get_args(Autocast),
                f"None or one of {get_args(Autocast)}",
            ),
        }
        check_fields(self, rules)

    @classmethod
    def check(cls, settings: object) -> InversionSettings:
        """`settings` if it is an :class:`InversionSettings`, else a `TypeError` that says how to
        make one (a dict of fields is a common slip)."""
        if not isinstance(settings, cls):
            raise TypeError(
                f"settings must be an InversionSettings, got {type(settings).__name__} "
                f"({settings!r}); make one with InversionSettings(num_steps=..., ...) or "
                "InversionSettings.from_dict(d)"
            )
        return settings

    @property
    def effective_lr(self) -> float:
        """Adam's learning rate at the first timestep: ``lr * step_scale``."""
        return self.lr * self.step_scale

    @property
    def max_updates(self) -> int:
        """The inner-step ceiling that runs: ``ceil(inner_steps / step_scale)``."""
        return (
            self.inner_steps
            if self.step_scale == 1
            else math.ceil(self.inner_steps / self.step_scale)
        )

    @classmethod
    def from_dict(cls, values: dict) -> InversionSettings:
        """Settings from a dict (e.g. a saved file's metadata); unknown keys are an error, missing
        ones take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown inversion settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class InversionResult:
    """An inverted image, ready to be reconstructed or edited.

    Attributes:
        latent_T (`torch.Tensor`): z̄_T, (1, C, h, w).
        null_embeddings (`torch.Tensor`): ∅_t for each sampling step, (N, 1, L', D), in sampling
            order (first row for t = T); (L', D) is the pipeline's
            :func:`~nti_utils.models.embedding_shape`: L' = L tokens, or L + 1 for SDXL, whose last
            row carries the (fixed, not optimized) pooled embedding and time ids
            (:mod:`nti_utils.conditioning`), saved with the tokens.
        prompt (`str`): the source prompt P whose embedding C was used.
        prompt_source (`str`, defaults to ``"user"``): where P came from: ``"user"`` (passed in),
            or ``"captioner:<name>"`` when a captioning model wrote it (:mod:`nti_utils.caption`).
        method (`str`): which algorithm made it (e.g. ``"null-text"``, ``"ddim"``); the functions
            that make results document theirs.
        settings (`InversionSettings`): what was used.
        losses (`list[list[float]]`): per step, the latent MSE at each evaluation; empty for
            methods without optimization (the fixed-point inversion keeps its residuals here).
        inner_steps (`list[int]`): per step, the Adam updates made.
        timings (`dict[str, float]`): seconds spent in each phase. When several images were
            inverted together, these are the whole batch's seconds and ``timings["batch_size"]``
            says how many images shared them.
        model_id (`str`), model_fingerprint (`str`), scheduler_hash (`str`): model identity.
        pivots (`list[torch.Tensor]`): the w = 1 DDIM trajectory z*_0..z*_N (the fixed-point
            inversion's own trajectory for it; not saved to disk).
        step_errors (`list[float]`): per step, MSE between z̄_{t-1} and the pivot z*_{t-1} (Direct
            Inversion: mean d_t²; edit-friendly DDPM inversion: mean z_t²; not saved).
        unet_calls (`dict[str, int]`): latent rows through the UNet during the optimization,
            ``"forward"`` and ``"backward"`` (the pivots' DDIM inversion not included); like
            `timings`, the whole batch's when images were inverted together.
        cond_offsets (`torch.Tensor`, *optional*): ``C_t - C`` per sampling step, (N, 1, L', D), when
            the conditional embedding was optimized (``settings.optimize == "cond"``); added to the
            embedding of every prompt at step t when reconstructing or editing. `None` otherwise.
        method_settings (*optional*): the settings of a method beyond :class:`InversionSettings`
            (a frozen dataclass of :data:`METHOD_SETTINGS`: EDICT's mixing p, edit-friendly DDPM
            inversion's η and skip, the fixed-point iterations), `None` for the others.
        source_corrections (`torch.Tensor`, *optional*): Direct Inversion's d_t per sampling step,
            (N, 1, C, h, w), added to the source row after each step of reconstruction or editing
            (:mod:`nti_utils.direct_inversion`).
        noise_maps (`torch.Tensor`, *optional*): edit-friendly DDPM inversion's z_t per sampling
            step that runs, (N - skip, 1, C, h, w) (:mod:`nti_utils.ddpm_inversion`); `latent_T` is
            then x_t at the first step that runs.
        coupled_latent_T (`torch.Tensor`, *optional*): EDICT's second latent y_T, (1, C, h, w)
            (`latent_T` is x_T); reconstruction and editing then run EDICT's coupled sampler
            (:mod:`nti_utils.edict`).
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
    prompt_source: str = "user"
    pivots: list[torch.Tensor] = field(default_factory=list, repr=False)
    step_errors: list[float] = field(default_factory=list)
    unet_calls: dict[str, int] = field(default_factory=dict)
    cond_offsets: torch.Tensor | None = None
    method_settings: object | None = None
    source_corrections: torch.Tensor | None = None
    noise_maps: torch.Tensor | None = None
    coupled_latent_T: torch.Tensor | None = None

    def uncond_per_step(self) -> list[torch.Tensor]:
        """The null embeddings as a list of (1, L', D) tensors, one per sampling step."""
        return list(self.null_embeddings)

    def cond_offsets_per_step(self) -> list[torch.Tensor] | None:
        """The conditional offsets as a list of (1, L', D) tensors, or `None` if there are none."""
        return None if self.cond_offsets is None else list(self.cond_offsets)

    @classmethod
    def for_pipeline(cls, pipe: Pipeline, **values) -> InversionResult:
        """A result stamped with `pipe`'s identity (model id, fingerprint, scheduler hash)."""
        return cls(
            model_id=model_id(pipe),
            model_fingerprint=model_fingerprint(pipe),
            scheduler_hash=scheduler_hash(pipe.scheduler),
            **values,
        )


def check_compatible(result: InversionResult, pipe: Pipeline) -> None:
    """Raise a `ValueError` if `result` was made with another model or scheduler, or its null
    embeddings are not (L', D) of this pipeline's conditioning
    (:func:`~nti_utils.models.embedding_shape`: L tokens, plus SDXL's row token).

    Args:
        result (`InversionResult`): the inversion.
        pipe (:data:`~nti_utils.models.Pipeline`): the pipeline it is used with.
    """
    problems = []
    if result.model_fingerprint and result.model_fingerprint != model_fingerprint(pipe):
        problems.append(
            f"it was made with model {result.model_id!r} (fingerprint {result.model_fingerprint}), "
            f"this pipeline is {model_id(pipe)!r} ({model_fingerprint(pipe)})"
        )
    if result.scheduler_hash and result.scheduler_hash != scheduler_hash(pipe.scheduler):
        problems.append("its scheduler settings differ from this pipeline's")
    shape = tuple(result.null_embeddings.shape[-2:])
    want = embedding_shape(pipe)
    if shape != want:
        problems.append(f"its null embeddings are {shape}, this model's are {want}")
    if problems:
        raise ValueError(
            "this inversion does not match the pipeline: "
            + "; ".join(problems)
            + ". Load the model it was made with, or invert the image again with this one."
        )


METHOD_SETTINGS: dict[str, tuple[str, str]] = {
    "edict": ("nti_utils.edict", "EDICTSettings"),
    "ddpm": ("nti_utils.ddpm_inversion", "DDPMInversionSettings"),
    "fixed-point": ("nti_utils.fixed_point", "FixedPointSettings"),
}
"""Method -> (module, class) of the settings it keeps in ``InversionResult.method_settings``
(imported when a saved result is loaded)."""


def method_settings_class(method: str) -> type:
    """The settings class of `method` (:data:`METHOD_SETTINGS`), imported on first use.

    Raises:
        ValueError: `method` keeps no settings of its own.
    """
    if method not in METHOD_SETTINGS:
        raise ValueError(
            f"method {method!r} keeps no method settings (those that do: {sorted(METHOD_SETTINGS)})"
        )
    module, name = METHOD_SETTINGS[method]
    return getattr(importlib.import_module(module), name)

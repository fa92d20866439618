"""What a benchmark run measures: its configuration, the names of its rows, and its scenes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nti_utils.result import InversionSettings
from nti_utils.shapes.edits import EDIT_KINDS, EditCase, make_edit
from nti_utils.shapes.seeds import BENCHMARK_OFFSET, HELD_OUT_SEED
from nti_utils.shapes.world import Scene, scene_from_seed

REFERENCE, LIBRARY, OURS = "NTI reference loop", "NTI library (Alg. 1)", "NTI ours (fast)"
DDIM_W1, DDIM_W = "DDIM inversion, w=1", "DDIM inversion, w=7.5"
ABLATION_BASELINE = "ablation baseline: NTI library"
"""Summary row: the library's null-text inversion on the ablation scenes only, so that the ablations
(which run on the first `ablation_scenes` scenes) compare with it on the same images."""
OURS_BASELINE = "ablation baseline: NTI ours"
"""Summary row: ours on the ablation scenes only, the baseline of ours' ablations."""

AUTOCAST_CHOICES = ("auto", "none", "float16", "bfloat16")


@dataclass(frozen=True)
class BenchConfig:
    """What a benchmark run measures (CLI flags of the same names).

    Attributes:
        model (`str`, defaults to ``"toy"``): ``"toy"`` or a diffusers folder.
        scenes (`int`, defaults to 50): scenes for the methods.
        ablation_scenes (`int`, defaults to 20): the first this many scenes also run the ablations.
        steps (`int`, defaults to 50): DDIM steps N, the same for every method.
        guidance (`float`, defaults to 7.5): w.
        inner_steps (`int`, defaults to 10): null-text inversion's inner-step ceiling.
        inner_sweep (`tuple[int, ...]`): inner-step ceilings of the reconstruction-vs-steps ablation.
        seed_offset (`int`, defaults to 20000): scene i is ``HELD_OUT_SEED + seed_offset + i``
            (:data:`~nti_utils.shapes.seeds.BENCHMARK_OFFSET`).
        device (`str`, *optional*): defaults to CUDA when available, else the CPU.
        dtype (`str`, *optional*): weights' dtype, float32 by default on every device (the
            reference's precision; ours may autocast on CUDA).
        autocast (`str`, defaults to ``"auto"``): ours under CUDA autocast: ``"auto"``
            (``"float16"`` on CUDA, none on the CPU), ``"none"``, ``"float16"`` or ``"bfloat16"``
            (:attr:`~nti_utils.result.InversionSettings.autocast`).
        ablations (`bool`, defaults to `True`): run the ablations.
        batch (`int`, defaults to 25): images per call of ours (batching across images); its wall
            time, CPU time and UNet rows are shared equally among them, its peak memory is the
            batch's.
    """

    model: str = "toy"
    scenes: int = 50
    ablation_scenes: int = 20
    steps: int = 50
    guidance: float = 7.5
    inner_steps: int = 10
    inner_sweep: tuple[int, ...] = (0, 1, 2, 5)
    seed_offset: int = BENCHMARK_OFFSET
    device: str | None = None
    dtype: str | None = None
    autocast: str = "auto"
    ablations: bool = True
    batch: int = 25

    def __post_init__(self) -> None:
        if min(self.scenes, self.steps, self.batch) < 1 or self.ablation_scenes < 0:
            raise ValueError("scenes, steps and batch must be >= 1 and ablation_scenes >= 0")
        if any(k < 0 for k in self.inner_sweep):
            raise ValueError(f"inner_sweep ceilings must be >= 0, got {self.inner_sweep}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        _ = self.settings  # InversionSettings checks steps, guidance and inner_steps

    @property
    def settings(self) -> InversionSettings:
        """The paper's settings with this run's N, w and inner-step ceiling."""
        return InversionSettings(self.steps, self.guidance, self.inner_steps)


QUICK = dict(scenes=3, ablation_scenes=1, steps=5, inner_steps=3, inner_sweep=(0,), batch=3)
"""``--quick``: a smoke run for tests (3 scenes, ablations on the first, 5 steps, 3 inner steps)."""


@dataclass(frozen=True)
class BenchScene:
    """Input i of the benchmark: its seed and its edit case (`case.source` is the scene)."""

    index: int
    seed: int
    case: EditCase

    @property
    def scene(self) -> Scene:
        return self.case.source


def bench_scene(i: int, cfg: BenchConfig, resolution: int) -> BenchScene:
    """Scene i (one object, rendered at `resolution`, seed ``HELD_OUT_SEED + seed_offset + i``)
    and its edit; edit kinds cycle through shape, color, background."""
    seed = HELD_OUT_SEED + cfg.seed_offset + i
    scene = scene_from_seed(seed, n_objects=1, resolution=resolution)
    kind = EDIT_KINDS[i % len(EDIT_KINDS)]
    return BenchScene(i, seed, make_edit(scene, kind, np.random.default_rng(seed)))

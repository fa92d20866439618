"""What a benchmark run measures: its configuration, the names of its rows, and its scenes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from nti_utils.result import InversionSettings
from nti_utils.shapes.edits import EDIT_KINDS, EditCase, make_edit
from nti_utils.shapes.seeds import BENCHMARK_OFFSET, HELD_OUT_SEED
from nti_utils.shapes.world import Scene, scene_from_seed

REFERENCE, LIBRARY, OURS = "NTI reference loop", "NTI library (Alg. 1)", "NTI ours (fast)"
OURS_ONE = "NTI ours, one image"
"""Ours' schedule on one image per call (no batching): the single-image path's speed."""
DDIM_W1, DDIM_W = "DDIM inversion, w=1", "DDIM inversion, w=7.5"
ABLATION_BASELINE = "ablation baseline: NTI library"
"""Summary row: the library's null-text inversion on the ablation scenes only, so that the ablations
(which run on the first `ablation_scenes` scenes) compare with it on the same images."""
OURS_BASELINE = "ablation baseline: NTI ours"
"""Summary row: ours on the ablation scenes only, the baseline of ours' ablations."""

AUTOCAST_CHOICES = ("auto", "none", "float16", "bfloat16")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")


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
        global_passes (`int`, defaults to 150): passes of the global-∅ ablation (Algorithm 2;
            ``passes * steps`` optimization steps, the paper's 7,500 for 50 steps).
        global_scenes (`int`, defaults to 3): the first this many scenes run it (about 12 minutes
            per scene on a 2-core CPU with the embedded model).
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
    global_passes: int = 150
    global_scenes: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):  # types first: the range checks below compare numbers
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"BenchConfig.{f.name} must be an integer, got {v!r}")
        if not isinstance(self.inner_sweep, tuple) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in self.inner_sweep
        ):
            raise ValueError(
                f"inner_sweep must be a tuple of integers such as (0, 1, 2, 5), got "
                f"{self.inner_sweep!r}"
            )
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES} or None, got {self.dtype!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be 'toy' or a folder path, got {self.model!r}")
        if min(self.scenes, self.steps, self.batch, self.global_passes) < 1:
            raise ValueError("scenes, steps, batch and global_passes must be >= 1")
        if min(self.ablation_scenes, self.global_scenes) < 0:
            raise ValueError("ablation_scenes and global_scenes must be >= 0")
        if any(k < 0 for k in self.inner_sweep):
            raise ValueError(f"inner_sweep ceilings must be >= 0, got {self.inner_sweep}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        _ = self.settings  # InversionSettings checks steps, guidance and inner_steps

    @property
    def settings(self) -> InversionSettings:
        """The paper's settings with this run's N, w and inner-step ceiling."""
        return InversionSettings(self.steps, self.guidance, self.inner_steps)


QUICK = dict(
    scenes=3,
    ablation_scenes=1,
    steps=5,
    inner_steps=3,
    inner_sweep=(0,),
    batch=3,
    global_passes=4,
    global_scenes=1,
)
"""``--quick``: a smoke run for tests (3 scenes, ablations on the first, 5 steps, 3 inner steps, 4
passes of the global ∅)."""


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

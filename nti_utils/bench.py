"""Benchmark of the paper's claims on shapes-world scenes: ``python -m nti_utils.bench``.

Every input is a held-out scene *rendered* (never sampled) from a seed, with its caption, and an edit
with ground truth (a shape, color or background swap, cycling): target caption, target render and
edit region. On the same images, model and DDIM steps, each inversion method is measured for

* reconstruction: PSNR and SSIM against the input, and the gap to the VAE bound (the round trip);
* cost: wall and CPU seconds, UNet evaluations (latent rows through the UNet, forward and backward),
  peak memory (CUDA: allocated; CPU: process RSS, sampled);
* editability: Prompt-to-Prompt (``Replace`` with the edit kind's settings,
  :data:`~nti_utils.shapes.edits.RECIPES`: a ``LocalBlend`` on the shape word for shape and color
  edits) from the inversion, scored by the renderer's scorer (success rate), PSNR against the target
  render, and PSNR against the input outside the edit region.

Methods: DDIM inversion reconstructed at w = 1 and at w = 7.5, negative-prompt inversion, null-text
inversion as a plain reference loop (:func:`reference_null_text_inversion`, the original notebook's),
the library's Algorithm 1 (:func:`~nti_utils.inversion.null_text_inversion`), and ours
(:func:`~nti_utils.fast_inversion.batched_null_text_inversion`: the reference's update rule with
frozen weights, batched across `--batch` images, with the short optimizer schedule
:data:`~nti_utils.fast_inversion.SHORT_SCHEDULE`). Ablations: a global ∅, a random pivot, optimizing
C instead of ∅ (textual-inversion style), and PSNR against the number of inner steps (compare with
the library on the same scenes, row "ablation baseline: NTI library"); ours with the paper's
schedule (the reference's updates, batched, frozen weights), ours with the library's check-first
update rule, ours with a parallel-over-timesteps warm-up (the last two with the short schedule;
compare with "ablation baseline: NTI ours").

Prints a table and writes ``summary.csv``, ``per_scene.csv``, ``results.json``, ``table.txt`` and
``bench.png`` to ``--out`` (default ``results/bench``). ``--quick`` is a smoke run for tests
(:data:`QUICK`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from nti_utils.bench_report import summarize, write_outputs
from nti_utils.ddim import DDIMSchedule, ddim_step, guide, invert, predict_noise
from nti_utils.fast_inversion import SHORT_SCHEDULE, batched_null_text_inversion
from nti_utils.images import image_to_latents, latents_to_pil, model_resolution
from nti_utils.inversion import (
    InversionResult,
    InversionSettings,
    ddim_inversion,
    negative_prompt_inversion,
    null_text_inversion,
    reconstruct,
)
from nti_utils.measure import CPU_MEMORY_KIND, CUDA_MEMORY_KIND, measure
from nti_utils.metrics import psnr, ssim, vae_bound
from nti_utils.models import (
    default_device,
    embed_prompts,
    load_pipeline,
    model_fingerprint,
    model_id,
    scheduler_hash,
)
from nti_utils.p2p import edit
from nti_utils.shapes.edits import (
    EDIT_KINDS,
    RECIPES,
    EditCase,
    edit_controller,
    make_edit,
    score_edit,
)
from nti_utils.shapes.train import HELD_OUT_SEED
from nti_utils.shapes.world import Scene, scene_from_seed

REFERENCE, LIBRARY, OURS = "NTI reference loop", "NTI library (Alg. 1)", "NTI ours (fast)"
DDIM_W1, DDIM_W = "DDIM inversion, w=1", "DDIM inversion, w=7.5"
ABLATION_BASELINE = "ablation baseline: NTI library"
"""Summary row: the library's null-text inversion on the ablation scenes only, so that the ablations
(which run on the first `ablation_scenes` scenes) compare with it on the same images."""
OURS_BASELINE = "ablation baseline: NTI ours"
"""Summary row: ours on the ablation scenes only, the baseline of ours' ablations."""


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
        seed_offset (`int`, defaults to 20000): scene i is ``HELD_OUT_SEED + seed_offset + i``.
        device (`str`, *optional*): defaults to CUDA when available, else the CPU.
        dtype (`str`, *optional*): weights' dtype, float32 by default on every device (the
            reference's precision; ours may autocast on CUDA).
        autocast (`str`, defaults to ``"auto"``): ours under CUDA autocast: ``"auto"``
            (``"float16"`` on CUDA, none on the CPU), ``"none"``, ``"float16"`` or ``"bfloat16"``;
            see :class:`~nti_utils.fast_inversion.FastSettings`.
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
    seed_offset: int = 20_000
    device: str | None = None
    dtype: str | None = None
    autocast: str = "auto"
    ablations: bool = True
    batch: int = 25

    def __post_init__(self) -> None:
        if min(self.scenes, self.steps, self.batch) < 1 or self.inner_steps < 0:
            raise ValueError("scenes, steps and batch must be >= 1 and inner_steps >= 0")

    @property
    def settings(self) -> InversionSettings:
        return InversionSettings(self.steps, self.guidance, self.inner_steps)


QUICK = dict(scenes=3, ablation_scenes=1, steps=5, inner_steps=3, inner_sweep=(0,), batch=3)
"""``--quick``: a smoke run for tests (3 scenes, ablations on the first, 5 steps, 3 inner steps)."""


# ------------------------------------------------------------------------------ reference loop
def reference_null_text_inversion(
    pipe, image, prompt: str, settings: InversionSettings = InversionSettings()
) -> InversionResult:
    """Null-text inversion written as plainly as the original code (google/prompt-to-prompt,
    ``null_text_w_ptp.ipynb``): the yardstick for speed.

    Per timestep: ε(z̄_t, t, C) once without gradients; then up to ``inner_steps`` times one
    ε(z̄_t, t, ∅_t) call, a backward pass (the UNet's weights keep ``requires_grad``, so weight
    gradients are computed too, as in the original), an Adam step, and only then the early-stop
    test ``loss < epsilon + i · epsilon_growth`` on the loss measured before that step (so every
    timestep makes at least one update); finally one batched [∅_t; C] call to advance z̄. The
    weight gradients the original leaves behind are cleared at the end so that later runs start
    clean.

    Returns:
        :class:`~nti_utils.inversion.InversionResult` with method ``"null-text-reference"``.
    """
    s, unet = settings, pipe.unet
    z0 = image_to_latents(pipe, image).to(unet.device, unet.dtype)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, s.num_steps)
    cond, null = embed_prompts(pipe, [prompt, ""]).chunk(2)
    pivots = invert(unet, z0, cond, schedule, progress=False)
    n, latent, uncond = len(schedule), pivots[-1], null
    nulls, counts = [], []
    for i in range(n):
        t = schedule.timesteps[i]
        alpha_t, alpha_prev = schedule.alphas(i)
        target = pivots[n - 1 - i]
        uncond = uncond.clone().detach().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=s.lr * (1.0 - i / 100.0))
        with torch.no_grad():
            eps_c = predict_noise(unet, latent, t, cond)
        done = 0
        for _ in range(s.inner_steps):
            eps_u = predict_noise(unet, latent, t, uncond)
            z_prev = ddim_step(latent, guide(eps_u, eps_c, s.guidance_scale), alpha_t, alpha_prev)
            loss = torch.nn.functional.mse_loss(z_prev, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if loss.item() < s.epsilon + i * s.epsilon_growth:
                break
        counts.append(done)
        nulls.append(uncond.detach())
        with torch.no_grad():
            both = torch.cat([uncond, cond])
            eps_u, eps_c = predict_noise(unet, torch.cat([latent] * 2), t, both).chunk(2)
            latent = ddim_step(latent, guide(eps_u, eps_c, s.guidance_scale), alpha_t, alpha_prev)
    for p in unet.parameters():
        p.grad = None
    return InversionResult(
        latent_T=pivots[-1], null_embeddings=torch.stack(nulls), prompt=prompt,
        method="null-text-reference", settings=s, inner_steps=counts, model_id=model_id(pipe),
        model_fingerprint=model_fingerprint(pipe), scheduler_hash=scheduler_hash(pipe.scheduler),
    )  # fmt: skip


# ------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
        name (`str`): label.
        invert (`Callable`): ``invert(pipe, image, prompt, scene_seed) -> InversionResult``, or for
            a batched method ``invert(pipe, images, prompts, seeds) -> list[InversionResult]``.
        guidance (`float`, *optional*): w for reconstruction and editing (the inversion's if None).
        group (`str`): ``"method"`` or ``"ablation"``.
        edits (`bool`): also run and score the edit.
        batched (`bool`): inverts a batch of scenes per call (measured per batch, then shared
            equally among its images).
        sweep_inner_steps (`int`, *optional*): the inner-step ceiling, for the points of the
            reconstruction-vs-inner-steps ablation.
    """

    name: str
    invert: Callable[..., InversionResult | list[InversionResult]]
    guidance: float | None = None
    group: str = "method"
    edits: bool = True
    batched: bool = False
    sweep_inner_steps: int | None = None


def methods(cfg: BenchConfig, device_type: str) -> list[Method]:
    """The methods and ablations of a run, in the order they run on each batch of scenes."""
    s = cfg.settings
    auto = "float16" if device_type == "cuda" else None
    amp = {"auto": auto, "none": None}.get(cfg.autocast, cfg.autocast)
    fast = dataclasses.replace(SHORT_SCHEDULE, autocast=amp)

    def random_pivot(pipe, image, prompt, seed):
        c, side = pipe.unet.config.in_channels, pipe.unet.config.sample_size
        noise = torch.randn((1, c, side, side), generator=torch.Generator().manual_seed(seed))
        return null_text_inversion(pipe, image, prompt, s, start_latent=noise, progress=False)

    def lib(settings):
        return lambda pipe, image, prompt, seed: null_text_inversion(
            pipe, image, prompt, settings, progress=False
        )

    def ours(fast_settings):
        return lambda pipe, images, prompts, seeds: batched_null_text_inversion(
            pipe, images, prompts, s, fast_settings, progress=False
        )

    out = [
        Method(DDIM_W1, lambda p, im, pr, _: ddim_inversion(p, im, pr, s, False), guidance=1.0),
        Method(DDIM_W, lambda p, im, pr, _: ddim_inversion(p, im, pr, s, False)),
        Method("negative-prompt inversion",
               lambda p, im, pr, _: negative_prompt_inversion(p, im, pr, s, False)),
        Method(REFERENCE, lambda p, im, pr, _: reference_null_text_inversion(p, im, pr, s)),
        Method(LIBRARY, lib(s)),
        Method(OURS, ours(fast), batched=True),
    ]  # fmt: skip
    if cfg.ablations:
        out += [
            Method("ablation: global null", lib(dataclasses.replace(s, per_timestep=False)),
                   group="ablation"),
            Method("ablation: random pivot", random_pivot, group="ablation"),
            Method("ablation: optimize C", lib(dataclasses.replace(s, optimize="cond")),
                   group="ablation"),
            Method("ablation: ours, paper schedule",
                   ours(dataclasses.replace(fast, step_scale=1.0)),
                   group="ablation", batched=True),
            Method("ablation: ours, check-first rule",
                   ours(dataclasses.replace(fast, update_rule="check-first")), group="ablation",
                   batched=True),
            Method("ablation: ours + timestep warm-up",
                   ours(dataclasses.replace(fast, warmup_steps=fast.schedule(s).inner_steps)),
                   group="ablation", batched=True),
        ]  # fmt: skip
        out += [
            Method(f"ablation: inner steps {k}", lib(dataclasses.replace(s, inner_steps=k)),
                   group="ablation", edits=False, sweep_inner_steps=k)
            for k in cfg.inner_sweep if k != cfg.inner_steps
        ]  # fmt: skip
    return out


# ------------------------------------------------------------------------------ scenes
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


def run_edit(pipe, result: InversionResult, case: EditCase, guidance: float | None, steps: int):
    """Prompt-to-Prompt word swap from an inversion (the case kind's
    :data:`~nti_utils.shapes.edits.RECIPES`); returns the edited image."""
    ctrl = edit_controller(case, pipe, steps)
    out = edit(pipe, result, case.prompts, ctrl, guidance_scale=guidance, progress=False)
    return out.images[1]


def score(pipe, method: Method, item: BenchScene, result: InversionResult, cost: dict,
          cfg: BenchConfig) -> dict:  # fmt: skip
    """Reconstruct and edit one inverted scene; its per-scene row (with the measured `cost`)."""
    image, case = item.scene.render(), item.case
    with torch.no_grad():
        z0 = image_to_latents(pipe, image)
        z_rec = reconstruct(pipe, result, method.guidance, progress=False)
        rec = latents_to_pil(pipe, z_rec)[0]
    row = {
        "method": method.name, "group": method.group, "seed": item.seed,
        "caption": item.scene.caption(), "psnr": psnr(image, rec), "ssim": ssim(image, rec),
        "latent_mse": (z_rec.float() - z0.float()).pow(2).mean().item(), **cost,
        "edit_kind": case.kind, "edit_target": case.prompts[1],
    }  # fmt: skip
    if method.sweep_inner_steps is not None:
        row["sweep_inner_steps"] = method.sweep_inner_steps
    if method.edits:
        edited = run_edit(pipe, result, case, method.guidance, cfg.steps)
        sc = score_edit(case, edited, image)
        row |= {"edit_success": float(sc.success), "edit_psnr_target": sc.psnr_target,
                "edit_psnr_background": sc.psnr_outside}  # fmt: skip
    return row


def _cost(m, share: int = 1) -> dict:
    """A measurement as per-image numbers (a batch's time and UNet rows shared among `share`
    images; its peak memory is the batch's)."""
    return {"wall_s": m.wall_s / share, "cpu_s": m.cpu_s / share,
            "unet_forward": m.forward_rows / share, "unet_backward": m.backward_rows / share,
            "peak_mem_mb": m.peak_mem_mb, "batch_size": share}  # fmt: skip


def evaluate(pipe, method: Method, items: list[BenchScene], cfg: BenchConfig) -> list[dict]:
    """Invert `items` with `method` (measured per image, or per batch), then score each."""
    rows = []
    if method.batched:
        with measure(pipe.unet) as m:
            results = method.invert(pipe, [it.scene.render() for it in items],
                                    [it.scene.caption() for it in items],
                                    [it.seed for it in items])  # fmt: skip
        return [score(pipe, method, it, r, _cost(m, len(items)), cfg) for it, r in
                zip(items, results)]  # fmt: skip
    for it in items:
        with measure(pipe.unet) as m:
            result = method.invert(pipe, it.scene.render(), it.scene.caption(), it.seed)
        rows.append(score(pipe, method, it, result, _cost(m), cfg))
    return rows


def run(cfg: BenchConfig, progress: bool = True,
        on_batch: Callable[[dict], None] | None = None, resume: dict | None = None) -> dict:  # fmt: skip
    """Run the benchmark; returns per-scene rows, the summary table and the run's context.

    Scenes are taken in batches of `cfg.batch`; within a batch every method runs in turn (so slow
    drifts of the machine's speed hit all methods alike), per image or, for ours, on the batch.
    `on_batch`, if given, gets the results so far after every batch (the command line writes them,
    so that an interrupted run leaves its finished batches behind). `resume`: the saved results of
    an interrupted run of the same configuration and model (:func:`previous_results`); the batches
    its rows cover completely are kept, not run again.

    Raises:
        ValueError: `resume` was measured on another model, or with other edit settings or
            another optimizer schedule for ours.
    """
    torch.manual_seed(0)
    dev = torch.device(cfg.device) if cfg.device else default_device()
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32  # the reference's precision
    pipe = load_pipeline(cfg.model, device=dev, dtype=dtype)
    device_type = pipe.unet.device.type
    res = model_resolution(pipe)
    all_methods = methods(cfg, device_type)
    items = [bench_scene(i, cfg, res) for i in range(cfg.scenes)]
    _warm_up(pipe, items[: min(2, len(items))])
    rows: list[dict] = []
    batches = [items[k : k + cfg.batch] for k in range(0, len(items), cfg.batch)]
    bar = tqdm(total=len(batches) * len(all_methods), desc="benchmark", disable=not progress)
    done = resume["per_scene"] if resume else []
    if resume:
        then, now = resume["context"], _context(pipe)
        for key, what in (
            ("model_fingerprint", "model weights"),
            ("edit_recipes", "edit settings"),
            ("ours_step_scale", "optimizer schedule for ours"),
        ):
            if then.get(key) != now[key]:
                raise ValueError(f"--resume: the saved run used other {what}; pass --overwrite")
    have = {(r["method"], r["seed"]) for r in done}
    earlier = (
        [*resume["context"].get("resumed_from", []), resume["context"]["date"]] if resume else []
    )
    for batch in batches:
        plan = [(m, [it for it in batch if m.group == "method" or it.index < cfg.ablation_scenes])
                for m in all_methods]  # fmt: skip
        if all((m.name, it.seed) in have for m, mine in plan for it in mine):
            seeds = {it.seed for it in batch}
            rows += [r for r in done if r["seed"] in seeds]
            bar.update(len(all_methods))
            continue
        vae = {it.seed: vae_bound(pipe, it.scene.render()) for it in batch}
        for method, mine in plan:
            for row in evaluate(pipe, method, mine, cfg) if mine else []:
                row["vae_bound"] = vae[row["seed"]]
                row["gap_to_vae"] = row["vae_bound"] - row["psnr"]
                rows.append(row)
            bar.update()
        if on_batch is not None and batch is not batches[-1]:
            on_batch(_results(cfg, pipe, all_methods, rows, earlier))
    bar.close()
    return _results(cfg, pipe, all_methods, rows, earlier)


def _results(cfg: BenchConfig, pipe, all_methods: list[Method], rows: list[dict],
             earlier: list[str]) -> dict:  # fmt: skip
    """Summary, performance target and context of the per-scene `rows` measured so far;
    `earlier`: start dates of the interrupted runs this one resumed."""
    names = [m.name for m in all_methods]
    base = []
    if cfg.ablations:  # the library's and ours' rows again, on the ablation scenes: baselines
        k = len([m for m in all_methods if m.group == "method"])
        names[k:k] = [ABLATION_BASELINE, OURS_BASELINE]
        ablation_seeds = {r["seed"] for r in rows if r["group"] == "ablation"}
        for name, of in ((ABLATION_BASELINE, LIBRARY), (OURS_BASELINE, OURS)):
            base += [dict(r, method=name, group="ablation", sweep_inner_steps=cfg.inner_steps)
                     for r in rows if r["method"] == of and r["seed"] in ablation_seeds]  # fmt: skip
    summary = summarize(rows + base, names)
    return {
        "config": dataclasses.asdict(cfg),
        "context": _context(pipe) | ({"resumed_from": earlier} if earlier else {}),
        "memory_kind": CUDA_MEMORY_KIND if pipe.unet.device.type == "cuda" else CPU_MEMORY_KIND,
        "summary": summary,
        "target": _target(summary),
        "per_scene": rows,
    }


def _warm_up(pipe, items: list[BenchScene]) -> None:
    """Tiny unmeasured runs (2 steps) of the optimizing loops: one-time costs (allocator, lazy
    initialization) should not land on whichever method happens to run first."""
    s = InversionSettings(num_steps=2, inner_steps=1)
    image, prompt = items[0].scene.render(), items[0].scene.caption()
    reference_null_text_inversion(pipe, image, prompt, s)
    null_text_inversion(pipe, image, prompt, s, progress=False)
    batched_null_text_inversion(pipe, [it.scene.render() for it in items],
                                [it.scene.caption() for it in items], s, progress=False)  # fmt: skip


def _target(summary: list[dict]) -> dict:
    """The performance target: ours within 0.1 dB of the reference's mean PSNR in at most a
    third of its mean wall time."""
    by = {r["method"]: r for r in summary}
    if REFERENCE not in by or OURS not in by:
        return {}
    ref, ours = by[REFERENCE], by[OURS]
    gap, ratio = ref["psnr"] - ours["psnr"], ours["wall_s"] / ref["wall_s"]
    return {"psnr_reference": ref["psnr"], "psnr_ours": ours["psnr"], "psnr_shortfall_db": gap,
            "wall_ratio": ratio, "cpu_ratio": ours["cpu_s"] / ref["cpu_s"],
            "met": bool(gap <= 0.1 and ratio <= 1 / 3)}  # fmt: skip


def _context(pipe) -> dict:
    unet = pipe.unet
    proc = next(iter(unet.attn_processors.values()), None)
    ctx = {
        "model_id": model_id(pipe), "model_fingerprint": model_fingerprint(pipe),
        "device": str(unet.device), "dtype": str(unet.dtype).removeprefix("torch."),
        "resolution": model_resolution(pipe), "attention_processor": type(proc).__name__,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "edit_recipes": {k: dataclasses.asdict(r) for k, r in RECIPES.items()},
        "ours_step_scale": SHORT_SCHEDULE.step_scale,
    }  # fmt: skip
    if unet.device.type == "cuda":
        ctx["gpu"] = torch.cuda.get_device_name(unet.device)
    return ctx


def previous_results(out: Path, cfg: BenchConfig) -> dict:
    """The results saved in `out`, checked to have `cfg` (:func:`run` checks the model), with the
    per-scene values JSON could not hold (NaN, inf) read back as NaN.

    Raises:
        FileNotFoundError: nothing saved in `out`.
        ValueError: the saved run had other settings.
    """
    path = Path(out) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"--resume: no results.json in {out}; run without --resume first")
    saved = json.loads(path.read_text())
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = {k: (saved["config"].get(k), v) for k, v in mine.items() if saved["config"].get(k) != v}
    if diff:
        raise ValueError(f"--resume: the run in {out} had other settings (saved, now): {diff}; "
                         "pass the same flags, or --overwrite to start over")  # fmt: skip
    nan = float("nan")
    saved["per_scene"] = [{k: nan if v is None else v for k, v in r.items()}
                          for r in saved["per_scene"]]  # fmt: skip
    return saved


def main(argv: list[str] | None = None) -> dict:
    """Command line: parse flags into a :class:`BenchConfig`, run, write outputs, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help='"toy" (default) or a diffusers pipeline folder')
    p.add_argument("--scenes", type=int, help="scenes for the methods (50; quick: 3)")
    p.add_argument("--ablation-scenes", type=int, help="of which run the ablations (20; quick: 1)")
    p.add_argument("--steps", type=int, help="DDIM steps (50; quick: 5)")
    p.add_argument("--guidance", type=float, help="w (7.5)")
    p.add_argument("--inner-steps", type=int, help="null-text inner-step ceiling (10; quick: 3)")
    p.add_argument("--inner-sweep", help="inner-step ceilings of the ablation (0,1,2,5; quick: 0)")
    p.add_argument("--seed-offset", type=int, help="scene i is HELD_OUT_SEED + offset + i (20000)")
    p.add_argument("--batch", type=int, help="images per batch of ours (25; quick: 3)")
    p.add_argument("--device", help="cuda, cpu, ... (CUDA if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="(float32)")
    p.add_argument("--autocast", choices=["auto", "none", "float16", "bfloat16"],
                   help="CUDA autocast for ours (auto: float16 on CUDA)")  # fmt: skip
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--quick", action="store_true", help="a small smoke run (tests): see QUICK")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="(results/bench)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same flags): keep its finished batches")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if k in BenchConfig.__dataclass_fields__}
    given = {k: v for k, v in given.items() if v is not None}
    if a.inner_sweep is not None:
        given["inner_sweep"] = tuple(int(k) for k in a.inner_sweep.split(","))
    cfg = BenchConfig(**{**(QUICK if a.quick else {}), **given, "ablations": not a.no_ablations})
    resume = previous_results(a.out, cfg) if a.resume else None
    if resume is None and (a.out / "results.json").exists() and not a.overwrite:
        raise FileExistsError(f"{a.out} holds a benchmark's results: pass --resume to continue that "
                              "run, --overwrite to replace it, or choose another --out")  # fmt: skip
    results = run(cfg, progress=not a.no_progress, resume=resume,
                  on_batch=lambda partial: write_outputs(partial, a.out))  # fmt: skip
    table = write_outputs(results, a.out)
    print(table)
    return results


if __name__ == "__main__":
    main()

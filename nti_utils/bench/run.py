"""Running the benchmark: every method on every batch of scenes, measured and scored, resumable.

Every input is a held-out scene *rendered* (never sampled) from a seed, with its caption, and an edit
with ground truth (a shape, color or background swap, cycling): target caption, target render and
edit region. On the same images, model and DDIM steps, each method of
:func:`~nti_utils.bench.methods.methods` is measured for

* reconstruction: PSNR and SSIM against the input, and the gap to the VAE bound (the round trip);
* cost: wall and CPU seconds, UNet evaluations (latent rows through the UNet, forward and backward),
  peak memory (:mod:`~nti_utils.bench.measure`);
* editability: Prompt-to-Prompt with the edit kind's settings
  (:data:`~nti_utils.shapes.edits.RECIPES`, :func:`~nti_utils.shapes.edits.edit_case`) from the
  inversion, scored by the renderer's scorer (success rate), PSNR against the target render, and
  PSNR against the input outside the edit region.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nti_utils.bench.config import (
    ABLATION_BASELINE,
    DDIM_W,
    LIBRARY,
    OURS,
    OURS_BASELINE,
    OURS_ONE,
    REFERENCE,
    BenchConfig,
    BenchScene,
    bench_scene,
)
from nti_utils.bench.measure import CPU_MEMORY_KIND, CUDA_MEMORY_KIND, measure
from nti_utils.bench.methods import DIRECT, SHORT_STEP_SCALE, Method, methods
from nti_utils.bench.reference import reference_null_text_inversion
from nti_utils.bench.report import run_label, summarize
from nti_utils.images import image_to_latents, latents_to_pil, model_resolution
from nti_utils.inversion import batched_null_text_inversion, reconstruct
from nti_utils.metrics import psnr, ssim, vae_bound
from nti_utils.models import default_device, load_pipeline, model_fingerprint, model_id
from nti_utils.result import InversionResult, InversionSettings
from nti_utils.shapes.edits import RECIPES, EditRecipe, edit_case


def score(
    pipe, method: Method, item: BenchScene, result: InversionResult, cost: dict, cfg: BenchConfig
) -> dict:
    """Reconstruct and edit one inverted scene (the edit with the case kind's
    :data:`~nti_utils.shapes.edits.RECIPES`); its per-scene row (with the measured `cost`)."""
    image, case = item.scene.render(), item.case
    with torch.no_grad():
        z0 = image_to_latents(pipe, image)
        start = time.perf_counter()
        z_rec = reconstruct(pipe, result, method.guidance, progress=False)
        rec_wall_s = time.perf_counter() - start
        rec = latents_to_pil(pipe, z_rec)[0]
    row = {
        "method": method.name,
        "group": method.group,
        "seed": item.seed,
        "caption": item.scene.caption(),
        "psnr": psnr(image, rec),
        "ssim": ssim(image, rec),
        "latent_mse": (z_rec.float() - z0.float()).pow(2).mean().item(),
        **cost,
        "rec_wall_s": rec_wall_s,
        "edit_kind": case.kind,
        "edit_target": case.prompts[1],
    }
    if method.sweep_inner_steps is not None:
        row["sweep_inner_steps"] = method.sweep_inner_steps
    if method.edits:
        recipe = RECIPES[case.kind]
        if method.target_null is not None:
            recipe = dataclasses.replace(recipe, target_null=method.target_null)
        _, sc = edit_case(
            pipe, result, case, recipe, guidance_scale=method.guidance, source_image=image
        )
        row["edit_success"] = float(sc.success)
        row["edit_psnr_target"] = sc.psnr_target
        row["edit_psnr_background"] = sc.psnr_outside
    return row


def _cost(m, share: int = 1) -> dict:
    """A measurement as per-image numbers (a batch's time and UNet rows shared among `share`
    images; its peak memory is the batch's)."""
    return {
        "wall_s": m.wall_s / share,
        "cpu_s": m.cpu_s / share,
        "unet_forward": m.forward_rows / share,
        "unet_backward": m.backward_rows / share,
        "peak_mem_mb": m.peak_mem_mb,
        "batch_size": share,
    }


def evaluate(pipe, method: Method, items: list[BenchScene], cfg: BenchConfig) -> Iterator[dict]:
    """Invert `items` with `method` (measured per image, or per batch) and score each; yields each
    scene's row as soon as it is scored (a batched method's after the whole batch)."""
    if method.batched:
        images = [it.scene.render() for it in items]
        prompts = [it.scene.caption() for it in items]
        with measure(pipe.unet) as m:
            results = method.invert(pipe, images, prompts, [it.seed for it in items])
        cost = _cost(m, len(items))
        yield from (score(pipe, method, it, r, cost, cfg) for it, r in zip(items, results))
        return
    for it in items:
        with measure(pipe.unet) as m:
            result = method.invert(pipe, it.scene.render(), it.scene.caption(), it.seed)
        yield score(pipe, method, it, result, _cost(m), cfg)


def run(
    cfg: BenchConfig,
    progress: bool = True,
    on_batch: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Run the benchmark; returns per-scene rows, the summary table and the run's context.

    Scenes are taken in batches of `cfg.batch`; within a batch every method runs in turn (so slow
    drifts of the machine's speed hit all methods alike), per image or, for ours, on the batch.
    `on_batch`, if given, gets the results so far after every batch (the command line writes all
    its outputs then), and `on_row` after every scored row, i.e. after each scene of a method that
    inverts one image per call and after each batch of a batched one (the command line saves
    ``results.json`` then, so that an interrupted run loses at most the method it was measuring on
    one scene); what it gets holds the resumed run's kept rows too, also those of scenes the loop
    has not reached yet. `resume`: the saved results of an interrupted run of the same configuration and
    model (:func:`previous_results`); its rows are kept, and only the missing (method, scene) pairs
    run (a batched method's whole batch when any of its scenes is missing, since it is measured per
    batch).

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
    ctx = _context(pipe)  # once, at the start: its date and commit are this run's
    if resume:
        then, now = resume["context"], ctx
        then = {**then, "edit_recipes": _with_defaults(then.get("edit_recipes"))}
        for key, what in (
            ("model_fingerprint", "model weights"),
            ("edit_recipes", "edit settings"),
            ("ours_step_scale", "optimizer schedule for ours"),
        ):
            if then.get(key) != now[key]:
                raise ValueError(f"--resume: the saved run used other {what}; pass --overwrite")
    have = {(r["method"], r["seed"]): r for r in done}
    earlier = (
        [*resume["context"].get("resumed_from", []), run_label(resume["context"])] if resume else []
    )
    for batch in batches:
        vae = {it.seed: vae_bound(pipe, it.scene.render()) for it in batch}
        for method in all_methods:
            mine = [it for it in batch if _runs_on(method, it, cfg)]
            todo = [it for it in mine if (method.name, it.seed) not in have]
            if method.batched and todo:
                todo = mine  # measured per batch: a batch is run whole or kept whole
            running = {it.seed for it in todo}
            rows += [have[method.name, it.seed] for it in mine if it.seed not in running]
            for row in evaluate(pipe, method, todo, cfg) if todo else []:
                row["vae_bound"] = vae[row["seed"]]
                row["gap_to_vae"] = row["vae_bound"] - row["psnr"]
                rows.append(row)
                if on_row is not None:  # with the kept rows the loop has not reached yet
                    seen = {(r["method"], r["seed"]) for r in rows}
                    kept = [r for r in done if (r["method"], r["seed"]) not in seen]
                    on_row(_results(cfg, pipe, ctx, all_methods, rows + kept, earlier))
            bar.update()
        if on_batch is not None and batch is not batches[-1]:
            on_batch(_results(cfg, pipe, ctx, all_methods, rows, earlier))
    bar.close()
    return _results(cfg, pipe, ctx, all_methods, rows, earlier)


def _runs_on(method: Method, item: BenchScene, cfg: BenchConfig) -> bool:
    """Whether `method` runs on scene `item`: every method on every scene, ablations on the first
    ``ablation_scenes``, and a method with `max_scenes` on that many at most."""
    if method.max_scenes is not None and item.index >= method.max_scenes:
        return False
    return method.group == "method" or item.index < cfg.ablation_scenes


def _results(
    cfg: BenchConfig,
    pipe,
    ctx: dict,
    all_methods: list[Method],
    rows: list[dict],
    earlier: list[str],
) -> dict:
    """Summary, performance target and context (`ctx`, :func:`_context` at the run's start) of
    the per-scene `rows` measured so far; `earlier`: the interrupted runs this one resumed (start
    date and commit, :func:`~nti_utils.bench.report.run_label`)."""
    names = [m.name for m in all_methods]
    base = []
    if cfg.ablations:  # the library's and ours' rows again, on the ablation scenes: baselines
        k = len([m for m in all_methods if m.group == "method"])
        names[k:k] = [ABLATION_BASELINE, OURS_BASELINE]
        ablation_seeds = {r["seed"] for r in rows if r["group"] == "ablation"}
        for name, of in ((ABLATION_BASELINE, LIBRARY), (OURS_BASELINE, OURS)):
            base += [
                dict(r, method=name, group="ablation", sweep_inner_steps=cfg.inner_steps)
                for r in rows
                if r["method"] == of and r["seed"] in ablation_seeds
            ]
    summary = summarize(rows + base, names)
    return {
        "config": dataclasses.asdict(cfg),
        "context": ctx | ({"resumed_from": earlier} if earlier else {}),
        "memory_kind": CUDA_MEMORY_KIND if pipe.unet.device.type == "cuda" else CPU_MEMORY_KIND,
        "summary": summary,
        "targets": targets(summary),
        "per_scene": rows,
    }


def _warm_up(pipe, items: list[BenchScene]) -> None:
    """Tiny unmeasured runs (2 steps) of the optimizing loops: one-time costs (allocator, lazy
    initialization) should not land on whichever method happens to run first."""
    s = InversionSettings(num_steps=2, inner_steps=1)
    image, prompt = items[0].scene.render(), items[0].scene.caption()
    reference_null_text_inversion(pipe, image, prompt, s)
    images = [it.scene.render() for it in items]
    prompts = [it.scene.caption() for it in items]
    batched_null_text_inversion(pipe, images[:1], prompts[:1], s, progress=False)
    batched_null_text_inversion(pipe, images, prompts, s, progress=False)


TARGETS = {"ours, one image": (OURS_ONE, 1 / 3), "ours, batched": (OURS, 1 / 8)}
"""Speed targets of null-text inversion: (row, largest wall time as a share of the reference's)."""
DIRECT_MAX_RATIO = 2.2
"""Direct Inversion's target: its inversion + reconstruction in at most this multiple of DDIM
inversion's (at w = 7.5) inversion + reconstruction."""


def targets(summary: list[dict]) -> dict[str, dict]:
    """The performance targets, each with its measured numbers and ``met``:

    * ``"ours, one image"`` / ``"ours, batched"``: the reference loop's mean PSNR within 0.1 dB and
      its edit success within 0.05, in at most 1/3 (one image per call) or 1/8 (batched) of its
      mean wall time;
    * ``"Direct Inversion"``: within 0.1 dB of the VAE bound, edit success at least the reference
      loop's, inversion + reconstruction in at most :data:`DIRECT_MAX_RATIO` times DDIM
      inversion's (the rows' ``wall_s + rec_wall_s``).

    A target whose rows are missing from `summary` is left out; one whose edits were not scored
    (NaN) is not met.
    """
    by = {r["method"]: r for r in summary}
    ref, out = by.get(REFERENCE), {}
    for label, (name, max_ratio) in TARGETS.items():
        ours = by.get(name)
        if ref is None or ours is None:
            continue
        gap, ratio = ref["psnr"] - ours["psnr"], ours["wall_s"] / ref["wall_s"]
        edit_drop = ref["edit_success"] - ours["edit_success"]
        out[label] = {
            "method": name,
            "psnr_reference": ref["psnr"],
            "psnr": ours["psnr"],
            "psnr_shortfall_db": gap,
            "edit_success_reference": ref["edit_success"],
            "edit_success": ours["edit_success"],
            "wall_ratio": ratio,
            "wall_ratio_max": max_ratio,
            "cpu_ratio": ours["cpu_s"] / ref["cpu_s"],
            "met": bool(gap <= 0.1 and edit_drop <= 0.05 and ratio <= max_ratio),
        }
    direct, ddim = by.get(DIRECT), by.get(DDIM_W)
    if ref is not None and direct is not None and ddim is not None:
        ratio = (direct["wall_s"] + direct["rec_wall_s"]) / (ddim["wall_s"] + ddim["rec_wall_s"])
        out["Direct Inversion"] = {
            "method": DIRECT,
            "psnr": direct["psnr"],
            "gap_to_vae": direct["gap_to_vae"],
            "edit_success_reference": ref["edit_success"],
            "edit_success": direct["edit_success"],
            "wall_ratio": ratio,
            "wall_ratio_max": DIRECT_MAX_RATIO,
            "met": bool(
                direct["gap_to_vae"] <= 0.1
                and direct["edit_success"] >= ref["edit_success"]
                and ratio <= DIRECT_MAX_RATIO
            ),
        }
    return out


def _context(pipe) -> dict:
    unet = pipe.unet
    proc = next(iter(unet.attn_processors.values()), None)
    ctx = {
        "model_id": model_id(pipe),
        "model_fingerprint": model_fingerprint(pipe),
        "device": str(unet.device),
        "dtype": str(unet.dtype).removeprefix("torch."),
        "resolution": model_resolution(pipe),
        "attention_processor": type(proc).__name__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
        "edit_recipes": {k: dataclasses.asdict(r) for k, r in RECIPES.items()},
        "ours_step_scale": SHORT_STEP_SCALE,
    }
    if unet.device.type == "cuda":
        ctx["gpu"] = torch.cuda.get_device_name(unet.device)
    return ctx


def _with_defaults(recipes: dict | None) -> dict | None:
    """Saved recipes with the fields that a later :class:`EditRecipe` added at their defaults (a
    run saved before a field existed was measured with its default)."""
    if recipes is None:
        return None
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(EditRecipe)
        if f.default is not dataclasses.MISSING
    }
    return {kind: {**defaults, **r} for kind, r in recipes.items()}


def _commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


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
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(
            f"--resume: {path} is truncated or not valid JSON ({err}); the run that wrote it was "
            "probably killed mid-write. Start over with --overwrite"
        ) from None
    shapes = {"config": dict, "context": dict, "per_scene": list}
    bad = [
        k
        for k, t in shapes.items()
        if not isinstance(saved, dict) or not isinstance(saved.get(k), t)
    ]
    if bad or not all(isinstance(r, dict) for r in saved["per_scene"]):
        raise ValueError(
            f"--resume: {path} is not a benchmark's results.json (missing or malformed: "
            f"{bad or ['per_scene rows']}); start over with --overwrite"
        )
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = {k: (saved["config"].get(k), v) for k, v in mine.items() if saved["config"].get(k) != v}
    if diff:
        raise ValueError(
            f"--resume: the run in {out} had other settings (saved, now): {diff}; "
            "pass the same flags, or --overwrite to start over"
        )
    nan = float("nan")
    saved["per_scene"] = [
        {k: nan if v is None else v for k, v in r.items()} for r in saved["per_scene"]
    ]
    return saved

"""Measure the embedded model against its quality bars: ``python -m nti_utils.shapes.evaluate``.

Prints a table and writes the numbers as JSON (``--out``). What is measured, on held-out scenes
(numbered from :data:`~nti_utils.shapes.seeds.HELD_OUT_SEED`, never trained on, each measure its
own block of :mod:`~nti_utils.shapes.seeds`):

1. VAE round-trip PSNR on rendered images (the paper's "VAE upper bound"), and how local its
   latents are (:func:`latent_locality`).
2. Prompt adherence of DDIM samples (50 steps) at the default guidance, scored by
   :mod:`nti_utils.shapes.score`: every single-object prompt with several seeds, and two-object
   prompts.
3. Cross-attention localization: for single-object samples, the share of the shape word's averaged
   cross-attention mass (at the resolution Prompt-to-Prompt reads) inside the detected object.
4. The paper's story on rendered images: DDIM inversion reconstructed at w = 1 and at the default w.

``--swaps N`` instead runs N Prompt-to-Prompt shape swaps on null-text-inverted renders and reports
the success rate and the PSNR outside the edit region; ``--redrawn-edits N`` runs N edits (shape,
color and background swaps in turn, with :data:`~nti_utils.shapes.edits.RECIPES`; ``--target-null
plain`` gives their target rows the plain ∅) on scenes drawn by the second renderer
(:mod:`nti_utils.shapes.redraw`), each ground truth drawn the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nti_utils.attention import AttentionStore, default_map_resolution
from nti_utils.ddim import DDIMSchedule, invert, sample
from nti_utils.editing import TARGET_NULLS
from nti_utils.images import decode, encode, model_resolution, pil_to_tensor
from nti_utils.inversion import null_text_inversion
from nti_utils.metrics import psnr
from nti_utils.models import embed_prompts, load_pipeline
from nti_utils.result import InversionSettings
from nti_utils.sampling import generate
from nti_utils.shapes.attn_loss import shape_attention_inside
from nti_utils.shapes.data import single_object_prompts
from nti_utils.shapes.edits import EDIT_KINDS, RECIPES, edit_case, edit_rates, make_edit
from nti_utils.shapes.redraw import Style, redraw, redraw_region
from nti_utils.shapes.score import score_caption
from nti_utils.shapes.seeds import (
    INVERSION_STORY,
    LOCALITY,
    REDRAWN_EDITS,
    SHAPE_SWAPS,
    TRAINER_CHECK,
    TWO_OBJECTS,
)
from nti_utils.shapes.world import scene_from_seed

DEFAULT_GUIDANCE = 7.5


def vae_psnr(pipe, n: int = 200, batch: int = 50) -> float:
    """Mean PSNR of decode(encode(x)) over `n` held-out renders."""
    scenes = [scene_from_seed(TRAINER_CHECK + i) for i in range(n)]
    vals = []
    for i in range(0, n, batch):
        imgs = [s.render() for s in scenes[i : i + batch]]
        rec = decode(pipe.vae, encode(pipe.vae, pil_to_tensor(imgs)))
        vals += [psnr(im, r) for im, r in zip(imgs, rec)]
    return float(np.mean(vals))


def latent_locality(pipe, n: int = 30) -> float:
    """How local the VAE's latents are: the mean |z_source - z_target| over background latent pixels
    far (>= 4 latent pixels) from the object, when only the object's color changes, over `n`
    held-out scenes. 0 for a perfectly local encoder; compare it with the latents' own size (mean |z|).
    How much image-wide information the latents carry matters for LocalBlend, which keeps the
    source's latents outside a mask (the model card of ``data/toy-sd`` has what we measured)."""
    diffs = []
    for i in range(n):
        scene = scene_from_seed(LOCALITY + i, n_objects=1)
        case = make_edit(scene, "color", np.random.default_rng(i))
        z = encode(pipe.vae, pil_to_tensor([scene.render(), case.target.render()]))
        region = torch.from_numpy(case.region)[None, None].float()
        factor = region.shape[-1] // z.shape[-1]
        near = F.max_pool2d(region, 2 * 4 * factor + 1, stride=factor, padding=4 * factor)
        far = near[0, 0] == 0
        diffs.append(float((z[0] - z[1]).abs().mean(0)[far].mean()))
    return float(np.mean(diffs))


def adherence(pipe, prompts, guidance, seed, steps, batch, progress=True):
    """Sample `prompts` and score them; returns per-sample dicts (with attention mass for
    single-object prompts)."""
    rows = []
    res = default_map_resolution(pipe.unet)
    gen = torch.Generator().manual_seed(seed)
    for i in tqdm(
        range(0, len(prompts), batch), desc=f"samples w={guidance}", disable=not progress
    ):
        chunk = prompts[i : i + batch]
        store = AttentionStore()
        out = generate(pipe, chunk, steps, guidance, gen, controller=store, progress=False)
        maps = store.maps(res)
        for j, (img, prompt) in enumerate(zip(out.images, chunk)):
            s = score_caption(img, prompt)
            row = {
                "prompt": prompt,
                "background": s.background,
                "color": all(s.colors),
                "shape": all(s.shapes),
                "count": s.count,
            }
            inside = shape_attention_inside(maps[j], pipe.tokenizer, prompt, img)
            if inside is not None:
                row["attention_inside"] = inside
            rows.append(row)
    return rows


CURVE_SCALES = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0)
"""The guidance scales of :func:`guidance_curve`."""


def guidance_curve(pipe, scales=CURVE_SCALES, seeds=3, steps=50, batch=45, progress=True) -> dict:
    """Prompt adherence against guidance: every single-object prompt with `seeds` seeds (the same
    initial noise at every w), sampled at each scale; per scale the share of samples whose
    background, color and shape are all right (``"all"``), and each attribute alone.

    Returns:
        ``{"n": samples per scale, "scales": {w: {"all", "background", "color", "shape"}}}``.
    """
    prompts = single_object_prompts() * seeds
    out = {}
    for w in scales:
        rows = adherence(pipe, prompts, w, 0, steps, batch, progress)
        rates = {k: float(np.mean([r[k] for r in rows])) for k in ("background", "color", "shape")}
        rates["all"] = float(np.mean([r["background"] and r["color"] and r["shape"] for r in rows]))
        out[f"{w:g}"] = rates
    return {"n": len(prompts), "steps": steps, "scales": out}


def inversion_story(pipe, guidance, n=20, steps=50, progress=True):
    """PSNR of DDIM inversion + reconstruction at w = 1 and w = `guidance` on `n` renders."""
    scenes = [scene_from_seed(INVERSION_STORY + i) for i in range(n)]
    imgs = [s.render() for s in scenes]
    z0 = encode(pipe.vae, pil_to_tensor(imgs))
    cond = embed_prompts(pipe, [s.caption() for s in scenes])
    null = embed_prompts(pipe, "")
    sched = DDIMSchedule.from_scheduler(pipe.scheduler, steps)
    z_T = invert(pipe.unet, z0, cond, sched, progress=progress)[-1]
    out = {"vae_bound": np.mean([psnr(a, b) for a, b in zip(imgs, decode(pipe.vae, z0))])}
    for w in (1.0, guidance):
        rec = decode(
            pipe.vae, sample(pipe.unet, z_T, cond, sched, w, null, progress=progress).latents
        )
        out[f"ddim_w{w:g}"] = float(np.mean([psnr(a, b) for a, b in zip(imgs, rec)]))
    return {k: float(v) for k, v in out.items()}


def shape_swaps(
    pipe, n: int = 20, steps: int = 50, guidance: float = DEFAULT_GUIDANCE, progress: bool = True
) -> dict:
    """Prompt-to-Prompt word swap of the shape word on `n` null-text-inverted held-out renders
    (:func:`~nti_utils.shapes.edits.edit_case` with the shape recipe: Replace with a LocalBlend on
    the shape words): success rate of the intended shape change and mean PSNR outside the edit
    region against the input."""
    settings = InversionSettings(num_steps=steps, guidance_scale=guidance)
    rng = np.random.default_rng(0)
    scores = []
    for i in tqdm(range(n), desc="shape swaps", disable=not progress):
        scene = scene_from_seed(SHAPE_SWAPS + i, n_objects=1)
        case = make_edit(scene, "shape", rng)
        inv = null_text_inversion(pipe, scene.render(), scene.caption(), settings, progress=False)
        scores.append(edit_case(pipe, inv, case)[1])
    return edit_rates(scores)


def redrawn_edits(
    pipe,
    n: int = 30,
    steps: int = 50,
    guidance: float = DEFAULT_GUIDANCE,
    progress: bool = True,
    target_null: str | None = None,
) -> dict:
    """Null-text inversion + Prompt-to-Prompt on `n` single-object scenes drawn by the second
    renderer (:func:`~nti_utils.shapes.redraw.redraw`, one random :class:`~nti_utils.shapes.redraw.Style`
    per scene: other edges, off-palette shades, small rotations, noise), the edit kinds in turn.
    Each ground truth is the edited scene drawn in the same style, and the region outside which
    pixels must be kept is :func:`~nti_utils.shapes.redraw.redraw_region`.

    Success is read with the scorer's rotation-invariant shapes (``rotation_invariant=True``).
    `target_null` (``"inverted"`` or ``"plain"``) overrides the recipes' target-row null embedding
    (:attr:`~nti_utils.shapes.edits.EditRecipe.target_null`).

    Returns:
        `dict`: :func:`~nti_utils.shapes.edits.edit_rates` over all edits, and per kind under
        ``"by_kind"``; ``"reconstruction_psnr"``: mean PSNR of the inversions' reconstructions;
        ``"ground_truth_read"``: the share of ground truths the scorer reads right (the ceiling
        of the success rate).
    """
    settings = InversionSettings(num_steps=steps, guidance_scale=guidance)
    side = model_resolution(pipe)
    scores, kinds, recon, truth_read = [], [], [], []
    for i in tqdm(range(n), desc="redrawn edits", disable=not progress):
        seed = REDRAWN_EDITS + i
        scene = scene_from_seed(seed, n_objects=1, resolution=side)
        style = Style.from_seed(seed)
        case = make_edit(scene, EDIT_KINDS[i % len(EDIT_KINDS)], np.random.default_rng(seed))
        case = dataclasses.replace(case, region=redraw_region(case.source, case.target, style))
        image, truth = redraw(scene, style), redraw(case.target, style)
        inv = null_text_inversion(pipe, image, scene.caption(), settings, progress=False)
        # this renderer turns squares and triangles: read shapes at any rotation
        recipe = RECIPES[case.kind]
        if target_null is not None:
            recipe = dataclasses.replace(recipe, target_null=target_null)
        out, score = edit_case(
            pipe,
            inv,
            case,
            recipe,
            source_image=image,
            target_image=truth,
            rotation_invariant=True,
        )
        scores.append(score)
        truth_read.append(score_caption(truth, case.target.caption(), rotation_invariant=True).all)
        recon.append(psnr(image, out.images[0]))
        kinds.append(case.kind)
    by_kind = {
        k: edit_rates([s for s, kk in zip(scores, kinds) if kk == k])
        for k in EDIT_KINDS
        if k in kinds
    }
    return edit_rates(scores) | {
        "by_kind": by_kind,
        "reconstruction_psnr": float(np.mean(recon)),
        "ground_truth_read": float(np.mean(truth_read)),
    }


def evaluate(
    model="toy", guidance=DEFAULT_GUIDANCE, seeds=3, n_two=60, steps=50, batch=45, progress=True
) -> dict:
    """All measurements as a dict (see the module docstring)."""
    torch.manual_seed(0)
    pipe = load_pipeline(model, device="cpu")
    t0 = time.perf_counter()
    single = single_object_prompts() * seeds
    two = [scene_from_seed(TWO_OBJECTS + i, n_objects=2).caption() for i in range(n_two)]
    rows1 = adherence(pipe, single, guidance, 0, steps, batch, progress)
    rows2 = adherence(pipe, two, guidance, 1, steps, batch, progress) if n_two else []

    def rate(rows, key):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    inside = [r["attention_inside"] for r in rows1 if "attention_inside" in r]
    return {
        "model": str(model),
        "guidance": guidance,
        "steps": steps,
        "vae_psnr_200": vae_psnr(pipe),
        "latent_locality": latent_locality(pipe),
        "single": {k: rate(rows1, k) for k in ("background", "color", "shape", "count")}
        | {"n": len(rows1)},
        "two": {k: rate(rows2, k) for k in ("background", "color", "shape", "count")}
        | {"n": len(rows2)},
        "attention_inside": float(np.mean(inside)) if inside else float("nan"),
        "attention_n": len(inside),
        "attention_resolution": default_map_resolution(pipe.unet),
        "inversion": inversion_story(pipe, guidance, progress=progress),
        "seconds": time.perf_counter() - t0,
    }


def format_table(r: dict) -> str:
    s, t, inv = r["single"], r["two"], r["inversion"]
    w = r["guidance"]
    lines = [
        f"embedded model evaluation ({r['model']}, {r['steps']} DDIM steps, guidance {w:g})",
        f"{'measure':<52}{'value':>10}{'bar':>10}",
        f"{'VAE round-trip PSNR, 200 held-out renders (dB)':<52}{r['vae_psnr_200']:>10.2f}{'>= 30':>10}",
        f"{'VAE latent change far from a recolored object':<52}{r['latent_locality']:>10.3f}{'':>10}",
        f"{'single-object samples (n=' + str(s['n']) + '): background right':<52}{s['background']:>10.3f}{'>= 0.90':>10}",
        f"{'  object color right':<52}{s['color']:>10.3f}{'>= 0.90':>10}",
        f"{'  shape right':<52}{s['shape']:>10.3f}{'>= 0.80':>10}",
        f"{'  one object found':<52}{s['count']:>10.3f}{'':>10}",
        f"{'two-object samples (n=' + str(t['n']) + '): background right':<52}{t['background']:>10.3f}{'':>10}",
        f"{'  both colors right':<52}{t['color']:>10.3f}{'':>10}",
        f"{'  both shapes right':<52}{t['shape']:>10.3f}{'':>10}",
        f"{'  two objects found':<52}{t['count']:>10.3f}{'':>10}",
        f"{'shape-word attention inside object (' + str(r['attention_resolution']) + 'x' + str(r['attention_resolution']) + ' maps)':<52}{r['attention_inside']:>10.3f}{'>= 0.60':>10}",
        f"{'VAE bound on 20 renders (dB)':<52}{inv['vae_bound']:>10.2f}{'':>10}",
        f"{'DDIM inversion + reconstruction, w=1 (dB)':<52}{inv['ddim_w1']:>10.2f}{'~ bound':>10}",
        f"{'DDIM inversion + reconstruction, w=' + format(w, 'g') + ' (dB)':<52}{inv[f'ddim_w{w:g}']:>10.2f}{'worse':>10}",
        f"(measured in {r['seconds']:.0f} s)",
    ]
    return "\n".join(lines)


def _rates_line(r: dict) -> str:
    """One line of :func:`~nti_utils.shapes.edits.edit_rates`' numbers."""
    return (
        f"n {r['n']:>3}  success {r['success']:.2f}  outside {r['psnr_outside_mean']:.1f} dB  "
        f">= 25 dB {r['psnr_outside_ge_25']:.2f}  both {r['success_and_ge_25']:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate the embedded model against its quality bars.")
    p.add_argument("--model", default="toy", help='"toy" or a pipeline folder')
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seeds", type=int, default=3, help="samples per single-object prompt")
    p.add_argument("--n-two", type=int, default=60, help="two-object samples")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    p.add_argument(
        "--curve",
        action="store_true",
        help="only measure adherence (all of background, color, shape right) against guidance",
    )
    p.add_argument(
        "--swaps",
        type=int,
        default=0,
        help="only run N Prompt-to-Prompt shape swaps on inverted renders",
    )
    p.add_argument(
        "--redrawn-edits",
        type=int,
        default=0,
        help="only run N edits on inverted scenes drawn by the second renderer",
    )
    p.add_argument(
        "--target-null",
        choices=TARGET_NULLS,
        default=None,
        help="with --redrawn-edits: the target row's null embedding (default: the recipes')",
    )
    args = p.parse_args(argv)
    if args.redrawn_edits:
        pipe = load_pipeline(args.model, device="cpu")
        r = redrawn_edits(
            pipe, args.redrawn_edits, args.steps, args.guidance, target_null=args.target_null
        )
        print(
            f"edits on {r['n']} redrawn scenes (reconstruction {r['reconstruction_psnr']:.1f} dB; "
            f"the scorer reads {r['ground_truth_read']:.2f} of the ground truths right):"
        )
        for kind, v in {"all": r, **r["by_kind"]}.items():
            print(f"{kind:<11} {_rates_line(v)}")
    elif args.curve:
        torch.manual_seed(0)
        pipe = load_pipeline(args.model, device="cpu")
        r = guidance_curve(pipe, seeds=args.seeds, steps=args.steps)
        print(f"single-object samples per scale: {r['n']} ({r['steps']} DDIM steps)")
        print(f"{'w':>6}{'all right':>11}{'background':>12}{'color':>8}{'shape':>8}")
        for w, v in r["scales"].items():
            print(
                f"{w:>6}{v['all']:>11.3f}{v['background']:>12.3f}{v['color']:>8.3f}{v['shape']:>8.3f}"
            )
    elif args.swaps:
        pipe = load_pipeline(args.model, device="cpu")
        r = shape_swaps(pipe, args.swaps, args.steps, args.guidance)
        print(f"shape swaps on inverted renders: {_rates_line(r)}")
    else:
        r = evaluate(args.model, args.guidance, args.seeds, args.n_two, args.steps)
        print(format_table(r))
    if args.out:
        args.out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

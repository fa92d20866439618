"""Choose the embedded model's Prompt-to-Prompt settings per edit kind on held-out scenes.

Inverts `--n` held-out scenes (numbered from :data:`nti_utils.shapes.seeds.TUNING`: neither the
benchmark's, the evaluator's, the tests' nor the notebooks') once with null-text inversion, caches the results, then edits each
with every recipe of a small grid and prints success rate, PSNR outside the edit region (the
background; the object for background swaps) and how often success and >= 25 dB there hold
together, best first. This is how :data:`nti_utils.shapes.edits.RECIPES` was chosen (the grids
below are the last round of each search; the model card of ``data/toy-sd`` gives the rounds)::

    python tools/tune_recipes.py --kind shape --n 16   # about 70 s per recipe on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nti_utils.inversion import null_text_inversion
from nti_utils.models import load_pipeline
from nti_utils.result import InversionSettings
from nti_utils.shapes.edits import RECIPES, EditRecipe, edit_case, edit_rates, make_edit
from nti_utils.shapes.seeds import TUNING
from nti_utils.shapes.world import scene_from_seed
from nti_utils.storage import load_inversion, save_inversion

NULLS = ["inverted", "plain"]  # the target row's null embedding (the last round: its own lever)
GRIDS = {
    "shape": {
        "cross_replace_steps": [0.2, 0.4],
        "self_replace_steps": [0.6, 0.8],
        "target_null": NULLS,
    },
    "color": {
        "cross_replace_steps": [0.6, 0.8],
        "target_null": NULLS,
    },
    "background": {
        "cross_replace_steps": [0.6, 0.8],
        "self_replace_steps": [0.4, 0.6],
        "target_null": NULLS,
    },
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=sorted(GRIDS), default="shape")
    p.add_argument("--n", type=int, default=16, help="held-out scenes")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--model", default="toy")
    p.add_argument("--cache", type=Path, default=Path("~/.cache/nti-lab/tune").expanduser())
    args = p.parse_args(argv)

    pipe = load_pipeline(args.model, device="cpu")
    settings = InversionSettings(num_steps=args.steps)
    cases, inversions = [], []
    for i in tqdm(range(args.n), desc="inversions"):
        scene = scene_from_seed(TUNING + i, n_objects=1)
        cases.append(make_edit(scene, args.kind, np.random.default_rng(i)))
        path = args.cache / f"{TUNING + i}-{args.steps}.safetensors"
        if path.exists():
            inversions.append(load_inversion(path, pipe, args.steps))
        else:
            inv = null_text_inversion(
                pipe, scene.render(), scene.caption(), settings, progress=False
            )
            inversions.append(inv)
            save_inversion(inv, path)

    grid = GRIDS[args.kind]
    base = RECIPES[args.kind]
    recipes = [
        dataclasses.replace(base, **dict(zip(grid, values)))
        for values in itertools.product(*grid.values())
    ]
    rows = []
    for r in tqdm(recipes, desc="recipes"):
        scores = [edit_case(pipe, inv, case, r)[1] for case, inv in zip(cases, inversions)]
        rows.append((edit_rates(scores), r))
        tqdm.write(_line(*rows[-1]))
    # a background swap changes everything but the object, so "outside" is the object alone and
    # 25 dB there is not the bar: rank those by success, then by how well the object is kept
    keys = ("success", "psnr_outside_mean")
    if args.kind != "background":
        keys = ("success_and_ge_25", *keys)
    print(f"\n{args.kind} edits on {args.n} held-out scenes, best first:")
    for rates, r in sorted(rows, key=lambda row: [-row[0][k] for k in keys]):
        print(_line(rates, r))


def _line(rates: dict, recipe: EditRecipe) -> str:
    return (
        f"both {rates['success_and_ge_25']:.2f}  success {rates['success']:.2f}  "
        f"bg>=25 {rates['psnr_outside_ge_25']:.2f}  bg {rates['psnr_outside_mean']:5.1f} dB  "
        f"{recipe}"
    )


if __name__ == "__main__":
    main()

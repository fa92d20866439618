"""Probe for the embedded model's model card: do the optimized null embeddings hold Prompt-to-Prompt
edits back? Each tuning scene (seeds from 10,003,000, not the benchmark's; the kinds in turn) is
null-text-inverted once and edited twice with `RECIPES`: as usual (every row guided with the
optimized ∅_t) and with the target row's ∅_t replaced by the plain empty-prompt ∅ (the source row
keeps ∅_t, so it still retraces the image).

    python tools/probe_plain_null.py [N]     # N scenes (12: about 9 minutes on 2 CPU cores)
"""

import copy
import sys
import time

import numpy as np
import torch

from nti_utils.images import model_resolution
from nti_utils.inversion import null_text_inversion
from nti_utils.models import embed_prompts, load_pipeline
from nti_utils.result import InversionSettings
from nti_utils.shapes.edits import EDIT_KINDS, edit_case, make_edit
from nti_utils.shapes.world import scene_from_seed

TUNING_SEED = 10_003_000


def plain_target_nulls(inv, plain: torch.Tensor):
    """A copy of `inv` whose null embedding per step is [∅_t; ∅] for the [source; target] rows."""
    out = copy.copy(inv)
    out.uncond_per_step = lambda: [torch.cat([u, plain.to(u)]) for u in inv.uncond_per_step()]
    return out


def main(n: int) -> None:
    pipe = load_pipeline("toy")
    side = model_resolution(pipe)
    rng = np.random.default_rng(0)
    plain = embed_prompts(pipe, [""])
    settings = InversionSettings(num_steps=50, guidance_scale=7.5)
    rows, t0 = [], time.time()
    for k in range(n):
        kind = EDIT_KINDS[k % len(EDIT_KINDS)]
        scene = scene_from_seed(TUNING_SEED + k, n_objects=1, resolution=side)
        case = make_edit(scene, kind, rng)
        inv = null_text_inversion(pipe, scene.render(), scene.caption(), settings, progress=False)
        a = edit_case(pipe, inv, case)[1]
        b = edit_case(pipe, plain_target_nulls(inv, plain), case)[1]
        rows.append((kind, a, b))
        print(
            f"{k:2d} {kind:<10} optimized ∅_t: {a.success!s:5} {a.psnr_outside:5.1f} dB | "
            f"plain ∅ in the target row: {b.success!s:5} {b.psnr_outside:5.1f} dB",
            flush=True,
        )
    for kind in EDIT_KINDS:
        r = [x for x in rows if x[0] == kind]
        if not r:
            continue
        ok = [np.mean([x[i].success for x in r]) for i in (1, 2)]
        out = [np.mean([x[i].psnr_outside for x in r]) for i in (1, 2)]
        print(
            f"{kind}: success {ok[0]:.2f} -> {ok[1]:.2f}, outside {out[0]:.1f} -> {out[1]:.1f} dB"
        )
    ok = [np.mean([x[i].success for x in rows]) for i in (1, 2)]
    print(f"all {n}: success {ok[0]:.2f} -> {ok[1]:.2f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)

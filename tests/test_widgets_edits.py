"""Edit cases with ground truth, and the ablation panel driven programmatically."""

import numpy as np
import pytest
from PIL import Image

from nti_utils.attention import cross_attention_resolutions, finest_map_resolution
from nti_utils.shapes.edits import (
    EDIT_KINDS,
    RECIPES,
    EditRecipe,
    EditScore,
    edit_controller,
    edit_rates,
    make_edit,
    score_edit,
)
from nti_utils.shapes.world import scene_from_seed
from nti_utils.widgets import AblationPanel


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_cases_have_ground_truth(kind):
    scene = scene_from_seed(5, n_objects=1)
    case = make_edit(scene, kind, np.random.default_rng(0))
    assert case.source_word != case.target_word and case.source_word in case.prompts[0].split()
    assert case.target_word in case.prompts[1].split() and case.region.any()
    perfect = score_edit(case, case.target.render(), case.source.render())
    assert perfect.success and perfect.psnr_target == float("inf")
    assert perfect.psnr_outside == float("inf") or kind == "background"
    unchanged = score_edit(case, case.source.render(), case.source.render())
    assert not unchanged.success
    with pytest.raises(ValueError, match="edited image is"):
        score_edit(case, Image.new("RGB", (8, 8)), case.source.render())


def test_panel_runs_on_click_and_reacts_to_controls(tiny_pipe):
    scenes = [scene_from_seed(s, n_objects=1, resolution=32) for s in (1, 2)]
    cases = [make_edit(s, "shape", np.random.default_rng(0)) for s in scenes]
    panel = AblationPanel(tiny_pipe, cases, num_steps=3)
    panel.controls["inner_steps"].value = 1
    panel.run_button.click()
    assert panel.runs == 1 and set(panel.last_metrics) >= {"psnr_reconstruction", "edit_success"}
    assert all(im.value[:4] == b"\x89PNG" for im in panel.images)
    first = dict(panel.last_metrics)
    panel.controls["guidance"].value = 3.0
    panel.controls["reweight"].value = 2.0
    panel.controls["blend"].value = False
    panel.run_button.click()
    assert panel.runs == 2 and panel.last_metrics != first
    assert len(panel._inversions) == 2  # a new guidance needs a new inversion
    panel.controls["cross_replace"].value = 0.2
    panel.run_button.click()
    assert len(panel._inversions) == 2  # editing settings reuse the cached inversion
    assert "psnr_reconstruction" in panel.metrics.value


def test_edit_controller_follows_the_kinds_recipe(tiny_pipe, small_scene):
    res = cross_attention_resolutions(tiny_pipe.unet)
    finest = max(res["down"] + res["up"])
    assert finest_map_resolution(tiny_pipe.unet) == finest
    rng = np.random.default_rng(0)
    for kind in EDIT_KINDS:
        case = make_edit(small_scene, kind, rng)
        recipe = RECIPES[kind]
        ctrl = edit_controller(case, tiny_pipe, 10)
        # the windows of the recipe, in steps: cross-attention taken for the first k steps
        taken = ctrl.cross_alphas[:, 0, 1].tolist()
        assert taken == [1.0] * int(recipe.cross_replace_steps * 10) + [0.0] * (
            10 - int(recipe.cross_replace_steps * 10)
        )
        assert ctrl.self_window == (0, int(recipe.self_replace_steps * 10))
        assert ctrl.self_replace_max_side == (finest if recipe.self_replace_finest else None)
        assert (ctrl.local_blend is not None) == (recipe.blend and kind != "background")
        if ctrl.local_blend is not None:
            assert ctrl.local_blend.resolution == (finest if recipe.blend_finest else None)
    custom = EditRecipe(1.0, 0.0, blend=False)
    ctrl = edit_controller(make_edit(small_scene, "shape", rng), tiny_pipe, 10, custom)
    assert ctrl.local_blend is None and bool(ctrl.cross_alphas[:, 0, 1].all())


def test_edit_rates_aggregate_scores():
    scores = [EditScore(True, 20.0, 30.0), EditScore(True, 20.0, 24.0), EditScore(False, 10.0, 26.0),
              EditScore(False, 10.0, 20.0)]  # fmt: skip
    r = edit_rates(scores)
    assert r == {"n": 4, "success": 0.5, "psnr_outside_mean": 25.0, "psnr_outside_ge_25": 0.5,
                 "success_and_ge_25": 0.25}  # fmt: skip

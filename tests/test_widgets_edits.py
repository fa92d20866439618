"""Edit cases with ground truth, and the ablation panel driven programmatically."""

import numpy as np
import pytest
import torch
from PIL import Image

from nti_utils.attention import cross_attention_resolutions, finest_map_resolution
from nti_utils.editing import edit
from nti_utils.inversion import null_text_inversion
from nti_utils.p2p import Replace, Reweight
from nti_utils.result import InversionSettings
from nti_utils.shapes.edits import (
    EDIT_KINDS,
    RECIPES,
    EditRecipe,
    EditScore,
    edit_case,
    edit_controller,
    edit_rates,
    make_edit,
    score_edit,
)
from nti_utils.shapes.world import scene_from_seed
from nti_utils.widgets import RECIPE_CONTROLS, AblationPanel


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


def test_panel_starts_at_the_recipe_and_resets_to_it_per_case(tiny_pipe):
    scene = scene_from_seed(1, n_objects=1, resolution=32)
    cases = [make_edit(scene, kind, np.random.default_rng(0)) for kind in EDIT_KINDS]
    panel = AblationPanel(tiny_pipe, cases, num_steps=3)
    c = panel.controls

    def shown():
        return {field: c[name].value for name, field in RECIPE_CONTROLS.items()}

    assert shown() == {f: getattr(RECIPES["shape"], f) for f in RECIPE_CONTROLS.values()}
    assert panel.recipe() == RECIPES["shape"] and c["reweight"].value == 1.0
    settings = InversionSettings(num_steps=3)
    assert panel.settings() == settings  # the inversion's defaults
    c["cross_replace"].value, c["blend"].value, c["reweight"].value = 1.0, False, 2.0
    assert panel.recipe() != RECIPES["shape"]
    for i in (1, 2, 0):  # each switch resets the edit controls to the new case's recipe
        c["case"].value = i
        assert panel.case.kind == EDIT_KINDS[i] and panel.recipe() == RECIPES[EDIT_KINDS[i]]
        assert c["reweight"].value == 1.0
        c["self_replace"].value, c["reweight"].value = 0.0, 3.0
    assert RECIPES["color"].blend_finest and not RECIPES["shape"].blend_finest


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
        k = int(recipe.cross_replace_steps * 10)
        assert ctrl.cross_alphas[:, 0, 1].tolist() == [1.0] * k + [0.0] * (10 - k)
        assert ctrl.self_window == (0, int(recipe.self_replace_steps * 10))
        assert ctrl.self_replace_max_side == (finest if recipe.self_replace_finest else None)
        assert (ctrl.local_blend is not None) == (recipe.blend and kind != "background")
        if ctrl.local_blend is not None:
            assert ctrl.local_blend.resolution == (finest if recipe.blend_finest else None)
    custom = EditRecipe(1.0, 0.0, blend=False)
    case = make_edit(small_scene, "shape", rng)
    ctrl = edit_controller(case, tiny_pipe, 10, custom)
    assert type(ctrl) is Replace
    assert ctrl.local_blend is None and bool(ctrl.cross_alphas[:, 0, 1].all())
    weighted = edit_controller(case, tiny_pipe, 10, target_weight=2.0)
    assert type(weighted) is Reweight and type(weighted.base) is Replace
    target = case.target.caption().split().index(case.target_word) + 1  # after <bos>
    n_tokens = tiny_pipe.tokenizer.model_max_length
    assert weighted.equalizer[0, target] == 2.0 and weighted.equalizer.sum() == n_tokens + 1.0


def test_edit_case_edits_with_the_recipe_and_scores_the_edit(tiny_pipe, small_scene):
    case = make_edit(small_scene, "color", np.random.default_rng(0))
    settings = InversionSettings(num_steps=3, inner_steps=1)
    inv = null_text_inversion(
        tiny_pipe, small_scene.render(), case.prompts[0], settings, progress=False
    )
    out, score = edit_case(tiny_pipe, inv, case)
    ctrl = edit_controller(case, tiny_pipe, 3)
    want = edit(tiny_pipe, inv, case.prompts, ctrl, progress=False)
    assert out.prompts == case.prompts and torch.equal(out.latents, want.latents)
    assert score == score_edit(case, want.images[1], small_scene.render())
    other, _ = edit_case(
        tiny_pipe, inv, case, EditRecipe(1.0, 1.0, blend=False), guidance_scale=1.0
    )
    assert not torch.equal(other.latents, out.latents)


def test_edit_rates_aggregate_scores():
    scores = [
        EditScore(True, 20.0, 30.0),
        EditScore(True, 20.0, 24.0),
        EditScore(False, 10.0, 26.0),
        EditScore(False, 10.0, 20.0),
    ]
    assert edit_rates(scores) == {
        "n": 4,
        "success": 0.5,
        "psnr_outside_mean": 25.0,
        "psnr_outside_ge_25": 0.5,
        "success_and_ge_25": 0.25,
    }

"""Edit cases with ground truth, and the ablation panel driven programmatically."""

import numpy as np
import pytest
from PIL import Image

from nti_utils.shapes.edits import EDIT_KINDS, make_edit, score_edit
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

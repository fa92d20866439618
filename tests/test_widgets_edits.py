"""Edit cases with ground truth, and the ablation panel driven programmatically."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nti_utils import widgets
from nti_utils.attention import cross_attention_resolutions, finest_map_resolution
from nti_utils.editing import edit
from nti_utils.inversion import null_text_inversion
from nti_utils.metrics import psnr
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
from nti_utils.testing import fixed_captioner
from nti_utils.widgets import (
    CONTROL_HELP,
    EDIT_CONTROLS,
    INVERSION_CONTROLS,
    RECIPE_CONTROLS,
    AblationPanel,
)

NOTEBOOK_6 = Path(__file__).resolve().parent.parent / "notebooks" / "06_ablations_widgets.ipynb"


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
    panel = AblationPanel(tiny_pipe, cases, num_steps=3, progress=False)
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
    assert panel.inversions == 2 and panel.last_inverted  # a new guidance: a new inversion
    panel.controls["cross_replace"].value = 0.2
    panel.run_button.click()
    assert panel.inversions == 2 and not panel.last_inverted  # edits reuse the inversion
    assert "psnr_reconstruction" in panel.metrics.value


def test_panel_starts_at_the_recipe_and_resets_to_it_per_case(tiny_pipe):
    scene = scene_from_seed(1, n_objects=1, resolution=32)
    cases = [make_edit(scene, kind, np.random.default_rng(0)) for kind in EDIT_KINDS]
    panel = AblationPanel(tiny_pipe, cases, num_steps=3, progress=False)
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


def _panel(tiny_pipe, kinds=("shape", "color"), progress=False, caption=None):
    scene = scene_from_seed(1, n_objects=1, resolution=32)
    cases = [make_edit(scene, kind, np.random.default_rng(0)) for kind in kinds]
    captioner = fixed_captioner(tiny_pipe.tokenizer, caption or scene.caption(), 32)
    return AblationPanel(tiny_pipe, cases, num_steps=3, progress=progress, captioner=captioner)


def test_panel_baseline_is_notebook_5s_edit(tiny_pipe):
    # the panel's defaults are what notebook 5 runs: the library's inversion defaults and the
    # kind's recipe, through the benchmark's edit_case
    panel = _panel(tiny_pipe)
    metrics = panel.run()
    case = panel.case
    inv = null_text_inversion(
        tiny_pipe,
        case.source.render(),
        case.prompts[0],
        InversionSettings(num_steps=3),
        progress=False,
    )
    out, score = edit_case(tiny_pipe, inv, case, RECIPES[case.kind])
    assert metrics["psnr_reconstruction"] == psnr(case.source.render(), out.images[0])
    assert metrics["psnr_vs_ground_truth"] == score.psnr_target
    assert metrics["edit_success"] == float(score.success)
    assert panel.last_images["edited"].tobytes() == out.images[1].tobytes()


def test_panel_reinverts_only_for_inversion_controls(tiny_pipe, monkeypatch):
    calls = []
    real = widgets.null_text_inversion

    def counting(*args, **kw):
        calls.append(args[3])
        return real(*args, **kw)

    monkeypatch.setattr(widgets, "null_text_inversion", counting)
    panel = _panel(tiny_pipe)
    c = panel.controls
    c["inner_steps"].value = 1
    panel.run_button.click()
    assert len(calls) == 1 and panel.last_inverted and "new inversion" in panel.status.value
    edits = {
        "cross_replace": 0.2,
        "self_replace": 0.1,
        "self_replace_finest": False,
        "blend": False,
        "blend_threshold": 0.5,
        "blend_finest": True,
        "target_null": "plain",
        "reweight": 2.0,
    }
    assert set(edits) == set(EDIT_CONTROLS)
    for k, (name, value) in enumerate(edits.items(), start=2):  # each reruns only the edit
        c[name].value = value
        panel.run_button.click()
        assert len(calls) == 1 and not panel.last_inverted and panel.runs == k, name
        assert f"done (run {k}" in panel.status.value and "edit only" in panel.status.value
    changes = {"guidance": 3.0, "inner_steps": 2, "epsilon": 1e-3, "case": 1, "source": "captioner"}
    assert set(changes) == set(INVERSION_CONTROLS)
    for k, (name, value) in enumerate(changes.items(), start=2):
        c[name].value = value
        panel.run_button.click()
        assert len(calls) == k and panel.last_inverted, name
    c["case"].value, c["source"].value = 0, "scene"  # back to an inversion made before: cached
    c["guidance"].value, c["inner_steps"].value, c["epsilon"].value = 7.5, 1, 1e-5
    panel.run_button.click()
    assert len(calls) == 6 and not panel.last_inverted and panel.inversions == 6
    assert calls[0] == InversionSettings(num_steps=3, inner_steps=1)


def test_panel_can_caption_the_source_and_edits_from_the_caption(tiny_pipe):
    scene = scene_from_seed(1, n_objects=1, resolution=32)
    other_bg = next(b for b in ("white", "gray", "black") if b != scene.background)
    caption = scene.caption().replace(scene.background, other_bg)  # a caption with a wrong word
    panel = _panel(tiny_pipe, caption=caption)
    panel.controls["source"].value = "captioner"
    panel.run()
    [inv] = panel._inversions.values()
    assert inv.prompt == caption and inv.prompt_source == "captioner:fixed"
    assert "captioner:fixed" in panel.metrics.value and panel.last_metrics["edit_success"] in (0, 1)
    missing = _panel(tiny_pipe, caption="a thing on a white background")  # no shape word to swap
    missing.controls["source"].value = "captioner"
    with pytest.raises(ValueError, match="is not a word of the prompt"):
        missing.run()
    assert "is not a word of the prompt" in missing.status.value


def test_panel_run_that_raises_shows_the_error_and_reenables(tiny_pipe, monkeypatch):
    panel = _panel(tiny_pipe)
    panel.run_button.click()
    shown = [im.value for im in panel.images]

    def broken(*args, **kw):
        raise ValueError("the edit broke")

    monkeypatch.setattr(widgets, "edit_case", broken)
    panel.controls["cross_replace"].value = 0.5
    panel.run_button.click()  # a click handler must not raise (JupyterLab would hide it)
    assert "error: ValueError: the edit broke" in panel.status.value
    (err,) = panel.output.outputs
    assert (
        err["name"] == "stderr" and "Traceback" in err["text"] and "the edit broke" in err["text"]
    )
    assert not panel.run_button.disabled and not panel.busy and panel.runs == 1
    assert panel.run_button.description == "Run"
    assert [im.value for im in panel.images] == shown  # the last good run stays on show
    with pytest.raises(ValueError, match="the edit broke"):
        panel.run()  # called from code, the error also propagates
    monkeypatch.undo()
    panel.run_button.click()
    assert panel.runs == 2 and panel.status.value.count("done (run 2") == 1
    assert panel.output.outputs == ()  # each run starts with a clean output area


def test_panel_is_busy_during_a_run_and_ignores_clicks(tiny_pipe, monkeypatch):
    seen = []
    real = widgets.null_text_inversion
    panel = _panel(tiny_pipe)

    def clicking(*args, **kw):
        b = panel.run_button
        seen.append((b.disabled, b.description, panel.busy, panel.status.value))
        b.click()  # ignored: it neither runs nor queues a run
        with pytest.raises(RuntimeError, match="already running"):
            panel.run()
        return real(*args, **kw)

    monkeypatch.setattr(widgets, "null_text_inversion", clicking)
    panel.run_button.click()
    ((disabled, description, busy, status),) = seen
    assert disabled and busy and description == "Running..." and "inverting case 0" in status
    assert panel.runs == 1 and not panel.busy and not panel.run_button.disabled


def test_panel_shows_progress_for_clicks_only(tiny_pipe, monkeypatch):
    seen = []

    def record(*args, progress, **kw):
        seen.append(progress)
        raise RuntimeError("stop here")

    monkeypatch.setattr(widgets, "null_text_inversion", record)
    panel = _panel(tiny_pipe, progress=True)
    panel.run_button.click()  # tqdm bars in the panel's output area
    with pytest.raises(RuntimeError, match="stop here"):
        panel.run()  # from code (sweeps): no bars unless asked
    with pytest.raises(RuntimeError, match="stop here"):
        panel.run(progress=True)
    assert seen == [True, False, True]


def test_panel_explains_its_controls_and_shows_as_a_picture_when_saved(tiny_pipe):
    panel = _panel(tiny_pipe)
    assert set(panel.controls) == set(CONTROL_HELP) == set(INVERSION_CONTROLS + EDIT_CONTROLS)
    for name in INVERSION_CONTROLS:
        assert panel.controls[name].description.endswith("*")
        assert panel.controls[name].tooltip.endswith("(new inversion)")
    for name in EDIT_CONTROLS:
        assert panel.controls[name].tooltip.endswith("(edit only)")
    bundle = panel._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    assert bundle["text/plain"].startswith("AblationPanel: 2 edit cases")
    # notebook 6 describes every control and shows a picture of the panel (widget state is
    # stripped from committed notebooks)
    nb = json.loads(NOTEBOOK_6.read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    for name in panel.controls:
        assert f"`{name}`" in text, name
    pictures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert pictures and all((NOTEBOOK_6.parent / p).is_file() for p in pictures)
    code = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not any("VBox(children=" in str(o.get("data", {})) for o in code)


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
    plain = dataclasses.replace(RECIPES["color"], target_null="plain")
    out_plain, _ = edit_case(tiny_pipe, inv, case, plain)
    want = edit(tiny_pipe, inv, case.prompts, ctrl, progress=False, target_null="plain")
    assert torch.equal(out_plain.latents, want.latents)
    assert not torch.equal(out_plain.latents, out.latents)
    with pytest.raises(ValueError, match="target_null must be one of"):
        EditRecipe(0.4, 0.4, blend=False, target_null="empty")


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

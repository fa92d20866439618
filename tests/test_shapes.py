"""The shapes world: renderer, captions, edits, scorer, tokenizer, and the trainer end to end."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from nti_utils.shapes import train
from nti_utils.shapes.score import analyze, score_caption
from nti_utils.shapes.tokenizer import build_tokenizer, world_words
from nti_utils.shapes.world import (
    Scene,
    Shape,
    edit_region,
    make_caption,
    parse_caption,
    scene_from_seed,
)


def test_renderer_is_deterministic():
    a, b = scene_from_seed(7), scene_from_seed(7)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert scene_from_seed(7) != scene_from_seed(8)


def test_captions_parse_back_to_scenes():
    for seed in range(50):
        scene = scene_from_seed(seed)
        assert parse_caption(scene.caption()) == scene.describe()
    assert make_caption((("red", "circle"), ("blue", "square")), "white") == (
        "a red circle and a blue square on a white background"
    )


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle",
        "a pink circle on a white background",
        "a red star on a white background",
        "a red circle on a pink background",
    ],
)
def test_bad_captions_are_refused(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_edits_change_only_what_they_say():
    scene = Scene((Shape("circle", "red", 20, 20, 10), Shape("square", "blue", 45, 45, 9)), "white")
    before, masks = np.asarray(scene.render()), scene.masks()
    swapped = scene.with_object(0, kind="triangle")
    after = np.asarray(swapped.render())
    changed = (before != after).any(-1)
    assert changed.any() and not changed[masks[1]].any()  # the square is untouched
    touched = masks[0] | swapped.masks(min_coverage=0.01)[0] | scene.masks(min_coverage=0.01)[0]
    assert not changed[~touched].any()
    region = edit_region(scene, swapped)
    assert changed[~region].sum() == 0 and not region[masks[1]].any()
    # the redrawn object's whole area may change, also where circle and triangle overlap
    kept = masks[0] & swapped.masks()[0] & ~changed  # inside both shapes: same color
    assert kept.sum() > 100 and region[kept].all()
    assert region.sum() < touched.sum() + 4 * 64
    assert swapped.caption() == "a red triangle and a blue square on a white background"
    assert scene.with_background("black").caption().endswith("on a black background")
    assert scene.remove_object(0).caption() == "a blue square on a white background"
    assert scene.remove_object(1).add_object(scene.objects[1]) == scene


def test_masks_cover_objects():
    scene = scene_from_seed(3, n_objects=2)
    masks = scene.masks()
    assert masks.shape == (2, 64, 64) and not (masks[0] & masks[1]).any()
    assert all(m.sum() > 50 for m in masks)


def test_scorer_reads_renders_correctly():
    for seed in range(200):
        scene = scene_from_seed(seed)
        assert score_caption(scene.render(), scene.caption()).all, scene.caption()
    found = analyze(Scene((Shape("triangle", "green", 32, 32, 14),), "gray").render())
    assert found.background == "gray" and [(d.color, d.kind) for d in found.objects] == [
        ("green", "triangle")
    ]


def test_rotation_invariant_scorer_reads_turned_shapes_and_agrees_on_renders():
    from nti_utils.shapes.redraw import Style, redraw

    turned = 0
    for seed in range(60):
        scene = scene_from_seed(10_007_000 + seed, n_objects=1)
        style = Style(edge=1.0, rotation=12.0 if seed % 2 else -12.0)
        image = redraw(scene, style)
        # upright-only reading (bounding-box fill) misses some turned squares; the spread does not
        turned += not score_caption(image, scene.caption()).all
        assert score_caption(image, scene.caption(), rotation_invariant=True).all, scene.caption()
        render = scene.render()
        assert score_caption(render, scene.caption(), rotation_invariant=True).all
    assert turned > 0


def test_scorer_notices_wrong_attributes():
    img = Scene((Shape("square", "blue", 30, 30, 12),), "black").render()
    got = score_caption(img, "a red circle on a white background")
    assert not got.background and got.colors == (False,) and got.shapes == (False,)


def test_tokenizer_gives_world_words_one_token():
    tok = build_tokenizer(20)
    assert all(len(tok.tokenize(w)) == 1 for w in world_words())
    assert len(tok.tokenize("reddish")) > 1  # unknown words fall apart, they do not vanish
    assert tok.model_max_length == 20


def test_training_runs_end_to_end_and_resumes(tmp_path):
    args = [
        "--workdir",
        str(tmp_path / "w"),
        "--tiny",
        "--n-train",
        "32",
        "--n-held-out",
        "8",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--eval-steps",
        "2",
        "--sample-every",
        "2",
        "--ckpt-every",
        "1",
    ]
    train.main([*args, "--out", str(tmp_path / "out")])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    log = [json.loads(line) for line in open(tmp_path / "w" / "log.jsonl")]
    (cache,) = [row for row in log if row["phase"] == "cache"]
    # the scaling factor is measured from the latents: 1 / their std
    assert cache["scaling_factor"] == pytest.approx(1 / cache["latent_std"])
    assert pipe.vae.config.scaling_factor == pytest.approx(cache["scaling_factor"])
    assert (tmp_path / "w" / "samples" / "step_000002.png").exists()
    train.main([*args[:-4], "--unet-steps", "3", "--sample-every", "100", "--ckpt-every", "1"])
    log = [json.loads(line) for line in open(tmp_path / "w" / "log.jsonl")]
    assert torch.load(tmp_path / "w" / "state.pt", weights_only=False)["step"] == 3
    # the rerun resumed: no second VAE phase, one more UNet step evaluated at both guidance scales
    assert sum("held_out_psnr" in row for row in log) == 1
    evals = [(row["step"], row["guidance"]) for row in log if "eval" in row]
    assert evals == [(2, 1.0), (2, 7.5), (3, 1.0), (3, 7.5)]
    # continue from the exported folder in a fresh workdir, with cross-attention supervision
    w2 = [*args[:1], str(tmp_path / "w2"), *args[2:]]
    train.main([*w2, "--init-from", str(tmp_path / "out"), "--attn-weight", "0.5"])
    state = torch.load(tmp_path / "w2" / "state.pt", weights_only=False)
    assert state["phase"] == "done" and state["step"] == 2
    assert (tmp_path / "w2" / "attn_targets.npz").exists()
    rows = [json.loads(line) for line in open(tmp_path / "w2" / "log.jsonl")]
    assert not any(row["phase"] == "vae" for row in rows)
    for k, v in pipe.vae.state_dict().items():  # the VAE is kept as it was, its scale too
        assert torch.equal(state["vae"][k], v)
    assert state["scaling_factor"] == pipe.vae.config.scaling_factor


def test_corrupted_captions_keep_the_grammar_and_change_words_at_the_asked_rate():
    from nti_utils.shapes.data import corrupt_caption
    from nti_utils.shapes.world import BACKGROUNDS, OBJECT_COLORS, SHAPES, parse_caption

    caption = "a red circle and a blue square on a white background"
    rng = np.random.default_rng(0)
    assert corrupt_caption(caption, 0.0, rng) == caption
    changed = 0
    for _ in range(400):
        noisy = corrupt_caption(caption, 0.2, rng)
        (obj1, obj2), bg = parse_caption(noisy)  # still a caption of the world's grammar
        assert {obj1[0], obj2[0]} <= set(OBJECT_COLORS) and bg in BACKGROUNDS
        assert {obj1[1], obj2[1]} <= set(SHAPES)
        changed += sum(a != b for a, b in zip(caption.split(), noisy.split()))
    assert changed / (400 * 5) == pytest.approx(0.2, abs=0.03)  # 5 attribute words each


def test_shape_words_can_have_their_own_noise_rate():
    from nti_utils.shapes.data import corrupt_caption

    caption = "a red circle and a blue square on a white background"
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(400):
        noisy = corrupt_caption(caption, 0.3, rng, p_shape=0.0).split()
        assert (noisy[2], noisy[6]) == ("circle", "square")  # shapes always right
        changed += sum(a != b for a, b in zip(caption.split(), noisy))
    assert changed / (400 * 3) == pytest.approx(0.3, abs=0.04)  # the 3 color/background words


def test_background_words_can_have_their_own_noise_rate_too():
    from nti_utils.shapes.data import corrupt_caption

    caption = "a red circle and a blue square on a white background"
    rng = np.random.default_rng(2)
    changed = 0
    for _ in range(400):
        noisy = corrupt_caption(caption, 0.3, rng, p_shape=0.0, p_background=0.0).split()
        assert (noisy[2], noisy[6], noisy[9]) == ("circle", "square", "white")
        changed += sum(a != b for a, b in zip(caption.split(), noisy))
    assert changed / (400 * 2) == pytest.approx(0.3, abs=0.05)  # the 2 color words


def test_redrawn_edits_score_each_kind_against_the_redrawn_ground_truth(tiny_pipe):
    from nti_utils.shapes.evaluate import redrawn_edits

    r = redrawn_edits(tiny_pipe, n=3, steps=2, progress=False)
    assert r["n"] == 3 and set(r["by_kind"]) == {"shape", "color", "background"}
    assert all(v["n"] == 1 for v in r["by_kind"].values())
    # a random-weight model edits nothing right, but every number is measured
    assert 0.0 <= r["success"] <= 1.0 and np.isfinite(r["psnr_outside_mean"])
    assert np.isfinite(r["reconstruction_psnr"])
    plain = redrawn_edits(tiny_pipe, n=3, steps=2, progress=False, target_null="plain")
    assert plain["reconstruction_psnr"] == r["reconstruction_psnr"]  # the same inversions
    assert plain["psnr_outside_mean"] != r["psnr_outside_mean"]  # edited otherwise


def test_score_edit_compares_with_the_given_ground_truth():
    from nti_utils.shapes.edits import make_edit, score_edit
    from nti_utils.shapes.redraw import Style, redraw

    scene = scene_from_seed(10_008_000, n_objects=1)
    case = make_edit(scene, "color", np.random.default_rng(0))
    style = Style.from_seed(1)
    truth = redraw(case.target, style)
    assert score_edit(case, truth, redraw(scene, style), truth).psnr_target == float("inf")
    assert score_edit(case, truth, redraw(scene, style)).psnr_target < 60

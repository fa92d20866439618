"""The null-text core's options: the two update rules, batching, chunking, the shorter schedule,
the faithful reference loop it reproduces, and its settings' checks."""

import dataclasses

import pytest
import torch

from nti_utils.bench.reference import reference_null_text_inversion
from nti_utils.images import image_to_latents
from nti_utils.inversion import (
    batched_null_text_inversion,
    ddim_inversion,
    null_text_inversion,
    reconstruct,
)
from nti_utils.result import InversionSettings
from nti_utils.shapes.world import Scene, Shape

PROMPT = "a red circle on a white background"
OTHER = "a blue square on a gray background"
SETTINGS = InversionSettings(num_steps=6, inner_steps=4)
REFERENCE_RULE = dataclasses.replace(SETTINGS, update_rule="reference")


@pytest.fixture(scope="module")
def z0(tiny_pipe, small_scene):
    return image_to_latents(tiny_pipe, small_scene.render())


@pytest.fixture(scope="module")
def other_image():
    return Scene((Shape("square", "blue", 18, 16, 7),), "gray", resolution=32).render()


def _err(pipe, result, z0):
    return (reconstruct(pipe, result, progress=False) - z0).pow(2).mean().item()


def test_reference_rule_reproduces_the_reference_loop(tiny_pipe, small_scene, z0):
    ref = reference_null_text_inversion(tiny_pipe, small_scene.render(), PROMPT, SETTINGS)
    ours = null_text_inversion(
        tiny_pipe, small_scene.render(), PROMPT, REFERENCE_RULE, progress=False
    )
    assert ours.method == "null-text" and ours.inner_steps == ref.inner_steps
    torch.testing.assert_close(ours.null_embeddings, ref.null_embeddings, atol=1e-4, rtol=1e-3)
    assert _err(tiny_pipe, ours, z0) == pytest.approx(_err(tiny_pipe, ref, z0), rel=1e-3)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())  # the reference cleans up
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_both_rules_reconstruct_and_beat_ddim(tiny_pipe, z0):
    ref_rule = null_text_inversion(tiny_pipe, z0, PROMPT, REFERENCE_RULE, progress=False)
    check_first = null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    err_ref, err_check = _err(tiny_pipe, ref_rule, z0), _err(tiny_pipe, check_first, z0)
    assert err_ref <= 1.1 * err_check, (err_ref, err_check)
    assert max(err_ref, err_check) < 0.8 * _err(tiny_pipe, ddim, z0)


@pytest.mark.parametrize("settings", [SETTINGS, REFERENCE_RULE], ids=["check-first", "reference"])
def test_a_batch_gives_what_single_runs_give(tiny_pipe, small_scene, other_image, settings):
    images, prompts = [small_scene.render(), other_image], [PROMPT, OTHER]
    both = batched_null_text_inversion(tiny_pipe, images, prompts, settings, progress=False)
    assert [r.prompt for r in both] == prompts
    for image, prompt, res in zip(images, prompts, both):
        one = null_text_inversion(tiny_pipe, image, prompt, settings, progress=False)
        assert res.inner_steps == one.inner_steps
        torch.testing.assert_close(res.null_embeddings, one.null_embeddings, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(res.latent_T, one.latent_T, atol=2e-4, rtol=1e-3)
        assert res.null_embeddings.shape == (SETTINGS.num_steps, 1, 16, 32)
        assert res.timings["batch_size"] == 2 and one.timings["batch_size"] == 1


def test_unet_rows_are_counted(tiny_pipe, z0):
    n = SETTINGS.num_steps
    loose = dataclasses.replace(REFERENCE_RULE, epsilon=1.0)  # every loss is below the threshold
    ref_rule = null_text_inversion(tiny_pipe, z0, PROMPT, loose, progress=False)
    # ε(C), one evaluation with its update, the final advance (the pivots are not counted)
    assert ref_rule.inner_steps == [1] * n
    assert ref_rule.unet_calls == {"forward": 3 * n, "backward": n}
    check_first = null_text_inversion(
        tiny_pipe, z0, PROMPT, dataclasses.replace(loose, update_rule="check-first"), progress=False
    )
    assert check_first.inner_steps == [0] * n  # the evaluation that passes also advances z̄
    assert check_first.unet_calls == {"forward": 2 * n, "backward": 0}


def test_max_rows_chunks_without_changing_the_result(tiny_pipe, small_scene, other_image):
    images, prompts = [small_scene.render(), other_image], [PROMPT, OTHER]
    for rule in (SETTINGS, REFERENCE_RULE):
        plain = batched_null_text_inversion(tiny_pipe, images, prompts, rule, progress=False)
        chunked_settings = dataclasses.replace(rule, max_rows=1)
        chunked = batched_null_text_inversion(
            tiny_pipe, images, prompts, chunked_settings, progress=False
        )
        for a, b in zip(plain, chunked):
            torch.testing.assert_close(a.null_embeddings, b.null_embeddings, atol=1e-4, rtol=1e-3)
            assert a.inner_steps == b.inner_steps and a.unet_calls == b.unet_calls


def test_a_shorter_schedule_is_the_same_algorithm_with_other_settings(tiny_pipe, z0):
    short = dataclasses.replace(REFERENCE_RULE, step_scale=3.0)  # 4 inner steps -> 2
    assert short.effective_lr == pytest.approx(3 * SETTINGS.lr) and short.max_updates == 2
    assert dataclasses.replace(SETTINGS, step_scale=2.5).max_updates == 2  # ceil(4 / 2.5)
    res = null_text_inversion(tiny_pipe, z0, PROMPT, short, progress=False)
    same = dataclasses.replace(REFERENCE_RULE, lr=3 * SETTINGS.lr, inner_steps=2)
    plain = null_text_inversion(tiny_pipe, z0, PROMPT, same, progress=False)
    assert res.settings == short  # the result records the settings it was given
    assert res.inner_steps == plain.inner_steps and max(res.inner_steps) <= 2
    torch.testing.assert_close(res.null_embeddings, plain.null_embeddings, atol=1e-4, rtol=1e-3)
    paper = null_text_inversion(tiny_pipe, z0, PROMPT, REFERENCE_RULE, progress=False)
    assert not torch.equal(res.null_embeddings, paper.null_embeddings)


def test_weights_stay_untouched(tiny_pipe, z0):
    null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_steps", 0),
        ("num_steps", 2.5),
        ("num_steps", True),
        ("guidance_scale", float("nan")),
        ("guidance_scale", float("inf")),
        ("inner_steps", -1),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("epsilon", -1e-5),
        ("epsilon_growth", float("inf")),
        ("per_timestep", "yes"),
        ("optimize", "both"),
        ("update_rule", "sometimes"),
        ("step_scale", 0.5),
        ("step_scale", float("inf")),
        ("max_rows", 0),
        ("autocast", "float64"),
    ],
)
def test_settings_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=f"InversionSettings.{field} must be"):
        InversionSettings(**{field: value})


def test_bad_arguments_are_refused(tiny_pipe, z0):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        batched_null_text_inversion(tiny_pipe, torch.cat([z0, z0]), [PROMPT], SETTINGS)
    with pytest.raises(ValueError, match="one image at a time"):
        null_text_inversion(tiny_pipe, torch.cat([z0, z0]), PROMPT, SETTINGS)
    with pytest.raises(ValueError, match="start_latents must be"):
        null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, start_latent=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="needs CUDA"):
        cuda = dataclasses.replace(SETTINGS, autocast="bfloat16")
        null_text_inversion(tiny_pipe, z0, PROMPT, cuda)
    with pytest.raises(ValueError, match="unknown inversion settings"):
        InversionSettings.from_dict({"num_steps": 5, "guidance": 7.5})

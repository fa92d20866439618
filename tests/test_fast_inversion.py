"""The fast (image-batched) null-text inversion against the sequential algorithm it reproduces."""

import dataclasses

import pytest
import torch

from nti_utils.bench import reference_null_text_inversion
from nti_utils.fast_inversion import (
    FastSettings,
    batched_null_text_inversion,
    fast_null_text_inversion,
)
from nti_utils.images import image_to_latents
from nti_utils.inversion import (
    InversionSettings,
    ddim_inversion,
    null_text_inversion,
    reconstruct,
)
from nti_utils.shapes.world import Scene, Shape

PROMPT = "a red circle on a white background"
OTHER = "a blue square on a gray background"
SETTINGS = InversionSettings(num_steps=6, inner_steps=4)
CHECK_FIRST = FastSettings(update_rule="check-first")


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
    fast = fast_null_text_inversion(tiny_pipe, small_scene.render(), PROMPT, SETTINGS,
                                    progress=False)  # fmt: skip
    assert fast.method == "null-text-fast" and fast.inner_steps == ref.inner_steps
    torch.testing.assert_close(fast.null_embeddings, ref.null_embeddings, atol=1e-4, rtol=1e-3)
    assert _err(tiny_pipe, fast, z0) == pytest.approx(_err(tiny_pipe, ref, z0), rel=1e-3)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())  # the reference cleans up
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_check_first_rule_reproduces_the_library(tiny_pipe, z0):
    lib = null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    fast = fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, CHECK_FIRST, progress=False)
    assert fast.inner_steps == lib.inner_steps
    torch.testing.assert_close(fast.null_embeddings, lib.null_embeddings, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(fast.step_errors), torch.tensor(lib.step_errors),
                               rtol=1e-3, atol=1e-7)  # fmt: skip


def test_fast_reconstructs_as_well_as_sequential_and_beats_ddim(tiny_pipe, z0):
    fast = fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    lib = null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    err_fast, err_lib = _err(tiny_pipe, fast, z0), _err(tiny_pipe, lib, z0)
    assert err_fast <= 1.1 * err_lib, (err_fast, err_lib)
    assert err_fast < 0.8 * _err(tiny_pipe, ddim, z0)


def test_a_batch_gives_what_single_runs_give(tiny_pipe, small_scene, other_image):
    images, prompts = [small_scene.render(), other_image], [PROMPT, OTHER]
    both = batched_null_text_inversion(tiny_pipe, images, prompts, SETTINGS, progress=False)
    assert [r.prompt for r in both] == prompts
    for image, prompt, res in zip(images, prompts, both):
        one = fast_null_text_inversion(tiny_pipe, image, prompt, SETTINGS, progress=False)
        assert res.inner_steps == one.inner_steps
        torch.testing.assert_close(res.null_embeddings, one.null_embeddings, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(res.latent_T, one.latent_T, atol=2e-4, rtol=1e-3)
        assert res.null_embeddings.shape == (SETTINGS.num_steps, 1, 16, 32)
        assert res.timings["batch_size"] == 2


def test_unet_rows_are_counted(tiny_pipe, z0):
    n = SETTINGS.num_steps
    loose = dataclasses.replace(SETTINGS, epsilon=1.0)  # every loss is below the threshold
    ref_rule = fast_null_text_inversion(tiny_pipe, z0, PROMPT, loose, progress=False)
    # ε(C), one evaluation with its update, the final advance (pivots not counted, as in the library)
    assert ref_rule.inner_steps == [1] * n
    assert ref_rule.unet_calls == {"forward": 3 * n, "backward": n}
    check_first = fast_null_text_inversion(tiny_pipe, z0, PROMPT, loose, CHECK_FIRST,
                                           progress=False)  # fmt: skip
    assert check_first.inner_steps == [0] * n  # the evaluation that passes also advances z̄
    assert check_first.unet_calls == {"forward": 2 * n, "backward": 0}


def test_max_rows_and_warm_up_options(tiny_pipe, small_scene, other_image, z0):
    images, prompts = [small_scene.render(), other_image], [PROMPT, OTHER]
    plain = batched_null_text_inversion(tiny_pipe, images, prompts, SETTINGS, progress=False)
    chunked = batched_null_text_inversion(tiny_pipe, images, prompts, SETTINGS,
                                          FastSettings(max_rows=1), progress=False)  # fmt: skip
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(a.null_embeddings, b.null_embeddings, atol=1e-4, rtol=1e-3)
        assert a.unet_calls == b.unet_calls
    warm = fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS,
                                    FastSettings(warmup_steps=2), progress=False)  # fmt: skip
    assert warm.timings["warmup"] > 0 and warm.unet_calls["warmup_backward"] > 0
    assert not torch.equal(warm.null_embeddings, plain[0].null_embeddings)
    assert torch.isfinite(reconstruct(tiny_pipe, warm, progress=False)).all()


def test_a_shorter_schedule_is_the_same_algorithm_with_other_settings(tiny_pipe, z0):
    short = FastSettings(step_scale=3.0)  # 4 inner steps -> 2
    res = fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, short, progress=False)
    same = dataclasses.replace(SETTINGS, lr=3 * SETTINGS.lr, inner_steps=2)
    plain = fast_null_text_inversion(tiny_pipe, z0, PROMPT, same, progress=False)
    assert res.settings == same  # the result records what ran
    assert res.inner_steps == plain.inner_steps and max(res.inner_steps) <= 2
    torch.testing.assert_close(res.null_embeddings, plain.null_embeddings, atol=1e-4, rtol=1e-3)
    assert FastSettings().schedule(SETTINGS) is SETTINGS
    assert FastSettings(step_scale=2.5).schedule(SETTINGS).inner_steps == 2  # ceil(4 / 2.5)
    paper = fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    assert paper.settings == SETTINGS and not torch.equal(res.null_embeddings,
                                                          paper.null_embeddings)  # fmt: skip


def test_weights_stay_untouched(tiny_pipe, z0):
    fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_bad_arguments_are_refused(tiny_pipe, z0):
    with pytest.raises(ValueError, match="update_rule"):
        FastSettings(update_rule="sometimes")
    with pytest.raises(ValueError, match="max_rows"):
        FastSettings(max_rows=0)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="step_scale"):
            FastSettings(step_scale=bad)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        batched_null_text_inversion(tiny_pipe, torch.cat([z0, z0]), [PROMPT], SETTINGS)
    with pytest.raises(ValueError, match="per-timestep null"):
        fast_null_text_inversion(tiny_pipe, z0, PROMPT, dataclasses.replace(SETTINGS,
                                 per_timestep=False))  # fmt: skip
    with pytest.raises(ValueError, match="needs CUDA"):
        fast_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, FastSettings(autocast="bfloat16"))

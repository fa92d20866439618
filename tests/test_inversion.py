"""Null-text inversion, its baselines, and the saved format."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from nti_utils.images import image_to_latents
from nti_utils.inversion import (
    ddim_inversion,
    negative_prompt_inversion,
    null_text_inversion,
    reconstruct,
)
from nti_utils.result import InversionSettings
from nti_utils.storage import load_inversion, save_inversion
from nti_utils.testing import assert_same_run, tiny_pipeline

PROMPT = "a red circle on a white background"
SETTINGS = InversionSettings(num_steps=10)


@pytest.fixture(scope="module")
def nti(tiny_pipe, small_scene):
    return null_text_inversion(tiny_pipe, small_scene.render(), PROMPT, SETTINGS, progress=False)


def _err(pipe, result, z0, **kw):
    return (reconstruct(pipe, result, progress=False, **kw) - z0).pow(2).mean().item()


def test_null_text_beats_ddim_inversion_at_guidance(tiny_pipe, small_scene, nti):
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    ddim = ddim_inversion(tiny_pipe, small_scene.render(), PROMPT, SETTINGS, progress=False)
    err_ddim, err_nti = _err(tiny_pipe, ddim, z0), _err(tiny_pipe, nti, z0)
    assert err_nti < 0.5 * err_ddim, (err_nti, err_ddim)


def test_null_text_result_contents(nti):
    n = SETTINGS.num_steps
    assert nti.method == "null-text" and nti.prompt == PROMPT
    assert nti.null_embeddings.shape == (n, 1, 16, 32)
    assert len(nti.losses) == n and len(nti.inner_steps) == n
    assert all(0 <= k <= SETTINGS.inner_steps for k in nti.inner_steps)
    assert [len(row) - 1 for row in nti.losses] == nti.inner_steps
    assert len(nti.step_errors) == n
    # one ε(C) per step, one ε(∅) per evaluation, one backward per update
    forward = n + sum(len(r) for r in nti.losses)
    assert nti.unet_calls == {"forward": forward, "backward": sum(nti.inner_steps)}
    assert {"encode", "ddim_inversion", "optimization"} <= set(nti.timings)
    assert len(nti.pivots) == n + 1
    # each timestep's embedding starts from the previous one, so they differ but stay related
    assert not torch.equal(nti.null_embeddings[0], nti.null_embeddings[-1])


def test_early_stopping_cuts_inner_steps(tiny_pipe, small_scene):
    loose = dataclasses.replace(SETTINGS, epsilon=1.0)  # every first loss is below 1
    res = null_text_inversion(tiny_pipe, small_scene.render(), PROMPT, loose, progress=False)
    assert res.inner_steps == [0] * SETTINGS.num_steps  # no update needed: ∅ stays encoder("")
    assert torch.equal(res.null_embeddings[0], res.null_embeddings[-1])


@pytest.mark.parametrize("rule", ["check-first", "reference"])
def test_at_guidance_one_no_update_is_made_because_none_could_help(tiny_pipe, small_scene, rule):
    from nti_utils.ddim import DDIMSchedule, ddim_step, guide, predict_noise
    from nti_utils.models import embed_prompts

    z0 = image_to_latents(tiny_pipe, small_scene.render())
    w1 = dataclasses.replace(
        SETTINGS, guidance_scale=1.0, epsilon=0.0, epsilon_growth=0.0, update_rule=rule
    )
    res = null_text_inversion(tiny_pipe, z0, PROMPT, w1, progress=False)
    # why: at w = 1 the loss does not depend on ∅ (its gradient is exactly zero)
    schedule = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, SETTINGS.num_steps)
    cond, null = embed_prompts(tiny_pipe, [PROMPT, ""]).chunk(2)
    null = null.clone().requires_grad_(True)
    t, alphas = schedule.timesteps[0], schedule.alphas(0)
    z = res.pivots[-1]
    eps = guide(
        predict_noise(tiny_pipe.unet, z, t, null, schedule),
        predict_noise(tiny_pipe.unet, z, t, cond, schedule),
        1.0,
    )
    loss = (ddim_step(z, eps, *alphas) - res.pivots[-2]).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, null)  # to ∅ only: the UNet's weights get no .grad
    assert grad.abs().max() == 0
    # so the zero threshold never stops it, yet nothing is updated and ∅ stays encoder("")
    assert res.inner_steps == [0] * SETTINGS.num_steps and res.unet_calls["backward"] == 0
    assert all(torch.equal(e, res.null_embeddings[0]) for e in res.null_embeddings)
    # and the result is DDIM inversion's at w = 1
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, w1, progress=False)
    assert_same_run(
        reconstruct(tiny_pipe, res, progress=False), reconstruct(tiny_pipe, ddim, progress=False)
    )
    # optimizing C instead still updates at w = 1 (its branch has weight w)
    cond_run = null_text_inversion(
        tiny_pipe, z0, PROMPT, dataclasses.replace(w1, optimize="cond"), progress=False
    )
    assert sum(cond_run.inner_steps) > 0


def test_weights_stay_untouched_and_trainable(tiny_pipe, nti):
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_global_null_and_random_pivot_ablations_are_worse(tiny_pipe, small_scene, nti):
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    glob = dataclasses.replace(SETTINGS, per_timestep=False)
    res_g = null_text_inversion(tiny_pipe, z0, PROMPT, glob, progress=False)
    assert all(torch.equal(e, res_g.null_embeddings[0]) for e in res_g.null_embeddings)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    res_r = null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, start_latent=noise, progress=False)
    assert torch.equal(res_r.latent_T, noise)
    err = _err(tiny_pipe, nti, z0)
    assert err < _err(tiny_pipe, res_g, z0) and err < _err(tiny_pipe, res_r, z0)


def test_negative_prompt_inversion_retraces_guidance_one(tiny_pipe, small_scene):
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    npi = negative_prompt_inversion(
        tiny_pipe, small_scene.render(), PROMPT, SETTINGS, progress=False
    )
    ddim = ddim_inversion(tiny_pipe, small_scene.render(), PROMPT, SETTINGS, progress=False)
    rec_npi = reconstruct(tiny_pipe, npi, progress=False)  # at w = 7.5 with ∅ = C
    rec_w1 = reconstruct(tiny_pipe, ddim, guidance_scale=1.0, progress=False)
    assert_same_run(rec_npi, rec_w1)
    assert _err(tiny_pipe, npi, z0) < _err(tiny_pipe, ddim, z0)


def test_save_load_roundtrip_is_exact(tiny_pipe, nti, tmp_path):
    path = save_inversion(nti, tmp_path / "inv.safetensors")
    back = load_inversion(path, tiny_pipe, num_steps=SETTINGS.num_steps)
    assert torch.equal(back.latent_T, nti.latent_T)
    assert torch.equal(back.null_embeddings, nti.null_embeddings)
    assert back.losses == nti.losses and back.inner_steps == nti.inner_steps
    assert back.settings == nti.settings and back.prompt == nti.prompt
    assert_same_run(
        reconstruct(tiny_pipe, back, progress=False), reconstruct(tiny_pipe, nti, progress=False)
    )


def test_saving_twice_gives_the_same_bytes(nti, tmp_path):
    a = save_inversion(nti, tmp_path / "a.safetensors").read_bytes()
    assert save_inversion(nti, tmp_path / "b.safetensors").read_bytes() == a


def test_save_refuses_to_overwrite(nti, tmp_path):
    path = save_inversion(nti, tmp_path / "inv.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_inversion(nti, path)
    save_inversion(nti, path, overwrite=True)


def test_load_into_other_model_or_steps_fails(nti, tmp_path):
    path = save_inversion(nti, tmp_path / "inv.safetensors")
    with pytest.raises(ValueError, match="made with model"):
        load_inversion(path, tiny_pipeline(seed=1))
    with pytest.raises(ValueError, match="10 DDIM steps, not 50"):
        load_inversion(path, num_steps=50)
    other = tiny_pipeline()
    other.scheduler.register_to_config(steps_offset=0)
    with pytest.raises(ValueError, match="scheduler settings differ"):
        load_inversion(path, other)


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    assert "x" in load_file(str(path))
    with pytest.raises(ValueError, match="not an nti_utils inversion"):
        load_inversion(path)
    with pytest.raises(FileNotFoundError):
        load_inversion(tmp_path / "missing.safetensors")


def test_batch_of_images_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="one image at a time"):
        null_text_inversion(tiny_pipe, torch.zeros(2, 4, 16, 16), PROMPT, SETTINGS, progress=False)


def test_optimizing_the_conditional_embedding_ablation(tiny_pipe, small_scene, tmp_path):
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    cond_settings = dataclasses.replace(SETTINGS, optimize="cond")
    res = null_text_inversion(tiny_pipe, z0, PROMPT, cond_settings, progress=False)
    n = SETTINGS.num_steps
    assert res.method == "cond-text" and res.cond_offsets.shape == (n, 1, 16, 32)
    assert all(torch.equal(e, res.null_embeddings[0]) for e in res.null_embeddings)  # ∅ fixed
    assert res.cond_offsets.abs().sum() > 0
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    assert _err(tiny_pipe, res, z0) < _err(tiny_pipe, ddim, z0)
    # the offsets are used: without them the reconstruction is the fixed-∅ one from z̄_T
    plain = dataclasses.replace(res, cond_offsets=None)
    assert _err(tiny_pipe, res, z0) < _err(tiny_pipe, plain, z0)
    back = load_inversion(save_inversion(res, tmp_path / "c.safetensors"), tiny_pipe)
    assert torch.equal(back.cond_offsets, res.cond_offsets) and back.settings.optimize == "cond"
    assert_same_run(
        reconstruct(tiny_pipe, back, progress=False), reconstruct(tiny_pipe, res, progress=False)
    )


def test_edit_adds_the_conditional_offsets_to_every_prompt(tiny_pipe, small_scene):
    from nti_utils.editing import edit

    settings = dataclasses.replace(SETTINGS, optimize="cond", num_steps=4, inner_steps=2)
    res = null_text_inversion(tiny_pipe, small_scene.render(), PROMPT, settings, progress=False)
    out = edit(tiny_pipe, res, [PROMPT, PROMPT], progress=False)  # a plain store edits nothing
    rec = reconstruct(tiny_pipe, res, progress=False)
    assert_same_run(out.latents[:1], rec)
    assert_same_run(out.latents[1:], rec)


def test_settings_and_sampler_refuse_bad_values(tiny_pipe):
    from nti_utils.ddim import DDIMSchedule, sample

    with pytest.raises(ValueError, match="optimize must be one of"):
        InversionSettings(optimize="weights")
    sched = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, 3)
    z, c = torch.zeros(1, 4, 16, 16), torch.zeros(1, 16, 32)
    with pytest.raises(ValueError, match="2 conditional offsets for 3 steps"):
        sample(tiny_pipe.unet, z, c, sched, 1.0, cond_offsets=[c, c], progress=False)

"""DDIM maths and loops against diffusers' references."""

import pytest
import torch
from diffusers import DDIMInverseScheduler

from nti_utils.ddim import DDIMSchedule, ddim_inverse_step, ddim_step, invert, predict_x0, sample
from nti_utils.images import image_to_latents
from nti_utils.models import embed_prompts, sd_ddim_scheduler
from nti_utils.testing import assert_same_run

PROMPT = "a red circle on a white background"


def test_schedule_matches_sd_timesteps():
    sched = DDIMSchedule.from_scheduler(sd_ddim_scheduler(), 50)
    assert sched.timesteps[0] == 981 and sched.timesteps[-1] == 1 and sched.stride == 20
    assert torch.equal(sched.alpha(-19), sched.alphas_cumprod[0])  # set_alpha_to_one=False


@pytest.mark.parametrize("num_steps", [10, 50])
def test_forward_step_equals_ddim_scheduler(num_steps):
    ref = sd_ddim_scheduler()
    ref.set_timesteps(num_steps)
    sched = DDIMSchedule.from_scheduler(ref, num_steps)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ref.timesteps):
        z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        a_t, a_prev = sched.alphas(i)
        expected = ref.step(eps, t, z)
        assert torch.equal(ddim_step(z, eps, a_t, a_prev), expected.prev_sample)
        torch.testing.assert_close(predict_x0(z, eps, a_t), expected.pred_original_sample)


def test_inverse_step_equals_ddim_inverse_scheduler():
    num_steps = 25
    ref = DDIMInverseScheduler.from_config(sd_ddim_scheduler().config)
    ref.set_timesteps(num_steps)
    sched = DDIMSchedule.from_scheduler(sd_ddim_scheduler(), num_steps)
    g = torch.Generator().manual_seed(1)
    # the inverse scheduler walks t = 1, 41, ..., i.e. our sampling steps backwards
    for k, t in enumerate(ref.timesteps):
        i = num_steps - 1 - k
        assert int(sched.timesteps[i]) == int(t)
        z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        a_t, a_prev = sched.alphas(i)
        torch.testing.assert_close(
            ddim_inverse_step(z, eps, a_prev, a_t), ref.step(eps, t, z).prev_sample
        )


def test_inverse_undoes_forward_for_fixed_noise():
    sched = DDIMSchedule.from_scheduler(sd_ddim_scheduler(), 50)
    z = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    a_t, a_prev = sched.alphas(10)
    torch.testing.assert_close(
        ddim_inverse_step(ddim_step(z, eps, a_t, a_prev), eps, a_prev, a_t), z
    )


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_sampling_equals_stable_diffusion_pipeline(tiny_pipe, guidance):
    prompts = [PROMPT, "a blue square on a black background"]
    size = tiny_pipe.unet.config.sample_size
    ref = tiny_pipe(
        prompts,
        num_inference_steps=10,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        height=size * tiny_pipe.vae_scale_factor,
        width=size * tiny_pipe.vae_scale_factor,
    ).images
    latents = torch.randn((2, 4, size, size), generator=torch.Generator().manual_seed(0))
    cond = embed_prompts(tiny_pipe, prompts)
    null = embed_prompts(tiny_pipe, "")
    sched = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, 10)
    ours = sample(tiny_pipe.unet, latents, cond, sched, guidance, null, progress=False).latents
    assert_same_run(ours, ref)


def test_per_step_null_embeddings_equal_one_null(tiny_pipe):
    sched = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, 5)
    cond, null = embed_prompts(tiny_pipe, [PROMPT, ""]).chunk(2)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    once = sample(tiny_pipe.unet, z, cond, sched, 7.5, null, progress=False).latents
    per_step = sample(tiny_pipe.unet, z, cond, sched, 7.5, [null] * 5, progress=False).latents
    assert torch.equal(once, per_step)
    with pytest.raises(ValueError, match="per-step null embeddings"):
        sample(tiny_pipe.unet, z, cond, sched, 7.5, [null] * 4, progress=False)


def test_invert_then_sample_reconstructs_at_guidance_one(tiny_pipe, small_scene):
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    cond = embed_prompts(tiny_pipe, PROMPT)
    sched = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, 100)
    traj = invert(tiny_pipe.unet, z0, cond, sched, progress=False)
    assert len(traj) == 101 and torch.equal(traj[0], z0)
    rec = sample(tiny_pipe.unet, traj[-1], cond, sched, 1.0, progress=False).latents
    err = (rec - z0).pow(2).mean().item()
    assert err < 1e-3 * z0.var().item(), err


def test_guidance_amplifies_inversion_error(tiny_pipe, small_scene):
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    cond, null = embed_prompts(tiny_pipe, [PROMPT, ""]).chunk(2)
    sched = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, 20)
    z_T = invert(tiny_pipe.unet, z0, cond, sched, progress=False)[-1]
    err = {
        w: (sample(tiny_pipe.unet, z_T, cond, sched, w, null, progress=False).latents - z0)
        .pow(2)
        .mean()
        .item()
        for w in (1.0, 7.5)
    }
    assert err[7.5] > 10 * err[1.0]

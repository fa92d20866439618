"""What real checkpoints need beyond the embedded model: SD 2.x's v-prediction (a tiny SD 2.x-shaped
pipeline saved and loaded like a real folder), half precision, and runs of more than 100 steps."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from nti_utils import inversion as inversion_module
from nti_utils.ddim import (
    DDIMSchedule,
    ddim_step,
    invert,
    predict_noise,
    predict_x0,
    sample,
    v_to_x0,
)
from nti_utils.editing import edit
from nti_utils.images import decode, image_to_latents
from nti_utils.inversion import ddim_inversion, lr_at, null_text_inversion, reconstruct
from nti_utils.metrics import psnr
from nti_utils.models import embed_prompts, load_pipeline, scheduler_hash, sd_ddim_scheduler
from nti_utils.p2p import Replace
from nti_utils.result import InversionSettings
from nti_utils.sampling import generate
from nti_utils.testing import (
    SD2_SCHEDULER_CONFIG,
    assert_same_run,
    tiny_pipeline,
    tiny_sd2_pipeline,
)

PROMPT = "a red circle on a white background"
PROMPTS = [PROMPT, "a blue square on a black background"]


@pytest.fixture(scope="module")
def sd2_saved(saved_and_loaded):
    return saved_and_loaded("tiny-sd2", tiny_sd2_pipeline)


@pytest.fixture(scope="module")
def sd2_folder(sd2_saved):
    return sd2_saved[0]


@pytest.fixture(scope="module")
def sd2(sd2_saved):
    return sd2_saved[1]


@pytest.fixture(scope="module")
def sd2_z0(sd2, small_scene):
    return image_to_latents(sd2, small_scene.render())


# ------------------------------------------------------------------------------ v-prediction
def test_loading_keeps_the_checkpoints_prediction_type(sd2):
    assert isinstance(sd2.scheduler, DDIMScheduler)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert DDIMSchedule.from_scheduler(sd2.scheduler, 10).prediction_type == "v_prediction"
    unet = sd2.unet.config
    assert unet.use_linear_projection and unet.upcast_attention
    assert tuple(unet.attention_head_dim) == (2, 4)


def test_scheduler_keeps_trajectory_keys_and_forces_only_clipping_off():
    cfg = {
        **SD2_SCHEDULER_CONFIG,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "clip_sample": True,
        "thresholding": True,
    }
    sched = sd_ddim_scheduler(cfg)
    for key in ("prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one"):
        assert sched.config[key] == cfg[key], key
    assert not sched.config.clip_sample and not sched.config.thresholding
    # SD's settings fill what a config does not say (an old SD 1.x PNDM config, say)
    old = sd_ddim_scheduler({"beta_end": 0.012, "skip_prk_steps": True})
    assert old.config.prediction_type == "epsilon" and old.config.steps_offset == 1


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_generate_equals_diffusers_on_a_v_prediction_checkpoint(sd2, sd2_folder, guidance):
    ref_pipe = StableDiffusionPipeline.from_pretrained(
        sd2_folder, safety_checker=None, requires_safety_checker=False
    )
    ref_pipe.set_progress_bar_config(disable=True)
    assert ref_pipe.scheduler.config.prediction_type == "v_prediction"
    ref = ref_pipe(
        PROMPTS,
        num_inference_steps=10,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    ours = generate(
        sd2, PROMPTS, 10, guidance, generator=torch.Generator().manual_seed(0), progress=False
    ).output.latents
    assert_same_run(ours, ref)
    # reading v as ε (the old behaviour) is far off: the comparison can tell
    as_eps = dataclasses.replace(
        DDIMSchedule.from_scheduler(sd2.scheduler, 10), prediction_type="epsilon"
    )
    z = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))
    cond, null = embed_prompts(sd2, PROMPTS), embed_prompts(sd2, "")
    wrong = sample(sd2.unet, z, cond, as_eps, guidance, null, progress=False).latents
    assert (wrong - ref).abs().max().item() > 1.0


def test_predict_noise_converts_v_to_eps(sd2):
    sched = DDIMSchedule.from_scheduler(sd2.scheduler, 10)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 16, 16, generator=g)
    cond = embed_prompts(sd2, PROMPT)
    t = sched.timesteps[3]
    v = sd2.unet(z, t, encoder_hidden_states=cond).sample  # the raw output
    eps = predict_noise(sd2.unet, z, t, cond, sched)
    a = sched.alpha(int(t))
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * z)
    ref = DDIMScheduler.from_config(sd2.scheduler.config)
    ref.set_timesteps(10)
    out = ref.step(v, t, z)
    torch.testing.assert_close(predict_x0(z, eps, a), out.pred_original_sample)
    torch.testing.assert_close(v_to_x0(v, z, a), out.pred_original_sample)
    torch.testing.assert_close(ddim_step(z, eps, *sched.alphas(3)), out.prev_sample)


def test_ddim_inversion_reconstructs_at_guidance_one(sd2, sd2_z0):
    cond = embed_prompts(sd2, PROMPT)
    sched = DDIMSchedule.from_scheduler(sd2.scheduler, 20)
    traj = invert(sd2.unet, sd2_z0, cond, sched, progress=False)
    rec = sample(sd2.unet, traj[-1], cond, sched, 1.0, progress=False).latents
    err = (rec - sd2_z0).pow(2).mean().item()
    assert err < 1e-3 * sd2_z0.var().item(), err


def test_null_text_beats_ddim_at_guidance_on_v_prediction(sd2, sd2_z0):
    settings = InversionSettings(num_steps=10)
    nti = null_text_inversion(sd2, sd2_z0, PROMPT, settings, progress=False)
    ddim = ddim_inversion(sd2, sd2_z0, PROMPT, settings, progress=False)
    err = {
        k: (reconstruct(sd2, r, progress=False) - sd2_z0).pow(2).mean().item()
        for k, r in (("nti", nti), ("ddim", ddim))
    }
    assert err["nti"] < 0.5 * err["ddim"], err
    # a Prompt-to-Prompt edit that edits nothing re-creates the reconstruction in row 0
    ctrl = Replace(sd2.tokenizer, [PROMPT, PROMPT], 10, cross_replace_steps=0.0)
    out = edit(sd2, nti, [PROMPT, PROMPT], ctrl, progress=False)
    rec = reconstruct(sd2, nti, progress=False)
    assert_same_run(out.latents[:1], rec)


def test_unsupported_prediction_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        sd_ddim_scheduler({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        DDIMSchedule.from_scheduler(DDIMScheduler(prediction_type="sample"), 10)
    pipe = tiny_sd2_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="x0-prediction"):
        generate(pipe, PROMPT, 2, progress=False)
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        load_pipeline(tmp_path, device="cpu", dtype=torch.float32)


def test_scheduler_hash_covers_the_trajectory(sd2):
    base = sd_ddim_scheduler(SD2_SCHEDULER_CONFIG)
    h = scheduler_hash(base)
    assert scheduler_hash(sd2.scheduler) == h  # saved and loaded: the same trajectory
    assert scheduler_hash(sd_ddim_scheduler(dict(SD2_SCHEDULER_CONFIG))) == h
    # keys that do not move the trajectory do not move the hash
    assert scheduler_hash(DDIMScheduler.from_config(base.config, clip_sample_range=2.0)) == h
    changes = [
        {"prediction_type": "epsilon"},
        {"timestep_spacing": "trailing"},
        {"steps_offset": 0},
        {"beta_end": 0.02},
        {"beta_schedule": "linear"},
        {"rescale_betas_zero_snr": True},
        {"set_alpha_to_one": True},
    ]
    hashes = {scheduler_hash(sd_ddim_scheduler({**SD2_SCHEDULER_CONFIG, **c})) for c in changes}
    assert len(hashes) == len(changes) and h not in hashes


# ------------------------------------------------------------------------------ half precision
def _decoded_psnr(pipe32, latents, z0) -> float:
    """PSNR of decoded latents against the decoded z0, both through the float32 VAE."""
    with torch.no_grad():
        return psnr(decode(pipe32.vae, latents.float()), decode(pipe32.vae, z0))


@pytest.mark.parametrize(
    "build, dtype, optimize",
    [
        (tiny_pipeline, torch.float16, "null"),
        (tiny_pipeline, torch.bfloat16, "null"),
        (tiny_pipeline, torch.float16, "cond"),
        (tiny_sd2_pipeline, torch.bfloat16, "null"),
    ],
)
def test_half_precision_null_text_inversion_is_close_to_float32(
    small_scene, build, dtype, optimize
):
    settings = InversionSettings(num_steps=5, inner_steps=5, optimize=optimize)
    pipe32 = build()
    z0 = image_to_latents(pipe32, small_scene.render())
    half = build().to(dtype)
    ref = null_text_inversion(pipe32, z0, PROMPT, settings, progress=False)
    res = null_text_inversion(half, z0.to(dtype), PROMPT, settings, progress=False)
    assert torch.isfinite(res.null_embeddings.float()).all()
    assert res.null_embeddings.dtype == dtype  # stored in the UNet's dtype, optimized in float32
    assert sum(res.inner_steps) > 0  # the optimization did run
    rec = reconstruct(half, res, progress=False)
    assert rec.dtype == dtype and torch.isfinite(rec.float()).all()
    rec32 = reconstruct(pipe32, ref, progress=False)
    p_half, p32 = _decoded_psnr(pipe32, rec, z0), _decoded_psnr(pipe32, rec32, z0)
    assert abs(p_half - p32) < 1.0, (p_half, p32)
    # and where null-text clearly beats plain DDIM inversion in float32 (by more than half precision
    # costs), it still does in half precision
    ddim32 = ddim_inversion(pipe32, z0, PROMPT, settings, progress=False)
    p_ddim32 = _decoded_psnr(pipe32, reconstruct(pipe32, ddim32, progress=False), z0)
    if p32 - p_ddim32 > 1.0:
        ddim = ddim_inversion(half, z0.to(dtype), PROMPT, settings, progress=False)
        p_ddim = _decoded_psnr(pipe32, reconstruct(half, ddim, progress=False), z0)
        assert p_half > p_ddim, (p_half, p_ddim)


# ------------------------------------------------------------------------------ > 100 steps
def test_learning_rate_schedule():
    s = InversionSettings()
    # the official decay, bit for bit, for every run of at most 100 steps (the paper's 50)
    for n in (10, 50, 100):
        assert [lr_at(s, i, n) for i in range(n)] == [
            s.effective_lr * (1.0 - i / 100.0) for i in range(n)
        ]
    for n in (101, 150, 1000):
        lrs = [lr_at(s, i, n) for i in range(n)]
        assert all(lr > 0 for lr in lrs) and lrs == sorted(lrs, reverse=True)
    with pytest.raises(ValueError, match="step index"):
        lr_at(s, 150, 150)


def test_a_150_step_inversion_runs_with_positive_learning_rates(
    tiny_pipe, small_scene, monkeypatch
):
    seen = []

    def recording(settings, i, n):
        seen.append(lr_at(settings, i, n))
        return seen[-1]

    monkeypatch.setattr(inversion_module, "lr_at", recording)
    z0 = image_to_latents(tiny_pipe, small_scene.render())
    settings = InversionSettings(num_steps=150, inner_steps=1)
    res = null_text_inversion(tiny_pipe, z0, PROMPT, settings, progress=False)
    assert len(seen) == 150 and all(lr > 0 for lr in seen)
    assert res.null_embeddings.shape[0] == 150 and torch.isfinite(res.null_embeddings).all()
    rec = reconstruct(tiny_pipe, res, progress=False)
    assert torch.isfinite(rec).all()

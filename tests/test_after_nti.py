"""The inversions after null-text inversion (Direct Inversion, EDICT, edit-friendly DDPM, fixed-point)
on the tiny pipelines: exact reconstruction where the method promises it, editing through
`edit` with Prompt-to-Prompt, saving and loading, settings checks."""

import dataclasses

import pytest
import torch

from nti_utils.attention import AttentionStore
from nti_utils.bench.measure import measure
from nti_utils.ddim import (
    DDIMSchedule,
    ddim_inverse_step,
    ddim_sigma,
    ddim_step,
    predict_x0,
    stochastic_step,
)
from nti_utils.ddpm_inversion import DDPMInversionSettings, ddpm_inversion
from nti_utils.direct_inversion import direct_inversion
from nti_utils.edict import EDICTSettings, edict_inversion, edict_sample
from nti_utils.editing import build_controller, edit
from nti_utils.fixed_point import FixedPointSettings, fixed_point_inversion, fixed_point_step
from nti_utils.images import image_to_latents
from nti_utils.inversion import ddim_inversion, reconstruct
from nti_utils.result import InversionSettings
from nti_utils.storage import load_inversion, save_inversion
from nti_utils.testing import assert_same_run, tiny_pipeline, tiny_sd2_pipeline

PROMPT = "a red circle on a white background"
TARGET = "a red square on a white background"
N = 6
EXACT = 5e-5  # max |z_rec - z_0| for "exact": float32 rounding (latents are about unit size)


def _seed(k=0):
    return torch.Generator().manual_seed(k)


INVERT = {
    "direct": lambda pipe, z0, s: direct_inversion(pipe, z0, PROMPT, s, progress=False),
    "edict": lambda pipe, z0, s: edict_inversion(pipe, z0, PROMPT, s, progress=False),
    "ddpm": lambda pipe, z0, s: ddpm_inversion(
        pipe, z0, PROMPT, s, progress=False, generator=_seed()
    ),
    "fixed-point": lambda pipe, z0, s: fixed_point_inversion(pipe, z0, PROMPT, s, progress=False),
}


@pytest.fixture(scope="module")
def z0(tiny_pipe, small_scene):
    return image_to_latents(tiny_pipe, small_scene.render())


@pytest.fixture(scope="module")
def results(tiny_pipe, z0):
    """Every method at w = 1 and w = 7.5, with its reconstruction."""
    out = {}
    for w in (1.0, 7.5):
        s = InversionSettings(num_steps=N, guidance_scale=w)
        for name, fn in INVERT.items():
            r = fn(tiny_pipe, z0, s)
            out[name, w] = (r, reconstruct(tiny_pipe, r, progress=False))
    return out


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("w", [1.0, 7.5])
@pytest.mark.parametrize("name", ["direct", "edict", "ddpm"])
def test_exact_methods_reconstruct_z0(results, tiny_pipe, z0, name, w):
    result, rec = results[name, w]
    assert result.method == name
    assert _max_err(rec, z0) < EXACT, (name, w, _max_err(rec, z0))
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, InversionSettings(N, w), progress=False)
    assert _max_err(reconstruct(tiny_pipe, ddim, progress=False), z0) > 100 * EXACT


@pytest.mark.parametrize("name", ["direct", "edict", "ddpm"])
def test_exact_on_v_prediction(name):
    pipe = tiny_sd2_pipeline()
    z0 = torch.randn(1, 4, 16, 16, generator=_seed(3))
    result = INVERT[name](pipe, z0, InversionSettings(N, 7.5))
    assert _max_err(reconstruct(pipe, result, progress=False), z0) < EXACT


class _Trace(AttentionStore):
    """Records the latents after every step (what the step callback sees)."""

    def begin(self, num_prompts, latent_hw):
        super().begin(num_prompts, latent_hw)
        self.latents = []

    def step_end(self, i, t, latents):
        self.latents.append(latents.clone())
        return super().step_end(i, t, latents)


@pytest.mark.parametrize("w", [1.0, 7.5])
def test_direct_inversion_source_branch_follows_the_pivots(results, tiny_pipe, z0, w):
    result, _ = results["direct", w]
    pivots = result.pivots
    assert torch.equal(result.latent_T, pivots[-1]) and torch.equal(pivots[0], z0)
    assert result.source_corrections.shape == (N, 1, 4, 16, 16)
    trace = _Trace()
    out = edit(tiny_pipe, result, [PROMPT, TARGET], trace, progress=False)
    assert len(trace.latents) == N
    for i, z in enumerate(trace.latents):
        assert _max_err(z[:1], pivots[N - 1 - i]) < EXACT, i
    # the target is not corrected: it leaves the pivots
    assert _max_err(out.latents[1:], z0) > 100 * EXACT


def test_direct_corrections_are_the_guided_steps_miss(results):
    # at w = 7.5 a guided step strays further from the w = 1 trajectory than at w = 1
    e1, e75 = results["direct", 1.0][0].step_errors, results["direct", 7.5][0].step_errors
    assert len(e1) == N and sum(e75) > sum(e1) > 0


def test_fixed_point_beats_ddim_inversion_under_guidance(tiny_pipe, z0, results):
    s = InversionSettings(N, 7.5)
    _, rec_fp = results["fixed-point", 7.5]
    err_fp = (rec_fp - z0).pow(2).mean().item()
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, s, progress=False)  # pivots at w = 1
    err_ddim = (reconstruct(tiny_pipe, ddim, progress=False) - z0).pow(2).mean().item()
    plain = fixed_point_inversion(tiny_pipe, z0, PROMPT, s, FixedPointSettings(0), progress=False)
    err_plain = (reconstruct(tiny_pipe, plain, progress=False) - z0).pow(2).mean().item()
    assert err_fp < 0.01 * err_ddim and err_fp < 0.1 * err_plain, (err_fp, err_ddim, err_plain)
    averaged = fixed_point_inversion(
        tiny_pipe, z0, PROMPT, s, FixedPointSettings(3, 2), progress=False
    )
    err_avg = (reconstruct(tiny_pipe, averaged, progress=False) - z0).pow(2).mean().item()
    assert err_avg < err_plain
    fp = results["fixed-point", 7.5][0]
    assert fp.method_settings == FixedPointSettings() and len(fp.losses) == N
    first, last = zip(*[(row[0], row[-1]) for row in fp.losses])
    assert all(b < a for a, b in zip(first, last))  # the iteration contracts at every step


@pytest.mark.parametrize("name", list(INVERT))
def test_edit_with_word_swap(results, tiny_pipe, name):
    result, rec = results[name, 7.5]
    ctrl = build_controller(tiny_pipe.tokenizer, [PROMPT, TARGET], N)
    out = edit(tiny_pipe, result, [PROMPT, TARGET], ctrl, progress=False)
    assert out.latents.shape == (2, 4, 16, 16) and len(out.images) == 2
    assert _max_err(out.latents[:1], rec) < EXACT, name  # the source row is the reconstruction
    assert _max_err(out.latents[1:], rec) > 1e-3, name  # the target changed
    assert ctrl.cur_step == N and ctrl.maps(ctrl.map_resolution).shape[0] == 2


class _HalfBlend(AttentionStore):
    """A blend with a fixed mask (the left half), as a LocalBlend applies its mask after each step;
    the tiny model's attention maps are too flat to give a LocalBlend a mask with an outside."""

    def step_end(self, i, t, latents):
        super().step_end(i, t, latents)
        self.shapes.append(tuple(latents.shape))
        mask = torch.zeros_like(latents[:1])
        mask[..., : latents.shape[-1] // 2] = 1
        return latents[:1] + mask * (latents - latents[:1])


@pytest.mark.parametrize("name", list(INVERT))
def test_step_callback_blends_every_latent(results, tiny_pipe, name):
    result, rec = results[name, 7.5]
    blend = _HalfBlend()
    blend.shapes = []
    out = edit(tiny_pipe, result, [PROMPT, TARGET], blend, progress=False)
    # once per step; EDICT hands over the pair [x; y] along channels, so both are blended
    assert blend.shapes == [(2, 8 if name == "edict" else 4, 16, 16)] * N
    right = out.latents[..., 8:]
    torch.testing.assert_close(right[1], right[0], rtol=0, atol=1e-6)
    assert _max_err(out.latents[1, ..., :8], out.latents[0, ..., :8]) > 1e-3
    assert _max_err(out.latents[:1], rec) < EXACT


@pytest.mark.parametrize("name", ["edict", "ddpm"])
def test_local_blend_runs_once_per_step(results, tiny_pipe, name):
    prompts = [PROMPT, TARGET]
    ctrl = build_controller(tiny_pipe.tokenizer, prompts, N, blend_words=[["circle"], ["square"]])
    out = edit(tiny_pipe, results[name, 7.5][0], prompts, ctrl, progress=False)
    assert len(ctrl.local_blend.masks) == N and ctrl.local_blend.masks[-1].shape == (2, 1, 16, 16)
    assert torch.isfinite(out.latents).all()


def test_ddpm_edits_by_the_prompt_alone_and_skips_steps(tiny_pipe, z0):
    s = InversionSettings(N, 7.5)
    skip = DDPMInversionSettings(skip=2)
    result = ddpm_inversion(tiny_pipe, z0, PROMPT, s, skip, progress=False, generator=_seed())
    assert result.noise_maps.shape == (N - 2, 1, 4, 16, 16)
    rec = reconstruct(tiny_pipe, result, progress=False)
    assert _max_err(rec, z0) < EXACT
    plain = edit(tiny_pipe, result, [PROMPT, TARGET], progress=False)  # no Prompt-to-Prompt
    assert _max_err(plain.latents[:1], rec) < EXACT and _max_err(plain.latents[1:], rec) > 1e-3
    prompts = [PROMPT, TARGET]
    ctrl = build_controller(tiny_pipe.tokenizer, prompts, N, blend_words=[["circle"], ["square"]])
    edit(tiny_pipe, result, prompts, ctrl, progress=False)
    # the controller counts the steps of the N-step schedule, the skipped ones already behind it
    assert ctrl.cur_step == N and len(ctrl.local_blend.masks) == N - 2
    # another seed, other noise maps, the same image
    other = ddpm_inversion(tiny_pipe, z0, PROMPT, s, progress=False, generator=_seed(1))
    assert _max_err(other.noise_maps, result.noise_maps[:1]) > 0.1
    assert _max_err(reconstruct(tiny_pipe, other, progress=False), z0) < EXACT


@pytest.mark.parametrize("name", list(INVERT))
def test_save_and_load_round_trip(results, tiny_pipe, tmp_path, name):
    result, rec = results[name, 7.5]
    path = save_inversion(result, tmp_path / f"{name}.safetensors")
    loaded = load_inversion(path, tiny_pipe, num_steps=N)
    assert loaded.method == name and loaded.method_settings == result.method_settings
    for key in ("latent_T", "source_corrections", "noise_maps", "coupled_latent_T"):
        a, b = getattr(result, key), getattr(loaded, key)
        assert (a is None and b is None) or torch.equal(a, b), key
    # equal to float rounding: the saved latents are contiguous, the inversion's are laid out as
    # the UNet's convolutions left them, which changes the last bits of its outputs
    assert_same_run(reconstruct(tiny_pipe, loaded, progress=False), rec)
    with pytest.raises(ValueError, match="does not match"):
        load_inversion(path, tiny_pipeline(seed=1))


def test_unet_rows_are_counted(tiny_pipe, z0):
    s = InversionSettings(N, 7.5)
    for name, fn in INVERT.items():
        with measure(tiny_pipe.unet) as m:
            result = fn(tiny_pipe, z0, s)
        pivots = N if name == "direct" else 0  # Direct's DDIM inversion at w = 1
        assert m.forward_rows == result.unet_calls["forward"] + pivots, name
        assert m.backward_rows == 0 == result.unet_calls["backward"]
    expected = {"direct": 2 * N, "edict": 4 * N, "ddpm": 2 * N, "fixed-point": 2 * N * 4}
    for name, rows in expected.items():
        with torch.no_grad():
            assert INVERT[name](tiny_pipe, z0, s).unet_calls["forward"] == rows, name


@pytest.mark.parametrize(
    "make",
    [
        lambda: EDICTSettings(mix=0.0),
        lambda: EDICTSettings(mix=1.5),
        lambda: EDICTSettings(mix=float("nan")),
        lambda: EDICTSettings(leapfrog="yes"),
        lambda: DDPMInversionSettings(eta=0.0),
        lambda: DDPMInversionSettings(eta=2.0),
        lambda: DDPMInversionSettings(skip=-1),
        lambda: DDPMInversionSettings(skip=1.5),
        lambda: FixedPointSettings(iterations=-1),
        lambda: FixedPointSettings(iterations=True),
        lambda: FixedPointSettings(iterations=None),
        lambda: FixedPointSettings(iterations="3"),
        lambda: FixedPointSettings(average_last=None),
        lambda: FixedPointSettings(iterations=2, average_last=0),
        lambda: FixedPointSettings(iterations=2, average_last=4),
    ],
)
def test_bad_settings_raise(make):
    with pytest.raises(ValueError, match="Settings\\.\\w+ must be"):
        make()


def test_bad_arguments_raise(tiny_pipe, z0):
    s = InversionSettings(N)
    with pytest.raises(ValueError, match="skip=6 must be below the 6 steps"):
        ddpm_inversion(tiny_pipe, z0, PROMPT, s, DDPMInversionSettings(skip=N), progress=False)
    with pytest.raises(TypeError, match="EDICTSettings"):
        edict_inversion(tiny_pipe, z0, PROMPT, s, {"mix": 0.9}, progress=False)
    with pytest.raises(TypeError, match="InversionSettings"):
        fixed_point_inversion(tiny_pipe, z0, PROMPT, {"num_steps": N}, progress=False)
    with pytest.raises(ValueError, match="prompt"):
        direct_inversion(tiny_pipe, z0, "a red circle ☃", s, progress=False)
    random_pivots = InversionSettings(N, pivots="random")
    with pytest.raises(ValueError, match="use pivots='ddim'"):
        direct_inversion(tiny_pipe, z0, PROMPT, random_pivots, progress=False)
    with pytest.raises(TypeError, match="DDPMInversionSettings"):
        ddpm_inversion(tiny_pipe, z0, PROMPT, s, {"skip": 1}, progress=False)
    with pytest.raises(TypeError, match="FixedPointSettings"):
        fixed_point_inversion(tiny_pipe, z0, PROMPT, s, 3, progress=False)
    schedule = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, N)
    cond = torch.zeros(1, 16, 32)
    with pytest.raises(ValueError, match="needs the null embeddings"):
        edict_sample(tiny_pipe.unet, z0, z0, cond, schedule, 7.5, None, progress=False)


def test_results_without_their_method_settings_raise(results, tiny_pipe, tmp_path):
    for name in ("edict", "ddpm"):
        bare = dataclasses.replace(results[name, 7.5][0], method_settings=None)
        with pytest.raises(ValueError, match="no method_settings"):
            reconstruct(tiny_pipe, bare, progress=False)
    wrong = dataclasses.replace(results["edict", 7.5][0], method_settings=DDPMInversionSettings())
    with pytest.raises(ValueError, match="keeps its settings as EDICTSettings"):
        save_inversion(wrong, tmp_path / "wrong.safetensors")


def test_edict_mixing_and_leapfrog_stay_exact(tiny_pipe, z0):
    s = InversionSettings(5, 7.5)  # an odd step count: the leapfrog parity must still match
    for edict in (EDICTSettings(mix=0.8), EDICTSettings(leapfrog=False), EDICTSettings(mix=1.0)):
        r = edict_inversion(tiny_pipe, z0, PROMPT, s, edict, progress=False)
        assert r.coupled_latent_T.shape == r.latent_T.shape == z0.shape
        assert _max_err(reconstruct(tiny_pipe, r, progress=False), z0) < EXACT, edict


def test_edict_stays_exact_in_half_precision(tmp_path):
    # v-prediction and bfloat16: x_T and y_T are kept in float32 (rounded to bfloat16, this
    # reconstruction lands about 0.26 away), in the result and through saving and loading
    pipe = tiny_sd2_pipeline().to(torch.bfloat16)
    z0 = torch.randn(1, 4, 16, 16, generator=_seed(3)).to(torch.bfloat16)
    result = edict_inversion(pipe, z0, PROMPT, InversionSettings(N, 7.5), progress=False)
    assert result.latent_T.dtype == result.coupled_latent_T.dtype == torch.float32
    rec = reconstruct(pipe, result, progress=False)
    assert rec.dtype == torch.bfloat16
    assert _max_err(rec, z0) < 0.02  # one bfloat16 step at |z| < 4 is 0.016
    loaded = load_inversion(save_inversion(result, tmp_path / "edict.safetensors"), pipe)
    assert loaded.latent_T.dtype == loaded.coupled_latent_T.dtype == torch.float32
    assert loaded.null_embeddings.dtype == torch.bfloat16
    assert _max_err(reconstruct(pipe, loaded, progress=False), rec) < 0.02


def test_stochastic_step_is_ddim_at_sigma_0_and_the_ddpm_posterior_at_eta_1(tiny_pipe):
    schedule = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, N)
    g = _seed(5)
    z, eps, noise = (torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for i in range(N):
        a_t, a_prev = (a.double() for a in schedule.alphas(i))
        zero = ddim_sigma(a_t, a_prev, 0.0)
        torch.testing.assert_close(
            stochastic_step(z, eps, a_t, a_prev, zero, noise), ddim_step(z, eps, a_t, a_prev)
        )
        # η = 1: σ_t² = β̃_t and the mean is the DDPM posterior's μ̃_t(x_t, x0), with the strided
        # β_t = 1 - ᾱ_t / ᾱ_{t-1}
        sigma, beta = ddim_sigma(a_t, a_prev, 1.0), 1 - a_t / a_prev
        torch.testing.assert_close(sigma**2, (1 - a_prev) / (1 - a_t) * beta)
        x0 = predict_x0(z, eps, a_t)
        mu = (
            a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * z
        )
        torch.testing.assert_close(stochastic_step(z, eps, a_t, a_prev, sigma), mu)
        torch.testing.assert_close(
            stochastic_step(z, eps, a_t, a_prev, sigma, noise), mu + sigma * noise
        )


def test_fixed_point_step_iterates_and_averages_the_last_estimates():
    a_t, a_prev = torch.tensor(0.5), torch.tensor(0.8)
    z_prev = torch.randn(1, 4, 2, 2, generator=_seed(6))

    def eps_at(z):  # a contraction under InvStep: the iteration converges
        return 0.3 * z + 1.0

    def inv(eps):
        return ddim_inverse_step(z_prev, eps, a_prev, a_t)

    estimates = [inv(eps_at(z_prev))]  # z_t^(0), DDIM inversion
    for _ in range(4):
        estimates.append(inv(eps_at(estimates[-1])))
    z, residuals = fixed_point_step(z_prev, eps_at, a_t, a_prev, FixedPointSettings(4))
    torch.testing.assert_close(z, estimates[4])
    assert len(residuals) == 4 and residuals == sorted(residuals, reverse=True)
    z, _ = fixed_point_step(z_prev, eps_at, a_t, a_prev, FixedPointSettings(4, 3))
    torch.testing.assert_close(z, torch.stack(estimates[2:]).mean(0))  # z_t^(2..4)
    z, residuals = fixed_point_step(z_prev, eps_at, a_t, a_prev, FixedPointSettings(0))
    torch.testing.assert_close(z, estimates[0])
    assert residuals == []
    z, _ = fixed_point_step(z_prev, eps_at, a_t, a_prev, FixedPointSettings(30))
    torch.testing.assert_close(z, inv(eps_at(z)))  # the fixed point: z_t = InvStep(z_{t-1}, ε(z_t))

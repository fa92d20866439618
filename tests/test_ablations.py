"""The paper's ablations that are loops of their own: random pivots and Algorithm 2 (global ∅)."""

import dataclasses

import pytest
import torch

from nti_utils.ddim import DDIMSchedule
from nti_utils.global_null import global_null_text_inversion
from nti_utils.images import image_to_latents
from nti_utils.inversion import ddim_inversion, null_text_inversion, reconstruct
from nti_utils.pivots import random_trajectory
from nti_utils.result import InversionSettings
from nti_utils.storage import load_inversion, save_inversion

PROMPT = "a red circle on a white background"
SETTINGS = InversionSettings(num_steps=8, inner_steps=4)


@pytest.fixture(scope="module")
def z0(tiny_pipe, small_scene):
    return image_to_latents(tiny_pipe, small_scene.render())


def _err(pipe, result, z0):
    return (reconstruct(pipe, result, progress=False) - z0).pow(2).mean().item()


def test_random_trajectory_is_the_forward_process_with_one_noise(tiny_pipe, z0):
    schedule = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, SETTINGS.num_steps)
    traj = random_trajectory(z0, schedule, torch.Generator().manual_seed(3))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    assert len(traj) == SETTINGS.num_steps + 1 and torch.equal(traj[0], z0)
    for k, t in enumerate(reversed(schedule.timesteps.tolist()), start=1):
        want = tiny_pipe.scheduler.add_noise(z0, noise, torch.tensor([t]))
        torch.testing.assert_close(traj[k], want, atol=1e-5, rtol=1e-5)


def test_random_pivots_are_the_targets_and_start_further_away(tiny_pipe, z0):
    gen = torch.Generator().manual_seed(0)
    random = dataclasses.replace(SETTINGS, pivots="random")
    res = null_text_inversion(tiny_pipe, z0, PROMPT, random, progress=False, generator=gen)
    schedule = DDIMSchedule.from_scheduler(tiny_pipe.scheduler, SETTINGS.num_steps)
    want = random_trajectory(z0, schedule, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(res.pivots, want))
    assert torch.equal(res.latent_T, want[-1])
    pivotal = null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    # the paper: a larger initial error and slower convergence (more updates) than DDIM pivots
    assert res.losses[0][0] > pivotal.losses[0][0]
    assert sum(res.inner_steps) >= sum(pivotal.inner_steps)


def test_global_null_is_one_embedding_that_improves_with_passes(tiny_pipe, z0, tmp_path):
    seen = []
    res = global_null_text_inversion(
        tiny_pipe,
        z0,
        PROMPT,
        SETTINGS,
        passes=6,
        progress=False,
        on_pass=lambda k, r: seen.append((k, _err(tiny_pipe, r, z0))),
    )
    n = SETTINGS.num_steps
    assert res.method == "global-null" and [k for k, _ in seen] == list(range(1, 7))
    assert all(torch.equal(e, res.null_embeddings[0]) for e in res.null_embeddings)
    assert len(res.losses) == n and all(len(row) == 6 for row in res.losses)  # per step, per pass
    assert res.inner_steps == [6] * n
    assert res.unet_calls == {"forward": 2 * 6 * n, "backward": 6 * n}
    first, last = sum(row[0] for row in res.losses), sum(row[-1] for row in res.losses)
    assert last < first  # later passes fit the pivots better
    assert seen[-1][1] < seen[0][1]
    ddim = ddim_inversion(tiny_pipe, z0, PROMPT, SETTINGS, progress=False)
    assert seen[-1][1] < _err(tiny_pipe, ddim, z0)
    # it saves and loads like any result (one loss row per step)
    back = load_inversion(save_inversion(res, tmp_path / "g.safetensors"), tiny_pipe)
    assert torch.equal(back.null_embeddings, res.null_embeddings) and back.losses == res.losses
    with pytest.raises(ValueError, match="passes must be"):
        global_null_text_inversion(tiny_pipe, z0, PROMPT, SETTINGS, passes=0)

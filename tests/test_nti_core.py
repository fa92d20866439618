"""The one null-text core against numbers stored from the code it replaced.

`tests/data/nti_stored.safetensors` was written by nti_utils at commit ea17355, before the three
implementations of Algorithm 1 (the library's single-image loop, the batched fast variant and its
options) became one core: per case, the null embeddings, z̄_T, the losses of every evaluation, the
updates per step, the step errors, the UNet rows and the reconstruction at w = 7.5, on the tiny
pipeline with 10 steps. The core must make the same updates (exactly) and land on the same numbers
(to float rounding: batched UNet calls and per-row losses sum in another order, and so does a
machine with another thread count; Adam, which divides by the root of tiny squared gradients, turns
those last bits into differences of up to ~1e-3 in some embedding coordinates, while the
reconstructions agree to ~1e-4).
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nti_utils.inversion import batched_null_text_inversion, null_text_inversion, reconstruct
from nti_utils.result import InversionSettings
from nti_utils.shapes.world import Scene, Shape

STORED = load_file(str(Path(__file__).parent / "data" / "nti_stored.safetensors"))
SCENES = [
    Scene((Shape("circle", "red", 14, 15, 8),), "white", resolution=32),
    Scene((Shape("square", "blue", 12, 18, 7),), "gray", resolution=32),
]
PROMPTS = ["a red circle on a white background", "a blue square on a gray background"]
S = InversionSettings(num_steps=10)
REFERENCE_RULE = dataclasses.replace(S, update_rule="reference")
SHORT = dataclasses.replace(REFERENCE_RULE, step_scale=3.0)


def _compare(pipe, name: str, result) -> None:
    want = {k.split(".", 1)[1]: v for k, v in STORED.items() if k.startswith(name + ".")}
    assert result.inner_steps == want["inner_steps"].tolist(), name
    calls = [result.unet_calls["forward"], result.unet_calls["backward"]]
    assert calls == want["unet_calls"].tolist(), name
    losses = want["losses"]
    for i, row in enumerate(result.losses):
        stored = [v for v in losses[i].tolist() if v == v]
        assert len(row) == len(stored), (name, i)
        torch.testing.assert_close(torch.tensor(row), torch.tensor(stored), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        torch.tensor(result.step_errors, dtype=torch.float64),
        want["step_errors"],
        rtol=1e-4,
        atol=1e-7,
    )
    torch.testing.assert_close(result.latent_T.float(), want["latent_T"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        result.null_embeddings.float(), want["null_embeddings"], rtol=1e-3, atol=2e-3
    )
    if "cond_offsets" in want:
        torch.testing.assert_close(
            result.cond_offsets.float(), want["cond_offsets"], rtol=1e-3, atol=2e-3
        )
    rec = reconstruct(pipe, result, progress=False).float()
    torch.testing.assert_close(rec, want["reconstruction"], rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(
    "name, settings",
    [
        ("check_first", S),
        ("global_null", dataclasses.replace(S, per_timestep=False)),
        ("optimize_cond", dataclasses.replace(S, optimize="cond")),
    ],
)
def test_single_image_matches_the_stored_library_loop(tiny_pipe, name, settings):
    result = null_text_inversion(
        tiny_pipe, SCENES[0].render(), PROMPTS[0], settings, progress=False
    )
    _compare(tiny_pipe, name, result)


def test_start_latent_matches_the_stored_library_loop(tiny_pipe):
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    result = null_text_inversion(
        tiny_pipe, SCENES[0].render(), PROMPTS[0], S, start_latent=noise, progress=False
    )
    torch.testing.assert_close(result.latent_T, noise)
    _compare(tiny_pipe, "start_latent", result)


@pytest.mark.parametrize(
    "name, settings", [("reference_rule", REFERENCE_RULE), ("short_schedule", SHORT)]
)
def test_batched_matches_the_stored_fast_variant(tiny_pipe, name, settings):
    images = [s.render() for s in SCENES]
    for b, result in enumerate(
        batched_null_text_inversion(tiny_pipe, images, PROMPTS, settings, progress=False)
    ):
        _compare(tiny_pipe, f"{name}_batch{b}", result)
    single = null_text_inversion(tiny_pipe, images[0], PROMPTS[0], settings, progress=False)
    _compare(tiny_pipe, f"{name}_single", single)

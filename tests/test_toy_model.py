"""The committed embedded model (data/toy-sd): loads with plain diffusers, has the architecture
that `nti_utils.shapes.model.EMBEDDED` builds, follows prompts, and supports the paper's pipeline
end to end (inversion + Prompt-to-Prompt word swap)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from nti_utils.attention import cross_attention_resolutions, default_map_resolution
from nti_utils.editing import edit
from nti_utils.inversion import InversionSettings, null_text_inversion
from nti_utils.models import TOY_MODEL_DIR, load_pipeline
from nti_utils.shapes import seeds
from nti_utils.shapes.evaluate import shape_swaps
from nti_utils.shapes.model import EMBEDDED, build_models
from nti_utils.shapes.score import score_caption
from nti_utils.shapes.tokenizer import build_tokenizer
from nti_utils.shapes.world import scene_from_seed

PROMPT = "a red circle on a white background"
PROMPTS = [
    PROMPT,
    "a blue square on a gray background",
    "a yellow triangle on a black background",
    "a green circle on a white background",
]


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def test_plain_diffusers_loads_and_samples_the_prompts():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPTS,
        num_inference_steps=25,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    )
    images = out.images
    scores = [score_caption(im, p) for im, p in zip(images, PROMPTS)]
    # background, color and shape right in every sample; the model card measures 0.92 of samples
    # with exactly one object found (a stray blob sometimes appears), so allow one miss there
    assert all(s.background and all(s.colors) and all(s.shapes) for s in scores), scores
    assert sum(s.count for s in scores) >= len(PROMPTS) - 1, scores


def test_embedded_config_builds_the_committed_architecture():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)
    tokenizer = build_tokenizer(EMBEDDED.max_tokens)
    assert tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    built = dict(zip(("vae", "text_encoder", "unet"), build_models(EMBEDDED, tokenizer)))
    for name, module in built.items():
        shapes = {k: v.shape for k, v in module.state_dict().items()}
        assert shapes == {k: v.shape for k, v in getattr(pipe, name).state_dict().items()}, name


def test_folder_is_small_and_safetensors_only():
    files = [p for p in TOY_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert (TOY_MODEL_DIR / "README.md").exists()  # the model card


def test_attention_maps_at_the_models_resolutions(toy):
    res = cross_attention_resolutions(toy.unet)
    assert res["down"] == [16, 8] and res["mid"] == [4] and default_map_resolution(toy.unet) == 8
    scene = scene_from_seed(seeds.NOTEBOOKS + 1, n_objects=1)
    inv = _inversion(toy, scene, steps=10)  # maps of another prompt than the scene's: opt in
    out = edit(toy, inv, [PROMPT], progress=False, allow_other_source=True)
    maps = out.controller.maps(8)
    assert maps.shape == (1, 8, 8, toy.tokenizer.model_max_length)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 8, 8))


def _inversion(pipe, scene, steps=50):
    settings = InversionSettings(num_steps=steps)
    return null_text_inversion(pipe, scene.render(), scene.caption(), settings, progress=False)


def test_shape_swaps_on_inverted_renders_keep_the_background(toy):
    # issue 4's check: a word swap of the shape word on a null-text-inverted render changes the
    # shape while the background (outside the edit region, against the input) stays >= 25 dB. The
    # evaluator's first 4 held-out scenes (`python -m nti_utils.shapes.evaluate --swaps 20` measures
    # success and background together in 0.60 of 20 scenes; the model card has the numbers)
    r = shape_swaps(toy, 4, progress=False)
    assert r["success_and_ge_25"] >= 0.5, r

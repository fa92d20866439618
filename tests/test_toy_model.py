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
    "a purple square on a white background",
    "a red triangle on a gray background",
    "a blue circle on a black background",
    "a green triangle on a white background",
]


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def test_plain_diffusers_loads_and_samples_the_prompts_only_with_guidance():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)

    def all_right(w: float) -> int:
        out = pipe(
            PROMPTS,
            num_inference_steps=25,
            guidance_scale=w,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
        )
        scores = [score_caption(im, p) for im, p in zip(out.images, PROMPTS)]
        return sum(s.background and all(s.colors) and all(s.shapes) for s in scores)

    # the model card's curve: 0.96 of single-object samples all right at w = 7.5, 0.41 at w = 1
    # (it needs classifier-free guidance, as Stable Diffusion does)
    assert all_right(7.5) >= len(PROMPTS) - 1
    assert all_right(1.0) <= len(PROMPTS) // 2


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


def test_shape_swaps_on_inverted_renders_change_the_shape_and_keep_most_of_the_rest(toy):
    # issue 4's check, end to end: a word swap of the shape word on a null-text-inverted render
    # changes the shape in most scenes and leaves the rest of the image mostly as it was (a broken
    # injection or mask redraws the whole image, under 15 dB). The evaluator's first 4 held-out
    # scenes; measured on the committed model: success 0.75, 23.2 dB outside the edit region on
    # average, >= 25 dB in 1 of the 4; the benchmark's 50 scenes give the reference numbers (README)
    r = shape_swaps(toy, 4, progress=False)
    assert r["success"] >= 0.5, r
    assert r["psnr_outside_mean"] >= 20.0, r

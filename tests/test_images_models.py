"""Image I/O, the loader, prompt embeddings and metrics."""

import numpy as np
import pytest
import torch
from PIL import Image

from nti_utils import images, metrics, models
from nti_utils.images import load_image, model_resolution


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent red -> white
    out = load_image(rgba, 16)
    assert out.mode == "RGB" and out.size == (16, 16)
    assert np.asarray(out).min() == 255
    for mode in ("L", "P", "CMYK", "1"):
        assert load_image(Image.new(mode, (10, 10)), 8).mode == "RGB"


def test_center_crop_keeps_the_middle():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white middle third
    out = load_image(arr)
    assert out.size == (10, 10) and np.asarray(out).min() == 255


def test_paths_and_arrays(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (12, 12), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(np.full((4, 4, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ("/nonexistent.png", FileNotFoundError, "no image file"),
        (np.zeros((4, 4, 5), np.uint8), ValueError, "expected an array"),
        (np.full((4, 4, 3), 2.0), ValueError, "uint8 or float in \\[0, 1\\]"),
        (Image.new("I;16", (4, 4)), ValueError, "16-bit or floating point"),
        (Image.new("RGB", (0, 4)), ValueError, "empty"),
        (42, ValueError, "PIL image, a numpy array or a path"),
    ],
)
def test_unusable_images_get_clear_errors(bad, err, match):
    with pytest.raises(err, match=match):
        load_image(bad, 8)


def test_encode_decode_use_the_model_scaling_factor(tiny_pipe):
    assert model_resolution(tiny_pipe) == 32
    x = images.pil_to_tensor(Image.new("RGB", (32, 32), (200, 30, 30)))
    z = images.encode(tiny_pipe.vae, x)
    raw = tiny_pipe.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * tiny_pipe.vae.config.scaling_factor)
    assert images.decode(tiny_pipe.vae, z).shape == (1, 3, 32, 32)


def test_embed_prompts_matches_diffusers_and_refuses_long_prompts(tiny_pipe):
    cond = models.embed_prompts(tiny_pipe, "a red circle on a white background")
    ref, _ = tiny_pipe.encode_prompt("a red circle on a white background", "cpu", 1, False)
    assert torch.equal(cond, ref)
    with pytest.raises(ValueError, match="shorten it"):
        models.embed_prompts(
            tiny_pipe, "a red circle and a blue square and a green circle on a white background"
        )


def test_loader_reads_a_saved_tiny_pipeline(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "sd")
    pipe = models.load_pipeline(tmp_path / "sd", device="cpu")
    assert pipe.unet.dtype == torch.float32
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (
        "scaled_linear",
        False,
        False,
        1,
    )
    assert models.model_fingerprint(pipe) == models.model_fingerprint(tiny_pipe)
    half = models.load_pipeline(tmp_path / "sd", device="cpu", dtype=torch.float16)
    assert half.unet.dtype == torch.float16
    assert models.model_fingerprint(half) == models.model_fingerprint(tiny_pipe)


def test_loader_draws_no_loading_bars_and_restores_the_libraries_setting(
    tiny_pipe, tmp_path, capfd
):
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    tiny_pipe.save_pretrained(tmp_path / "sd")
    capfd.readouterr()
    assert dl.is_progress_bar_enabled() and tl.is_progress_bar_enabled()
    models.load_pipeline(tmp_path / "sd", device="cpu")
    out, err = capfd.readouterr()
    assert "Loading" not in out + err  # "Loading pipeline components...", "Loading weights"
    assert dl.is_progress_bar_enabled() and tl.is_progress_bar_enabled()


def test_loader_offline_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        models.load_pipeline("nobody/no-such-model", device="cpu")
    monkeypatch.setattr(models, "TOY_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="embedded model is missing"):
        models.load_pipeline("toy", device="cpu")


def test_default_device_and_dtype():
    assert models.default_dtype("cpu") == torch.float32
    assert models.default_dtype("cuda") == torch.float16


def test_metrics():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 255
    assert metrics.mse(a, a) == 0 and metrics.psnr(a, a) == float("inf")
    assert metrics.mse(a, b) == pytest.approx(1 / 64)
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(64))
    mask = np.zeros((8, 8), bool)
    mask[4:, 4:] = True
    assert metrics.psnr(a, b, mask) == float("inf")
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.ssim(a, b) < 1.0
    t = torch.zeros(1, 3, 8, 8)  # [-1, 1] range: 0 is mid-gray
    assert metrics.psnr(t, np.full((8, 8, 3), 0.5)) == float("inf")
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(a, np.zeros((4, 4, 3)))


def test_vae_bound_is_the_psnr_of_the_round_trip(tiny_pipe, small_scene):
    from nti_utils.images import image_to_latents, latents_to_pil

    image = small_scene.render()
    round_trip = latents_to_pil(tiny_pipe, image_to_latents(tiny_pipe, image))[0]
    assert metrics.vae_bound(tiny_pipe, image) == pytest.approx(
        metrics.psnr(image, round_trip), abs=0.05
    )

"""Bad input to the library gets a clear, early error (images, prompts, latents, settings, models,
saved inversions, metrics); valid but odd input works.

Every case asserts the exception type and a phrase of its message. Nothing here runs an inversion
longer than 2 DDIM steps on the tiny pipeline.
"""

import json
import math
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from nti_utils import metrics, models, pivots
from nti_utils.align import check_prompt, word_token_indices
from nti_utils.images import decode, encode, load_image
from nti_utils.inversion import batched_null_text_inversion, ddim_inversion, null_text_inversion
from nti_utils.result import InversionResult, InversionSettings
from nti_utils.shapes.tokenizer import build_tokenizer
from nti_utils.storage import load_inversion, save_inversion
from nti_utils.testing import tiny_pipeline

PROMPT = "a red circle on a white background"
TWO = InversionSettings(num_steps=2, inner_steps=1)


# ------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files: a good PNG, a truncated one, a text file named .png, a folder."""
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "good.png")
    data = (root / "good.png").read_bytes()
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    noisy.save(root / "noisy.png")
    (root / "truncated.png").write_bytes((root / "noisy.png").read_bytes()[:300])
    (root / "text.png").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "folder.png").mkdir()
    assert data[:4] == b"\x89PNG"
    return root


@pytest.mark.parametrize(
    "name, match",
    [
        ("truncated.png", "truncated or corrupt"),
        ("text.png", "could not read .* as an image"),
        ("empty.png", "could not read"),
        ("folder.png", "is a folder, not an image file"),
    ],
)
def test_unreadable_image_files(files, name, match):
    with pytest.raises(ValueError, match=match):
        load_image(files / name, 32)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((0,), np.float32), "empty"),
        (np.full((8, 8, 3), np.nan), "NaN or infinite"),
        (np.where(np.eye(8)[..., None] > 0, np.inf, 0.5) * np.ones(3), "NaN or infinite"),
        (np.zeros((8, 8, 3), np.int64), "uint8 or float.*dtype int64"),
        (np.zeros((3, 8, 8), np.uint8), "channels first"),
        (np.zeros((8, 8, 3), bool), "uint8 or float"),
        (np.zeros((2, 8, 8, 3), np.uint8), "expected an array"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(ValueError, match=match):
        load_image(arr, 8)


@pytest.mark.parametrize(
    "image, size, err, match",
    [
        (torch.zeros(1, 3, 8, 8), 8, ValueError, "tensor_to_pil"),
        (None, 8, ValueError, "got NoneType"),
        (Image.new("RGB", (8, 8)), 0, ValueError, "size must be >= 1"),
        (Image.new("RGB", (8, 8)), "32", TypeError, "size must be an integer"),
        (Image.new("RGB", (8, 8)), 8.0, TypeError, "size must be an integer"),
    ],
)
def test_bad_image_arguments(image, size, err, match):
    with pytest.raises(err, match=match):
        load_image(image, size)


def _jpeg_with_orientation(path, orientation: int) -> None:
    """Left half red, right half blue, with an EXIF orientation tag."""
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 3)  # 180 degrees: viewers show blue on the left
    for image in (path, Image.open(path)):
        arr = np.asarray(load_image(image)).astype(int)
        assert arr[16, 2, 2] > 200 and arr[16, 2, 0] < 60, arr[16, 2]  # blue on the left
        assert arr[16, 29, 0] > 200 and arr[16, 29, 2] < 60, arr[16, 29]
    _jpeg_with_orientation(path, 1)  # upright: unchanged
    assert np.asarray(load_image(path))[16, 2, 0] > 200


def test_float_array_in_range_is_fine():
    out = load_image(np.linspace(0, 1, 64 * 3).reshape(8, 8, 3))
    assert out.size == (8, 8) and out.mode == "RGB"


def test_vae_shapes_are_checked(tiny_pipe):
    with pytest.raises(ValueError, match=r"encode needs images \(B, 3, H, W\)"):
        encode(tiny_pipe.vae, torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"decode needs latents \(B, 4, h, w\)"):
        decode(tiny_pipe.vae, torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------------ prompts
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(16)


@pytest.fixture(scope="module")
def comma_tok(tmp_path_factory):
    """The embedded model's tokenizer plus a comma token, as real CLIP tokenizers have."""
    root = tmp_path_factory.mktemp("tok")
    build_tokenizer(16).save_pretrained(root)
    spec = json.loads((root / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[","], vocab[",</w>"] = len(vocab), len(vocab) + 1
    (root / "tokenizer.json").write_text(json.dumps(spec))
    return CLIPTokenizer.from_pretrained(root)


@pytest.mark.parametrize(
    "prompt, err, match",
    [
        ("a red circle 3", ValueError, "cannot represent: '3'"),
        ("a red \U0001f600 circle", ValueError, "cannot represent: '\U0001f600'"),
        ("a red circle, on a white background", ValueError, "cannot represent: ','"),
        ("a caf\u00e9", ValueError, "cannot represent: '\u00e9'"),
        ("a <|endoftext|> circle", ValueError, "cannot represent"),
        (
            "a red circle and a blue square and a green circle on a white background",
            ValueError,
            "shorten it",
        ),
        (None, TypeError, "prompt must be a string, got NoneType"),
        (3, TypeError, "prompt must be a string, got int"),
        (["a red circle"], TypeError, "prompt must be a string, got list"),
    ],
)
def test_check_prompt_refuses(tok, prompt, err, match):
    with pytest.raises(err, match=match):
        check_prompt(tok, prompt)


def test_check_prompt_says_what_the_tokenizer_has(tok):
    with pytest.raises(ValueError, match="has: A-Z a-z"):
        check_prompt(tok, "a red circle 3")


@pytest.mark.parametrize("prompt", ["A RED Circle", "  a red   circle ", ""])
def test_check_prompt_accepts_odd_but_valid_prompts(tok, prompt):
    assert check_prompt(tok, prompt) == prompt


def test_punctuation_is_not_part_of_a_word(comma_tok):
    plain = "a red circle on a white background"
    comma = "a red circle, on a white background"
    check_prompt(comma_tok, comma)  # this tokenizer has a comma
    assert word_token_indices(comma_tok, comma, "circle") == word_token_indices(
        comma_tok, plain, "circle"
    )
    assert word_token_indices(comma_tok, comma, 2) == [3]  # index of "circle,": its letters
    assert word_token_indices(comma_tok, comma, "circle,") == [3, 4]  # as written: with the comma
    assert word_token_indices(comma_tok, comma, "on") == [5]
    assert word_token_indices(comma_tok, comma, "Circle") == [3]  # case-insensitive fallback


@pytest.mark.parametrize(
    "word, err, match",
    [
        ("square", ValueError, "not in prompt .*its words: a, background, circle"),
        (True, TypeError, "word must be a string or a word index"),
        (2.0, TypeError, "word must be a string or a word index"),
        ("red circle", ValueError, "one word without spaces"),
        ("", ValueError, "one word without spaces"),
        (9, ValueError, "word index 9 out of range"),
    ],
)
def test_word_lookup_errors(tok, word, err, match):
    with pytest.raises(err, match=match):
        word_token_indices(tok, PROMPT, word)


# ------------------------------------------------------------------------------------ inversion
@pytest.fixture
def no_work(monkeypatch):
    """Make the expensive steps fail loudly: validation must come before them."""

    def boom(*args, **kwargs):
        raise AssertionError("expensive work started before validation")

    monkeypatch.setattr(pivots, "encode", boom)
    monkeypatch.setattr(pivots, "invert", boom)


@pytest.mark.parametrize(
    "image, prompt, settings, err, match",
    [
        (torch.zeros(1, 3, 32, 32), PROMPT, TWO, ValueError, "looks like an image tensor"),
        (torch.zeros(1, 8, 16, 16), PROMPT, TWO, ValueError, r"latents must be \(B, 4, 16, 16\)"),
        (torch.zeros(1, 4, 32, 32), PROMPT, TWO, ValueError, r"got \(1, 4, 32, 32\)"),
        (torch.zeros(1, 4, 16), PROMPT, TWO, ValueError, "one image at a time"),
        (torch.full((1, 4, 16, 16), math.nan), PROMPT, TWO, ValueError, "NaN or infinite"),
        (torch.zeros(1, 4, 16, 16, dtype=torch.int64), PROMPT, TWO, TypeError, "floating point"),
        (torch.zeros(1, 4, 16, 16), None, TWO, ValueError, "prompt=None asks for the image to be"),
        (torch.zeros(1, 4, 16, 16), 7, TWO, TypeError, "prompt must be a string, got int"),
        (torch.zeros(1, 4, 16, 16), "a red circle 7", TWO, ValueError, "cannot represent: '7'"),
        (
            torch.zeros(1, 4, 16, 16),
            PROMPT,
            InversionSettings(num_steps=1001),
            ValueError,
            "more than the scheduler's 1000 training timesteps",
        ),
        (np.full((8, 8, 3), np.nan), PROMPT, TWO, ValueError, "NaN or infinite"),
        ("/no/such/image.png", PROMPT, TWO, FileNotFoundError, "no image file"),
        ([Image.new("RGB", (8, 8))], PROMPT, TWO, TypeError, "one image at a time"),
    ],
)
def test_inversion_inputs_are_checked_first(
    tiny_pipe, no_work, image, prompt, settings, err, match
):
    for invert in (null_text_inversion, ddim_inversion):
        with pytest.raises(err, match=match):
            invert(tiny_pipe, image, prompt, settings, progress=False)


@pytest.mark.parametrize(
    "images, prompts, err, match",
    [
        (Image.new("RGB", (8, 8)), [PROMPT], TypeError, "images must be a list"),
        ("img.png", [PROMPT], TypeError, "images must be a list"),
        ([Image.new("RGB", (8, 8))], PROMPT, TypeError, "prompts must be a list of strings"),
        ([], [], ValueError, "no images to invert"),
        ([Image.new("RGB", (8, 8))] * 2, [PROMPT], ValueError, "2 images but 1 prompts"),
        (torch.zeros(2, 3, 32, 32), [PROMPT] * 2, ValueError, "looks like an image tensor"),
    ],
)
def test_batched_inversion_inputs(tiny_pipe, no_work, images, prompts, err, match):
    with pytest.raises(err, match=match):
        batched_null_text_inversion(tiny_pipe, images, prompts, TWO, progress=False)


def test_odd_but_valid_prompt_inverts(tiny_pipe, small_scene):
    result = ddim_inversion(tiny_pipe, small_scene.render(), "A Red CIRCLE", TWO, progress=False)
    assert result.null_embeddings.shape[0] == 2 and result.prompt == "A Red CIRCLE"


@pytest.mark.parametrize(
    "field, value",
    [
        ("guidance_scale", math.nan),
        ("guidance_scale", math.inf),
        ("lr", math.nan),
        ("lr", 0.0),
        ("num_steps", 0),
        ("num_steps", 2.5),
        ("num_steps", True),
    ],
)
def test_settings_refuse_non_finite_and_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"InversionSettings.{field} must be"):
        InversionSettings(**{field: value})


# ------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model") / "sd"
    tiny_pipeline().save_pretrained(root)
    return root


def _broken(model_dir, tmp_path, how: str):
    folder = shutil.copytree(model_dir, tmp_path / "broken")
    if how == "no vae":
        shutil.rmtree(folder / "vae")
    elif how == "vae without weights":
        for f in (folder / "vae").glob("*.safetensors"):
            f.unlink()
    elif how == "empty weights":
        for f in (folder / "unet").glob("*.safetensors"):
            f.write_bytes(b"")
    elif how == "truncated weights":
        for f in (folder / "unet").glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:1000])
    elif how == "no index":
        (folder / "model_index.json").unlink()
    elif how == "bad index":
        (folder / "model_index.json").write_text('{"unet": ["diffusers",')
    elif how == "no tokenizer files":
        for f in (folder / "tokenizer").iterdir():
            f.unlink()
    elif how == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    return folder


@pytest.mark.parametrize(
    "how, err, match",
    [
        ("no vae", FileNotFoundError, "has no vae/ subfolder"),
        ("vae without weights", FileNotFoundError, "vae component is incomplete"),
        ("empty weights", ValueError, "empty weight files"),
        ("truncated weights", ValueError, "could not load the model folder"),
        ("no index", FileNotFoundError, "no model_index.json"),
        ("bad index", ValueError, "model_index.json is not valid JSON"),
        ("no tokenizer files", FileNotFoundError, "tokenizer component is incomplete"),
        ("empty", FileNotFoundError, "no model_index.json .it is empty"),
    ],
)
def test_incomplete_model_folders_name_the_problem(model_dir, tmp_path, how, err, match):
    with pytest.raises(err, match=match):
        models.load_pipeline(_broken(model_dir, tmp_path, how), device="cpu")


@pytest.mark.parametrize(
    "name, match",
    [
        ("model.safetensors", "single-file checkpoint.*from_single_file"),
        ("model.ckpt", "single-file checkpoint.*save_pretrained"),
        ("notes.txt", "is a file; `model` must be a diffusers pipeline folder"),
    ],
)
def test_single_files_are_explained(tmp_path, name, match):
    (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=match):
        models.load_pipeline(tmp_path / name, device="cpu")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(model="./no/such/folder"), FileNotFoundError, "no model folder at"),
        (dict(model=None), TypeError, "model must be 'toy', a hub id or a folder"),
        (dict(model=""), TypeError, "model must be"),
        (dict(device="gpu"), ValueError, "not a device name torch knows"),
        (dict(device=3), TypeError, "device must be a string"),
        (dict(dtype="float64"), ValueError, "dtype 'float64' is not supported"),
        (dict(dtype="half"), ValueError, "use one of float16, bfloat16, float32"),
        (dict(dtype=torch.int8), ValueError, "dtype torch.int8 is not supported"),
        (dict(dtype=16), TypeError, "dtype must be a torch.dtype"),
    ],
)
def test_load_pipeline_arguments(model_dir, kwargs, err, match):
    kwargs = {"model": model_dir, "device": "cpu", **kwargs}
    with pytest.raises(err, match=match):
        models.load_pipeline(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_cuda(model_dir, device):
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):
        models.load_pipeline(model_dir, device=device)


@pytest.mark.parametrize(
    "name, dtype", [("float16", torch.float16), ("torch.float32", torch.float32)]
)
def test_dtype_names_are_accepted(model_dir, name, dtype):
    assert models.load_pipeline(model_dir, device="cpu", dtype=name).unet.dtype == dtype


def test_fingerprint_covers_every_weight_and_the_vae(tiny_pipe):
    base = models.model_fingerprint(tiny_pipe)
    tuned = tiny_pipeline()
    assert models.model_fingerprint(tuned) == base
    with torch.no_grad():  # a fine-tune that leaves the first weights alone
        list(tuned.unet.parameters())[-3].add_(1e-2)
    assert models.model_fingerprint(tuned) == base  # cached: in-place changes need refresh=True
    assert models.model_fingerprint(tuned, refresh=True) != base
    swapped = tiny_pipeline()
    swapped.vae = tiny_pipeline(seed=1).vae  # a swapped VAE is noticed without refresh
    assert models.model_fingerprint(swapped) != base
    text = tiny_pipeline()
    with torch.no_grad():
        list(text.text_encoder.parameters())[-1].add_(1e-2)
    assert models.model_fingerprint(text) != base


# ------------------------------------------------------------------------------------ saved files
@pytest.fixture
def saved(tmp_path):
    """A small saved inversion, its tensors and metadata."""
    result = InversionResult(
        latent_T=torch.zeros(1, 4, 16, 16),
        null_embeddings=torch.zeros(2, 1, 16, 32),
        prompt=PROMPT,
        method="ddim",
        settings=TWO,
    )
    path = save_inversion(result, tmp_path / "inv.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


def _rewrite(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        ("truncate", "not a readable safetensors file"),
        ("zero bytes", "not a readable safetensors file"),
        ("no prompt", r"metadata missing \['prompt'\]"),
        ("extra key", r"metadata unknown \['comment'\]"),
        ("no losses", r"tensors missing \['losses'\]"),
        ("extra tensor", r"tensors unknown \['x'\]"),
        ("unknown setting", "unknown inversion settings"),
        ("broken settings", "unreadable settings"),
        ("bad setting", "InversionSettings.guidance_scale must be a finite number"),
        ("step mismatch", "inconsistent"),
        ("flat latent", "tensor 'latent_T' has shape"),
    ],
)
def test_bad_saved_inversions(saved, change, match):
    path, tensors, meta = saved
    if change == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif change == "zero bytes":
        path.write_bytes(b"")
    elif change == "no prompt":
        _rewrite(path, tensors, {k: v for k, v in meta.items() if k != "prompt"})
    elif change == "extra key":
        _rewrite(path, tensors, {**meta, "comment": "hi"})
    elif change == "no losses":
        _rewrite(path, {k: v for k, v in tensors.items() if k != "losses"}, meta)
    elif change == "extra tensor":
        _rewrite(path, {**tensors, "x": torch.zeros(1)}, meta)
    elif change == "unknown setting":
        settings = {**json.loads(meta["settings"]), "lerning_rate": 1}
        _rewrite(path, tensors, {**meta, "settings": json.dumps(settings)})
    elif change == "broken settings":
        _rewrite(path, tensors, {**meta, "settings": meta["settings"][:10]})
    elif change == "bad setting":
        settings = {**json.loads(meta["settings"]), "guidance_scale": "NaN"}
        _rewrite(path, tensors, {**meta, "settings": json.dumps(settings), "guidance_scale": "NaN"})
    elif change == "step mismatch":
        _rewrite(path, {**tensors, "null_embeddings": torch.zeros(3, 1, 16, 32)}, meta)
    elif change == "flat latent":
        _rewrite(path, {**tensors, "latent_T": torch.zeros(16)}, meta)
    with pytest.raises(ValueError, match=match):
        load_inversion(path)


def test_a_pickle_renamed_safetensors_is_not_executed(tmp_path):
    proof = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (proof,))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    pickle.loads(path.read_bytes())  # the payload works when unpickled ...
    assert proof.exists()
    proof.unlink()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_inversion(path)
    assert not proof.exists()  # ... and load_inversion never unpickles it
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"latent_T": torch.zeros(1)}, torch_file)  # a torch pickle renamed
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_inversion(torch_file)


def test_a_folder_is_not_a_saved_inversion(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_inversion(tmp_path)


def test_good_file_still_loads(saved):
    path, _, _ = saved
    assert load_inversion(path, num_steps=2).prompt == PROMPT


# ------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize(
    "a, b, kwargs, err, match",
    [
        (np.full((8, 8, 3), np.nan), np.zeros((8, 8, 3)), {}, ValueError, "NaN or infinite"),
        (torch.full((1, 3, 8, 8), math.inf), np.zeros((8, 8, 3)), {}, ValueError, "NaN or inf"),
        (np.zeros((8, 8, 3), np.int32), np.zeros((8, 8, 3)), {}, ValueError, "uint8 or float"),
        (
            np.zeros((8, 8, 3)),
            np.zeros((8, 8, 3)),
            {"mask": np.ones((8, 8))},
            ValueError,
            "mask must be a boolean array",
        ),
        (
            np.zeros((8, 8, 3)),
            np.zeros((8, 8, 3)),
            {"mask": np.zeros((8, 8), bool)},
            ValueError,
            "mask selects no pixel",
        ),
        ("a.png", np.zeros((8, 8, 3)), {}, TypeError, "expected a PIL image"),
        (torch.zeros(3, 8), np.zeros((8, 8, 3)), {}, ValueError, "expected a tensor"),
    ],
)
def test_metrics_refuse_bad_images(a, b, kwargs, err, match):
    with pytest.raises(err, match=match):
        metrics.psnr(a, b, **kwargs)


@pytest.mark.parametrize("settings", [{"num_steps": 5}, None, 50, "paper"])
@pytest.mark.parametrize("fn", [null_text_inversion, ddim_inversion])
def test_settings_that_are_not_inversion_settings(tiny_pipe, small_scene, no_work, fn, settings):
    with pytest.raises(TypeError, match="settings must be an InversionSettings"):
        fn(tiny_pipe, small_scene.render(), PROMPT, settings)


def test_edit_checks_every_prompt_against_the_tokenizer(tiny_pipe, small_scene):
    from nti_utils.editing import edit

    settings = InversionSettings(num_steps=2, inner_steps=0)
    inv = ddim_inversion(tiny_pipe, small_scene.render(), PROMPT, settings, progress=False)
    with pytest.raises(ValueError, match=r"prompts\[1\].*cannot represent"):
        edit(tiny_pipe, inv, [PROMPT, "a red square on a white background 2"], progress=False)


def test_a_folder_with_only_fp16_variant_weights_loads(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "m", variant="fp16")
    assert not list((tmp_path / "m" / "unet").glob("diffusion_pytorch_model.safetensors"))
    pipe = models.load_pipeline(tmp_path / "m", device="cpu")
    assert pipe.unet.config.sample_size == tiny_pipeline().unet.config.sample_size

"""Loading a Stable Diffusion pipeline: the embedded model (``"toy"``) or any SD 1.x/2.x/XL
checkpoint, and the prompt embeddings the library conditions on.

One entry point, :func:`load_pipeline`, returns a diffusers `StableDiffusionPipeline` (or, for an
SDXL folder, a `StableDiffusionXLPipeline`) whose scheduler is a `DDIMScheduler` with the
checkpoint's own trajectory settings, SD's where it has none (:func:`sd_ddim_scheduler`), on a
sensible device and dtype. Nothing is downloaded unless you ask for it (``allow_download=True``).

:func:`embed_prompts` and :func:`null_embedding` give the conditioning as one tensor (B, L', D)
for both: SD's text-encoder output (L' = L), or SDXL's two encoders' penultimate hidden states side
by side plus one row token carrying the pooled embedding and the time ids (L' = L + 1,
:mod:`nti_utils.conditioning`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers.utils.logging as diffusers_logging
import torch
import transformers.utils.logging as transformers_logging
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from nti_utils.conditioning import NUM_TIME_IDS, added_cond_layout, extra_rows, pack
from nti_utils.ddim import check_prediction_type
from nti_utils.images import model_resolution

Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
"""The pipelines the library runs: SD 1.x/2.x (and the embedded model) or SDXL."""

SD_SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
"""Stable Diffusion's DDIM settings, as used by the Null-text Inversion paper: the defaults of
:func:`sd_ddim_scheduler` for whatever a checkpoint's own scheduler config does not say."""

DDIM_FORCED_CONFIG: dict = dict(clip_sample=False, thresholding=False)
"""What :func:`sd_ddim_scheduler` forces whatever the checkpoint says: no clipping and no dynamic
thresholding of the predicted x0. The paper's DDIM step must be the exact inverse of the inversion
step, which a clamp of x0 breaks; the library's step (:func:`~nti_utils.ddim.ddim_step`) has none."""

TOY_MODEL_DIR = Path(
    os.environ.get("NTI_TOY_MODEL", Path(__file__).resolve().parent.parent / "data" / "toy-sd")
)
"""Folder of the embedded model (override with the ``NTI_TOY_MODEL`` environment variable)."""


def sd_ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    """The `DDIMScheduler` the library samples and inverts with.

    Args:
        config (`dict`, *optional*): a checkpoint's own scheduler config (any scheduler class). Its
            keys win over SD's (:data:`SD_SCHEDULER_CONFIG`), which only fill what it does not
            say, so everything that defines the model's trajectory is the checkpoint's: the betas
            (``num_train_timesteps``, ``beta_*``, ``trained_betas``, ``rescale_betas_zero_snr``),
            ``prediction_type`` (an SD 2.x-768 checkpoint keeps ``"v_prediction"``),
            ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``. Only
            :data:`DDIM_FORCED_CONFIG` is forced (``clip_sample=False``, ``thresholding=False``):
            what the paper's invertible DDIM needs. Without `config`: SD's settings.

    Raises:
        ValueError: if the prediction type is not one the library supports
            (:data:`~nti_utils.ddim.PREDICTION_TYPES`: ``"epsilon"``, ``"v_prediction"``).
    """
    cfg = {**SD_SCHEDULER_CONFIG, **(config or {}), **DDIM_FORCED_CONFIG}
    check_prediction_type(cfg["prediction_type"])
    return DDIMScheduler.from_config(cfg)


def default_device() -> torch.device:
    """CUDA if available, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA (as SD is usually run), float32 elsewhere."""
    return torch.float16 if _as_device(device).type == "cuda" else torch.float32


DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
"""The weight dtypes :func:`load_pipeline` accepts, by name (``torch.float16`` etc. also work)."""


def _as_device(device: torch.device | str) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a string such as 'cpu' or 'cuda', or a torch.device; got "
            f"{type(device).__name__} ({device!r})"
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device {device!r} is not a device name torch knows; use 'cpu', 'cuda', 'cuda:1' "
            "or 'mps'"
        ) from None


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """`device` checked to exist on this machine (:func:`default_device` if `None`).

    Raises:
        TypeError: not a string or `torch.device`.
        ValueError: an unknown name, or a device this machine does not have (``"cuda"`` without
            CUDA, a GPU index beyond the GPUs there are, ``"mps"`` off Apple silicon).
    """
    if device is None:
        return default_device()
    dev = _as_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"device={str(device)!r}, but CUDA is not available on this machine (torch "
                f"{torch.__version__}, {build}); use device='cpu', or leave `device` unset to take "
                "the best device there is"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device={str(device)!r}, but this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r}, but Apple's MPS is not available here")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """`dtype` as a `torch.dtype`: one of :data:`DTYPES` (by name, ``"torch.float16"`` or the
    dtype itself); :func:`default_dtype` of `device` if `None`.

    Raises:
        TypeError: neither a string nor a `torch.dtype`.
        ValueError: another dtype.
    """
    if dtype is None:
        return default_dtype(device)
    allowed = ", ".join(DTYPES)
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {allowed}")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype or one of the names {allowed}; got "
            f"{type(dtype).__name__} ({dtype!r})"
        )
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use one of {allowed}")
    return dtype


_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMPONENT_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    # component -> (files of which one must exist, what they are)
    "unet": (("config.json",), "config.json"),
    "vae": (("config.json",), "config.json"),
    "text_encoder": (("config.json",), "config.json"),
    "tokenizer": (
        ("vocab.json", "tokenizer.json"),
        "vocab.json (with merges.txt) or tokenizer.json",
    ),
    "scheduler": (("scheduler_config.json",), "scheduler_config.json"),
}
_WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")
_SDXL_COMPONENT_FILES = {
    "text_encoder_2": _COMPONENT_FILES["text_encoder"],
    "tokenizer_2": _COMPONENT_FILES["tokenizer"],
}


def _reload_hint(path: Path) -> str:
    return (
        "An interrupted download, copy or save leaves such a folder: save it again "
        "(pipe.save_pretrained(folder)) or download it again (`huggingface-cli download <hub id> "
        f"--local-dir {path}`)."
    )


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def is_sdxl_index(index: dict) -> bool:
    """Whether a ``model_index.json`` (as a dict) describes an SDXL pipeline: its ``_class_name`` is
    an SDXL pipeline's (``"StableDiffusionXLPipeline"``, ...), or it lists a ``text_encoder_2``."""
    name = str(index.get("_class_name", ""))
    return name.startswith("StableDiffusionXL") or _listed(index, "text_encoder_2")


def check_model_folder(path: str | os.PathLike) -> Path:
    """Check that `path` is a complete diffusers Stable Diffusion (1.x/2.x or XL) folder before
    loading it. An SDXL folder (:func:`is_sdxl_index`) must also hold ``text_encoder_2`` and
    ``tokenizer_2``.

    Args:
        path (`str` or `os.PathLike`): the folder.

    Returns:
        `Path`: the folder, user-expanded.

    Raises:
        FileNotFoundError: no such folder, no ``model_index.json``, or a component's subfolder or
            files missing (the message names the component).
        ValueError: a file instead of a folder (a single-file checkpoint gets the command that
            converts it), an unreadable ``model_index.json``, or an empty weight file.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
            raise ValueError(
                f"{path} is a single-file checkpoint; load_pipeline reads diffusers folders. "
                "Convert it once, offline, with a diffusers folder (or cached hub id) of the same "
                'architecture for the configs: `python -c "from diffusers import '
                f"StableDiffusionPipeline as P; P.from_single_file('{path}', "
                "config='path/to/sd-v1-5-folder', local_files_only=True)"
                f".save_pretrained('{path.with_suffix('')}-diffusers')\"`, then "
                f"load_pipeline('{path.with_suffix('')}-diffusers')."
            )
        raise ValueError(f"{path} is a file; `model` must be a diffusers pipeline folder")
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder: no model_index.json "
            f"({folder_contents(path)}). " + _reload_hint(path)
        )
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{index} is not valid JSON ({err}). " + _reload_hint(path)) from None
    if not isinstance(listed, dict):
        raise ValueError(f"{index} must hold a JSON object. " + _reload_hint(path))
    components = dict(_COMPONENT_FILES)
    if is_sdxl_index(listed):
        components.update(_SDXL_COMPONENT_FILES)
    for name, (files, what) in components.items():
        folder = path / name
        if not _listed(listed, name):
            needs = ", ".join(components)
            raise ValueError(
                f"{index} lists no {name!r} component, which this model needs ({needs})"
            )
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the model folder {path} has no {name}/ subfolder (its {name} component is "
                "missing). " + _reload_hint(path)
            )
        if not any((folder / f).is_file() for f in files):
            raise FileNotFoundError(
                f"{folder} has no {what}: the {name} component is incomplete. " + _reload_hint(path)
            )
        if name in _WEIGHTED:
            weights = [f for ext in ("*.safetensors", "*.bin") for f in folder.glob(ext)]
            if not weights:
                raise FileNotFoundError(
                    f"{folder} has no weights (*.safetensors or *.bin): the {name} component is "
                    "incomplete. " + _reload_hint(path)
                )
            empty = [f.name for f in weights if f.stat().st_size == 0]
            if empty:
                raise ValueError(f"{folder} has empty weight files {empty}. " + _reload_hint(path))
    return path


def folder_contents(path: Path) -> str:
    """``"it is empty"`` or ``"it holds a, b, ..."`` (the first 8 names, sorted): for errors that
    say what a folder that is not a model holds."""
    names = sorted(p.name for p in path.iterdir())
    return "it is empty" if not names else "it holds " + ", ".join(names[:8])


def _weights_variant(folder: str | Path) -> str | None:
    """``"fp16"`` for a folder whose UNet has only ``*.fp16.*`` weight files (a diffusers variant
    that `from_pretrained` loads only when asked to), else None."""
    unet = Path(folder) / "unet"
    names = [f.name for ext in ("*.safetensors", "*.bin") for f in unet.glob(ext)]
    plain = [n for n in names if ".fp16." not in n]
    return "fp16" if names and not plain else None


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' loading bars off while a local folder loads (a second at most;
    in a notebook they would stay behind as frozen bars), restored afterwards."""
    libs = (diffusers_logging, transformers_logging)
    were_on = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(libs, were_on):
            if on:
                lib.enable_progress_bar()


def load_pipeline(
    model: str | os.PathLike = "toy",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    allow_download: bool = False,
) -> Pipeline:
    """Load a Stable Diffusion (1.x, 2.x or XL) pipeline ready for inversion and editing.

    The architecture is read from the folder's ``model_index.json`` (:func:`is_sdxl_index`: its
    ``_class_name``, or a ``text_encoder_2``): an SDXL folder loads as `StableDiffusionXLPipeline`
    (no watermarker), whose VAE is kept in float32 when its config says ``force_upcast`` (SDXL's VAE
    gives NaNs in float16; diffusers upcasts it the same way), whatever `dtype` the rest gets.

    Args:
        model (`str` or `os.PathLike`, defaults to ``"toy"``): ``"toy"`` for the embedded miniature SD
            under ``data/``, a local diffusers folder, or a hub id such as
            ``"CompVis/stable-diffusion-v1-4"`` or ``"stabilityai/stable-diffusion-xl-base-1.0"``
            (from the local Hugging Face cache).
        device (`torch.device` or `str`, *optional*): defaults to :func:`default_device`.
        dtype (`torch.dtype` or `str`, *optional*): ``torch.float16``/``"float16"``,
            ``"bfloat16"`` or ``"float32"``; defaults to :func:`default_dtype` of the device.
        allow_download (`bool`, defaults to `False`): let a hub id be downloaded when it is not in the
            local cache. Off by default: this project runs offline.

    Returns:
        `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (:data:`Pipeline`) with SD's
        `DDIMScheduler` (the checkpoint's trajectory settings), no safety checker, progress bar
        off, ``pipe.config._name_or_path`` set to ``"toy"`` for the embedded model.

    Raises:
        FileNotFoundError: when the weights are not on this machine, or a folder lacks a component
            (named), with what to do about it.
        ValueError: a device this machine does not have, an unsupported dtype, a single-file
            checkpoint (the message says how to convert it), or a folder that does not load.
        TypeError: arguments of the wrong type.
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise TypeError(
            "model must be 'toy', a hub id or a folder path (str or Path), got "
            f"{type(model).__name__} ({model!r})"
        )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    local = not isinstance(model, str) or not _HUB_ID.fullmatch(model) or Path(model).exists()
    if str(model) != "toy" and local:
        check_model_folder(model)
    if str(model) == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").exists():
            raise FileNotFoundError(
                f"The embedded model is missing: {TOY_MODEL_DIR}/model_index.json not found. It ships "
                "with the repository (data/toy-sd); restore it with `git checkout -- data/toy-sd`, "
                "point NTI_TOY_MODEL to a copy, or retrain it with "
                "`python -m nti_utils.shapes.train --out data/toy-sd`."
            )
        source: str | Path = check_model_folder(TOY_MODEL_DIR)
    else:
        source = Path(model).expanduser() if local else model
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
            warnings.filterwarnings("ignore", "The `local_dir_use_symlinks` argument is deprecated")
            index = StableDiffusionPipeline.load_config(source, local_files_only=not allow_download)
        if is_sdxl_index(index):
            cls, options = StableDiffusionXLPipeline, dict(add_watermarker=False)
        else:
            cls = StableDiffusionPipeline
            options = dict(
                safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        with no_loading_bars():
            pipe = cls.from_pretrained(
                source,
                variant=_weights_variant(source) if local or str(model) == "toy" else None,
                dtype=dtype,
                local_files_only=not allow_download,
                **options,
            )
    except Exception as err:
        if local or str(model) == "toy":
            raise ValueError(
                f"could not load the model folder {source} ({type(err).__name__}: {err}); a "
                "weight or config file may be truncated or corrupt. " + _reload_hint(Path(source))
            ) from err
        if not isinstance(err, (OSError, ValueError)):
            raise
        raise FileNotFoundError(
            f"Could not load {str(model)!r}: it is neither a local diffusers folder nor in the local "
            "Hugging Face cache, and downloading is off (this project runs offline). On a machine "
            f"with internet, run `huggingface-cli download {model}` and copy the cache "
            "(~/.cache/huggingface) here, pass a local folder path, or call "
            "load_pipeline(..., allow_download=True) where downloading is allowed."
        ) from err
    pipe.scheduler = sd_ddim_scheduler(dict(pipe.scheduler.config))
    if str(model) == "toy":
        pipe.register_to_config(_name_or_path="toy")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if is_sdxl(pipe) and pipe.vae.config.get("force_upcast", False) and dtype != torch.float32:
        pipe.vae.to(torch.float32)  # what diffusers' SDXL pipeline does before decoding
    return pipe


def is_sdxl(pipe: Pipeline) -> bool:
    """Whether `pipe` is SDXL-shaped: a second text encoder (``text_encoder_2``) or a UNet that
    takes SDXL's added conditioning (:func:`~nti_utils.conditioning.added_cond_layout`)."""
    return (
        getattr(pipe, "text_encoder_2", None) is not None
        or added_cond_layout(pipe.unet) is not None
    )


def scheduler_hash(scheduler: DDIMScheduler) -> str:
    """Short hash of everything that defines the library's DDIM trajectory for this scheduler,
    read from the `DDIMScheduler` the sampler builds from its config (as
    :meth:`~nti_utils.ddim.DDIMSchedule.from_scheduler` does): the bytes of ᾱ (``alphas_cumprod``,
    whatever betas, schedule or zero-SNR rescaling made them) and of the final ᾱ, the prediction
    type, and what places the timesteps (``num_train_timesteps``, ``timestep_spacing``,
    ``steps_offset``)."""
    sched = DDIMScheduler.from_config(scheduler.config)
    h = hashlib.sha256()
    for alphas in (sched.alphas_cumprod, sched.final_alpha_cumprod):
        h.update(alphas.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    keys = ("prediction_type", "num_train_timesteps", "timestep_spacing", "steps_offset")
    h.update(json.dumps({k: sched.config[k] for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:16]


_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
"""Cache of :func:`model_fingerprint`: one hash per component module (so swapping a component
for another module is noticed)."""


def _module_hash(module: torch.nn.Module, refresh: bool) -> str:
    if not refresh and module in _FINGERPRINTS:
        return _FINGERPRINTS[module]
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            floating = tensor.is_floating_point()
            x = tensor.detach().to("cpu", torch.float16 if floating else None).contiguous()
            h.update(f"{name}:{tuple(x.shape)}:{'float' if floating else x.dtype};".encode())
            h.update(memoryview(x.reshape(-1).numpy()).cast("B"))
    _FINGERPRINTS[module] = h.hexdigest()
    return _FINGERPRINTS[module]


def model_fingerprint(pipe: Pipeline, refresh: bool = False) -> str:
    """Short hash of every weight of the UNet, the text encoder (and SDXL's ``text_encoder_2``) and
    the VAE (all state-dict tensors, names and shapes, floating point ones rounded to float16 on the
    CPU, so fp16 and fp32 loads of one checkpoint agree) and of the VAE's scaling factor: tells two
    models apart whatever their folder is called, a fine-tuned UNet or a swapped VAE included.

    Computed once per component module and cached (a few seconds for SD's 1B weights on a GPU).
    Changing weights in place afterwards (fine-tuning, ``load_state_dict``) is not noticed: call
    ``model_fingerprint(pipe, refresh=True)`` then. Replacing a component (``pipe.vae = other``)
    is noticed without it.
    """
    h = hashlib.sha256()
    names = ["unet", "text_encoder", "vae"]
    if getattr(pipe, "text_encoder_2", None) is not None:
        names.append("text_encoder_2")
    for name in names:
        h.update(f"{name}:{_module_hash(getattr(pipe, name), refresh)};".encode())
    h.update(f"scaling_factor:{pipe.vae.config.get('scaling_factor')}".encode())
    return h.hexdigest()[:16]


def model_id(pipe: Pipeline) -> str:
    """The name the pipeline was loaded under (``"toy"``, a hub id or a folder)."""
    return str(pipe.config.get("_name_or_path", "") or "unnamed")


def _token_ids(tok, prompts: list[str]) -> list[list[int]]:
    """Token ids padded to ``tok.model_max_length``; a `ValueError` for a prompt that is longer."""
    max_len = tok.model_max_length
    ids = tok(
        prompts, padding="max_length", max_length=max_len, truncation=False, return_tensors=None
    ).input_ids
    for p, row in zip(prompts, ids):
        if len(row) > max_len:
            raise ValueError(
                f"prompt {p!r} has {len(row)} tokens with start/end, more than the {max_len} this "
                "model reads; shorten it."
            )
    return ids


def time_ids(pipe: Pipeline, size: tuple[int, int] | None = None) -> torch.Tensor:
    """SDXL's time ids for an image of `size` pixels, as `StableDiffusionXLPipeline` makes them by
    default: ``(original_size, crops_coords_top_left=(0, 0), target_size)`` with both sizes the
    image's.

    Args:
        pipe (:data:`Pipeline`): the pipeline (its images' side,
            :func:`~nti_utils.images.model_resolution`, when `size` is None).
        size (`tuple[int, int]`, *optional*): (height, width) in pixels.

    Returns:
        `torch.Tensor`: (1, NUM_TIME_IDS) float32.
    """
    h, w = (model_resolution(pipe),) * 2 if size is None else size
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)


def _sdxl_embed(
    pipe: Pipeline, prompts: list[str], size: tuple[int, int] | None, null: bool
) -> torch.Tensor:
    """SDXL's conditioning (B, L + 1, D), as `StableDiffusionXLPipeline.encode_prompt` computes
    it, packed with the row token (:func:`~nti_utils.conditioning.pack`)."""
    pooled_dim = added_cond_layout(pipe.unet)
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
    if pooled_dim is None or any(m is None for m in encoders + tokenizers):
        raise ValueError(
            "an SDXL pipeline needs text_encoder, text_encoder_2, tokenizer, tokenizer_2 and a UNet "
            "with addition_embed_type='text_time'; this one lacks some of them"
        )
    lengths = {tok.model_max_length for tok in tokenizers}
    if len(lengths) != 1:
        raise ValueError(
            f"the two tokenizers pad to different lengths {sorted(lengths)}; the library needs one "
            "token count L for both text encoders"
        )
    hidden, pooled = [], None
    with torch.no_grad():
        for tok, encoder in zip(tokenizers, encoders):
            ids = torch.tensor(_token_ids(tok, prompts), device=encoder.device)
            out = encoder(ids, output_hidden_states=True)
            # as diffusers: the pooled embedding is the first 2-D output (text_encoder_2's
            # projection, CLIPTextModelWithProjection.text_embeds)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError(
            "neither text encoder gives a pooled (projected) embedding; SDXL's text_encoder_2 must "
            "be a CLIPTextModelWithProjection"
        )
    if pooled.shape[-1] != pooled_dim:
        raise ValueError(
            f"the UNet's config expects a {pooled_dim}-number pooled embedding (from "
            "projection_class_embeddings_input_dim - "
            f"{NUM_TIME_IDS} x addition_time_embed_dim), the text encoder gives {pooled.shape[-1]}"
        )
    tokens = torch.cat([h.to(pooled.device) for h in hidden], dim=-1)
    if null and pipe.config.get("force_zeros_for_empty_prompt", False):
        tokens, pooled = torch.zeros_like(tokens), torch.zeros_like(pooled)
    dtype = pipe.unet.dtype
    return pack(tokens.to(dtype), pooled.to(dtype), time_ids(pipe, size))


def embed_prompts(
    pipe: Pipeline, prompts: str | list[str], size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Text conditioning as the diffusers pipeline computes it: `C = text_encoder(P)`.

    * SD 1.x/2.x: the text encoder's last hidden states (with the attention mask where its config
      asks for one).
    * SDXL (:func:`is_sdxl`): as `StableDiffusionXLPipeline.encode_prompt` with the same prompt for
      both encoders: the penultimate hidden states of ``text_encoder`` and ``text_encoder_2``
      concatenated along D, and one more row, the row token ``[pooled, time ids, 0...]``
      (:mod:`nti_utils.conditioning`): the pooled embedding is ``text_encoder_2``'s projection, the
      time ids those of :func:`time_ids` for `size`. :func:`~nti_utils.ddim.predict_noise` hands
      them to the UNet as ``added_cond_kwargs``.

    Args:
        pipe (:data:`Pipeline`): its tokenizer(s) pad to ``tokenizer.model_max_length``.
        prompts (`str` or `list[str]`): B prompts. ``""`` encodes the empty prompt; for the null
            embedding ∅ of classifier-free guidance use :func:`null_embedding` (SDXL's is zeros).
        size (`tuple[int, int]`, *optional*): SDXL only: (height, width) in pixels of the image
            the time ids describe; defaults to the model's :func:`image_size`.

    Returns:
        `torch.Tensor` of shape (B, L', D) in the UNet's dtype (:func:`embedding_shape` gives
        (L', D)): L = ``tokenizer.model_max_length``; L' = L (SD) or L + 1 (SDXL); D the text
        encoder's width (SDXL: both widths summed).

    Raises:
        ValueError: when a prompt has more tokens than the model can read (nothing is cut
            silently), or an SDXL pipeline whose parts do not fit together.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if is_sdxl(pipe):
        return _sdxl_embed(pipe, prompts, size, null=False)
    tok = pipe.tokenizer
    ids = torch.tensor(_token_ids(tok, prompts), device=pipe.text_encoder.device)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        emb = pipe.text_encoder(ids, attention_mask=mask)[0]
    return emb.to(dtype=pipe.unet.dtype)


def null_embedding(pipe: Pipeline, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The null (unconditional) embedding ∅ of classifier-free guidance, as the diffusers pipeline
    makes it without a negative prompt: ``embed_prompts(pipe, "")`` for SD 1.x/2.x; for SDXL with
    ``force_zeros_for_empty_prompt`` (SDXL base) zeros for the tokens and the pooled embedding,
    with the time ids of `size` in the row token (else the empty prompt's embeddings).

    Null-text inversion optimizes the token rows of this ∅_t; SDXL's pooled embedding and time ids
    stay fixed (the row token is detached where it is read).

    Args:
        pipe (:data:`Pipeline`): the pipeline.
        size (`tuple[int, int]`, *optional*): as in :func:`embed_prompts`.

    Returns:
        `torch.Tensor`: (1, L', D) in the UNet's dtype.
    """
    if is_sdxl(pipe):
        return _sdxl_embed(pipe, [""], size, null=True)
    return embed_prompts(pipe, "")


def embedding_shape(pipe: Pipeline) -> tuple[int, int]:
    """(L', D) of the pipeline's conditioning tensors (:func:`embed_prompts`): L' the token count
    L = ``tokenizer.model_max_length`` plus SDXL's row token, D the text encoder's width (SDXL:
    ``text_encoder`` and ``text_encoder_2`` together)."""
    width = pipe.text_encoder.config.hidden_size
    if getattr(pipe, "text_encoder_2", None) is not None:
        width += pipe.text_encoder_2.config.hidden_size
    return pipe.tokenizer.model_max_length + extra_rows(pipe.unet), width


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Turn off `requires_grad` on a module's weights for the block (gradients then flow to the
    inputs only, which is all null-text optimization needs), restoring the flags afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)

"""Loading a Stable Diffusion pipeline: the embedded model (``"toy"``) or any SD 1.x/2.x checkpoint.

One entry point, :func:`load_pipeline`, returns a diffusers `StableDiffusionPipeline` whose scheduler is
a `DDIMScheduler` with the checkpoint's own trajectory settings, SD's where it has none
(:func:`sd_ddim_scheduler`), on a sensible device and dtype. Nothing is downloaded unless you ask for it (``allow_download=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from nti_utils.ddim import check_prediction_type

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
_WEIGHTED = ("unet", "vae", "text_encoder")


def _reload_hint(path: Path) -> str:
    return (
        "An interrupted download, copy or save leaves such a folder: save it again "
        "(pipe.save_pretrained(folder)) or download it again (`huggingface-cli download <hub id> "
        f"--local-dir {path}`)."
    )


def check_model_folder(path: str | os.PathLike) -> Path:
    """Check that `path` is a complete diffusers Stable Diffusion folder before loading it.

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
    for name, (files, what) in _COMPONENT_FILES.items():
        folder = path / name
        entry = listed.get(name)
        if not isinstance(entry, list) or not entry or entry[0] is None:
            raise ValueError(
                f"{index} lists no {name!r} component, which Stable Diffusion needs (unet, vae, "
                "text_encoder, tokenizer, scheduler)"
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


def load_pipeline(
    model: str | os.PathLike = "toy",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    allow_download: bool = False,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline ready for inversion and editing.

    Args:
        model (`str` or `os.PathLike`, defaults to ``"toy"``): ``"toy"`` for the embedded miniature SD
            under ``data/``, a local diffusers folder, or a hub id such as
            ``"CompVis/stable-diffusion-v1-4"`` (from the local Hugging Face cache).
        device (`torch.device` or `str`, *optional*): defaults to :func:`default_device`.
        dtype (`torch.dtype` or `str`, *optional*): ``torch.float16``/``"float16"``,
            ``"bfloat16"`` or ``"float32"``; defaults to :func:`default_dtype` of the device.
        allow_download (`bool`, defaults to `False`): let a hub id be downloaded when it is not in the
            local cache. Off by default: this project runs offline.

    Returns:
        `StableDiffusionPipeline` with SD's `DDIMScheduler`, no safety checker, progress bar off,
        ``pipe.config._name_or_path`` set to ``"toy"`` for the embedded model.

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
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            variant=_weights_variant(source) if local or str(model) == "toy" else None,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=not allow_download,
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
    return pipe.to(device)


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


def model_fingerprint(pipe: StableDiffusionPipeline, refresh: bool = False) -> str:
    """Short hash of every weight of the UNet, the text encoder and the VAE (all state-dict
    tensors, names and shapes, floating point ones rounded to float16 on the CPU, so fp16 and fp32
    loads of one checkpoint agree) and of the VAE's scaling factor: tells two models apart
    whatever their folder is called, a fine-tuned UNet or a swapped VAE included.

    Computed once per component module and cached (a few seconds for SD's 1B weights on a GPU).
    Changing weights in place afterwards (fine-tuning, ``load_state_dict``) is not noticed: call
    ``model_fingerprint(pipe, refresh=True)`` then. Replacing a component (``pipe.vae = other``)
    is noticed without it.
    """
    h = hashlib.sha256()
    for name in ("unet", "text_encoder", "vae"):
        h.update(f"{name}:{_module_hash(getattr(pipe, name), refresh)};".encode())
    h.update(f"scaling_factor:{pipe.vae.config.get('scaling_factor')}".encode())
    return h.hexdigest()[:16]


def model_id(pipe: StableDiffusionPipeline) -> str:
    """The name the pipeline was loaded under (``"toy"``, a hub id or a folder)."""
    return str(pipe.config.get("_name_or_path", "") or "unnamed")


def embed_prompts(pipe: StableDiffusionPipeline, prompts: str | list[str]) -> torch.Tensor:
    """Text embeddings as SD's pipeline computes them: `C = text_encoder(P)`.

    Args:
        pipe (`StableDiffusionPipeline`): its tokenizer pads to ``tokenizer.model_max_length``.
        prompts (`str` or `list[str]`): ``""`` gives the null embedding `∅`.

    Returns:
        `torch.Tensor` of shape (B, L, D), L = ``tokenizer.model_max_length``, in the pipeline's dtype.

    Raises:
        ValueError: when a prompt has more tokens than the model can read (nothing is cut silently).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tok = pipe.tokenizer
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
    ids = torch.tensor(ids, device=pipe.text_encoder.device)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        emb = pipe.text_encoder(ids, attention_mask=mask)[0]
    return emb.to(dtype=pipe.unet.dtype)


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

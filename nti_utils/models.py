"""Loading a Stable Diffusion pipeline: the embedded model (``"toy"``) or any SD 1.x/2.x checkpoint.

One entry point, :func:`load_pipeline`, returns a diffusers `StableDiffusionPipeline` whose scheduler is
a `DDIMScheduler` with Stable Diffusion's settings (:data:`SD_SCHEDULER_CONFIG`), on a sensible device
and dtype. Nothing is downloaded unless you ask for it (``allow_download=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

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
"""Stable Diffusion's DDIM settings, as used by the Null-text Inversion paper."""

TOY_MODEL_DIR = Path(
    os.environ.get("NTI_TOY_MODEL", Path(__file__).resolve().parent.parent / "data" / "toy-sd")
)
"""Folder of the embedded model (override with the ``NTI_TOY_MODEL`` environment variable)."""


def sd_ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    """A `DDIMScheduler` with SD's settings; `config` (e.g. a checkpoint's own scheduler config)
    contributes its other keys, ours win where both define one."""
    return DDIMScheduler.from_config({**(config or {}), **SD_SCHEDULER_CONFIG})


def default_device() -> torch.device:
    """CUDA if available, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA (as SD is usually run), float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_pipeline(
    model: str | os.PathLike = "toy",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    allow_download: bool = False,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline ready for inversion and editing.

    Args:
        model (`str` or `os.PathLike`, defaults to ``"toy"``): ``"toy"`` for the embedded miniature SD
            under ``data/``, a local diffusers folder, or a hub id such as
            ``"CompVis/stable-diffusion-v1-4"`` (from the local Hugging Face cache).
        device (`torch.device` or `str`, *optional*): defaults to :func:`default_device`.
        dtype (`torch.dtype`, *optional*): defaults to :func:`default_dtype` of the device.
        allow_download (`bool`, defaults to `False`): let a hub id be downloaded when it is not in the
            local cache. Off by default: this project runs offline.

    Returns:
        `StableDiffusionPipeline` with SD's `DDIMScheduler`, no safety checker, progress bar off,
        ``pipe.config._name_or_path`` set to ``"toy"`` for the embedded model.

    Raises:
        FileNotFoundError: when the weights are not on this machine, with what to do about it.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    if str(model) == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").exists():
            raise FileNotFoundError(
                f"The embedded model is missing: {TOY_MODEL_DIR}/model_index.json not found. It ships "
                "with the repository (data/toy-sd); restore it with `git checkout -- data/toy-sd`, "
                "point NTI_TOY_MODEL to a copy, or retrain it with "
                "`python -m nti_utils.shapes.train --out data/toy-sd`."
            )
        source: str | Path = TOY_MODEL_DIR
    else:
        source = model
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=not allow_download,
        )
    except (OSError, ValueError) as err:
        if Path(str(source)).exists():
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
    """Short hash of the scheduler settings that change DDIM's arithmetic."""
    keys = (*SD_SCHEDULER_CONFIG, "timestep_spacing", "trained_betas")
    cfg = {k: scheduler.config.get(k) for k in sorted(keys)}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(pipe: StableDiffusionPipeline) -> str:
    """Short hash of the UNet's and text encoder's parameter names and shapes and of their first
    weights (rounded to float16, so fp16 and fp32 loads of one checkpoint agree): tells two models
    apart whatever their folder is called."""
    h = hashlib.sha256()
    for module in (pipe.unet, pipe.text_encoder):
        for name, param in module.named_parameters():
            h.update(f"{name}:{tuple(param.shape)};".encode())
        first = next(module.parameters()).detach().to("cpu", torch.float16).contiguous()
        h.update(first.numpy().tobytes())
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

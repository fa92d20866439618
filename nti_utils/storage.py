"""Saving and loading an :class:`~nti_utils.result.InversionResult`: one safetensors file, its
settings and the model's identity as metadata; loading checks the file before it trusts it (keys,
ranks, step counts, the model it was made with) and never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nti_utils.models import Pipeline
from nti_utils.result import (
    InversionResult,
    InversionSettings,
    check_compatible,
    method_settings_class,
)

FORMAT_VERSION = "1"


def save_inversion(result: InversionResult, path: str | Path, overwrite: bool = False) -> Path:
    """Write `result` to a `.safetensors` file with its settings and model identity as metadata.

    Raises:
        FileExistsError: if `path` exists and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    n = max((len(x) for x in result.losses), default=0)
    losses = torch.full((len(result.losses), n), float("nan"))
    for i, row in enumerate(result.losses):
        losses[i, : len(row)] = torch.tensor(row)
    tensors = {
        "latent_T": result.latent_T.detach().cpu().contiguous(),
        "null_embeddings": result.null_embeddings.detach().cpu().contiguous(),
        "losses": losses,
        "inner_steps": torch.tensor(result.inner_steps, dtype=torch.int64),
    }
    for key in _OPTIONAL_TENSORS:
        if getattr(result, key) is not None:
            tensors[key] = getattr(result, key).detach().cpu().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "prompt": result.prompt,
        "prompt_source": result.prompt_source,
        "method": result.method,
        "settings": json.dumps(asdict(result.settings)),
        "timings": json.dumps(result.timings),
        "model_id": result.model_id,
        "model_fingerprint": result.model_fingerprint,
        "scheduler_hash": result.scheduler_hash,
        "num_steps": str(result.settings.num_steps),
        "guidance_scale": str(result.settings.guidance_scale),
    }
    if result.method_settings is not None:
        cls = method_settings_class(result.method)  # loading must be able to read them back
        if not isinstance(result.method_settings, cls):
            raise ValueError(
                f"method {result.method!r} keeps its settings as {cls.__name__}, got "
                f"{type(result.method_settings).__name__}"
            )
        meta["method_settings"] = json.dumps(asdict(result.method_settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    _sort_header(tmp)
    tmp.replace(path)
    return path


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header as sorted JSON (safetensors writes its metadata in a random
    order), so that saving the same result twice gives the same bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


_OPTIONAL_TENSORS = ("cond_offsets", "source_corrections", "noise_maps", "coupled_latent_T")
_RANKS = {
    "latent_T": 4,
    "null_embeddings": 4,
    "losses": 2,
    "inner_steps": 1,
    "cond_offsets": 4,
    "source_corrections": 5,
    "noise_maps": 5,
    "coupled_latent_T": 4,
}

METADATA_KEYS = {
    "required": (
        "format_version",
        "prompt",
        "method",
        "settings",
        "timings",
        "model_id",
        "model_fingerprint",
        "scheduler_hash",
    ),
    "optional": ("num_steps", "guidance_scale", "format", "method_settings", "prompt_source"),
}
"""The metadata keys :func:`save_inversion` writes (``num_steps`` and ``guidance_scale`` repeat the
settings for tools that read headers only; ``format`` is what other safetensors writers add;
``method_settings`` holds ``InversionResult.method_settings`` as JSON; ``prompt_source`` says
where the prompt came from, ``"user"`` when absent, as in files written before it existed)."""
TENSOR_KEYS = {
    "required": ("latent_T", "null_embeddings", "losses", "inner_steps"),
    "optional": _OPTIONAL_TENSORS,
}
"""The tensors of a saved inversion."""


def _check_saved(path: Path, meta: dict, tensors: dict) -> None:
    """Raise a `ValueError` naming missing or unknown metadata keys and tensors, or tensors of the
    wrong rank."""
    for what, have, keys in (("metadata", meta, METADATA_KEYS), ("tensors", tensors, TENSOR_KEYS)):
        missing = [k for k in keys["required"] if k not in have]
        unknown = sorted(set(have) - set(keys["required"]) - set(keys["optional"]))
        if missing or unknown:
            raise ValueError(
                f"{path} is not a complete nti_utils inversion: {what} "
                + "; ".join(
                    part
                    for part in (
                        f"missing {missing}" if missing else "",
                        f"unknown {unknown}" if unknown else "",
                    )
                    if part
                )
                + f" (expected {list(keys['required'])}, optionally {list(keys['optional'])})"
            )
    for name, t in tensors.items():
        if t.dim() != _RANKS[name]:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {_RANKS[name]} axes"
            )
    n = tensors["null_embeddings"].shape[0]
    counts = (len(tensors["inner_steps"]), len(tensors["losses"]))
    if any(k not in (0, n) for k in counts) or tensors["latent_T"].shape[0] != 1:
        raise ValueError(
            f"{path} is inconsistent: {n} null embeddings, {counts[0]} inner-step counts, "
            f"{counts[1]} loss rows, latent_T {tuple(tensors['latent_T'].shape)} (expected one "
            "image and one count and loss row per step, or none)"
        )
    latent = tuple(tensors["latent_T"].shape)
    for name in ("source_corrections", "noise_maps", "coupled_latent_T"):
        t = tensors.get(name)
        if t is not None and tuple(t.shape[-4:]) != latent:
            raise ValueError(
                f"{path} is inconsistent: {name} is {tuple(t.shape)}, its latents must be "
                f"{latent} like latent_T"
            )
    if "source_corrections" in tensors and len(tensors["source_corrections"]) != n:
        raise ValueError(
            f"{path} is inconsistent: {len(tensors['source_corrections'])} source corrections for "
            f"{n} steps"
        )
    for key in ("num_steps", "guidance_scale"):
        if key in meta:
            try:
                saved = json.loads(meta["settings"]).get(key)
            except (ValueError, AttributeError):
                continue  # reported with the settings
            if saved is not None and str(saved) != meta[key]:
                raise ValueError(
                    f"{path} is inconsistent: metadata {key}={meta[key]} but settings say {saved}"
                )


def load_inversion(
    path: str | Path,
    pipe: Pipeline | None = None,
    num_steps: int | None = None,
) -> InversionResult:
    """Read a result written by :func:`save_inversion`.

    Args:
        pipe (:data:`~nti_utils.models.Pipeline`, *optional*): if given, the result must match its model and
            scheduler (else `ValueError`), and tensors are moved to its device and dtype (EDICT's
            x_T and y_T to float32 at least).
        num_steps (`int`, *optional*): if given, the result must have this many DDIM steps.

    Only the safetensors format is read (never pickle: a pickle renamed ``.safetensors`` is refused
    without being run).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a readable safetensors file (truncated or corrupt), not an nti_utils
            inversion, metadata or tensors missing, unknown or inconsistent, or (with `pipe` or
            `num_steps`) a result that does not fit.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a saved inversion (.safetensors file)")
    if not path.is_file():
        raise FileNotFoundError(f"no saved inversion at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error type, or an OSError
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is "
            "truncated or corrupt (an interrupted copy?), or another format renamed; save the "
            "inversion again"
        ) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not an nti_utils inversion (format {meta.get('format_version')})"
        )
    _check_saved(path, meta, tensors)
    try:
        values = json.loads(meta["settings"])
        if not isinstance(values, dict):
            raise ValueError(f"settings must be a JSON object, got {type(values).__name__}")
        settings = InversionSettings.from_dict(values)
        timings = json.loads(meta["timings"])
        method_settings = None
        if "method_settings" in meta:
            values = json.loads(meta["method_settings"])
            if not isinstance(values, dict):
                raise ValueError("method_settings must be a JSON object")
            method_settings = method_settings_class(meta["method"])(**values)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{path} has unreadable settings or timings in its metadata: {err}"
        ) from None
    if settings.num_steps != tensors["null_embeddings"].shape[0]:
        raise ValueError(
            f"{path} is inconsistent: its settings say {settings.num_steps} steps but it holds "
            f"{tensors['null_embeddings'].shape[0]} null embeddings"
        )
    losses = [[v for v in row.tolist() if v == v] for row in tensors["losses"]]
    result = InversionResult(
        latent_T=tensors["latent_T"],
        null_embeddings=tensors["null_embeddings"],
        prompt=meta["prompt"],
        prompt_source=meta.get("prompt_source", "user"),
        method=meta["method"],
        settings=settings,
        losses=losses,
        inner_steps=tensors["inner_steps"].tolist(),
        timings=timings,
        model_id=meta["model_id"],
        model_fingerprint=meta["model_fingerprint"],
        scheduler_hash=meta["scheduler_hash"],
        cond_offsets=tensors.get("cond_offsets"),
        method_settings=method_settings,
        source_corrections=tensors.get("source_corrections"),
        noise_maps=tensors.get("noise_maps"),
        coupled_latent_T=tensors.get("coupled_latent_T"),
    )
    skip = getattr(method_settings, "skip", 0)
    if result.noise_maps is not None and len(result.noise_maps) != settings.num_steps - skip:
        raise ValueError(
            f"{path} is inconsistent: {len(result.noise_maps)} noise maps for "
            f"{settings.num_steps} steps with {skip} skipped"
        )
    if num_steps is not None and num_steps != settings.num_steps:
        raise ValueError(
            f"{path} was inverted with {settings.num_steps} DDIM steps, not {num_steps}; invert "
            "again with the step count you want to sample with"
        )
    if pipe is not None:
        check_compatible(result, pipe)
        dev, dt = pipe.unet.device, pipe.unet.dtype
        # EDICT's x_T and y_T stay float32 or wider (rounded to a half-precision UNet's dtype they
        # would no longer sample back to the image, see nti_utils.edict)
        latent_dt = (
            torch.promote_types(dt, torch.float32) if result.coupled_latent_T is not None else dt
        )
        for key in ("latent_T", "null_embeddings", *_OPTIONAL_TENSORS):
            if getattr(result, key) is not None:
                wide = key in ("latent_T", "coupled_latent_T")
                setattr(result, key, getattr(result, key).to(dev, latent_dt if wide else dt))
    return result

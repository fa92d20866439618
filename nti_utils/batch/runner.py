"""The runner of :mod:`nti_utils.batch`: settings, one item's work, the data-parallel loop over
items with ``accelerate``, the summary, and the command line.

Testing hook: with the environment variable ``NTI_BATCH_STOP_AFTER=N``, a process kills itself
(``SIGKILL``, as a crash or an out-of-memory kill would) once it has put N items into place and the
next one is written into ``tmp/`` but not yet renamed; the tests use it to interrupt a run at a
known point and check that the rerun finishes it as if nothing had happened.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import diffusers
import torch
import transformers
from tqdm.auto import tqdm

from nti_utils.batch.manifest import Item, load_items, read_manifest
from nti_utils.editing import edit
from nti_utils.images import load_image, model_resolution
from nti_utils.inversion import null_text_inversion
from nti_utils.metrics import psnr, ssim
from nti_utils.models import load_pipeline, model_fingerprint, scheduler_hash
from nti_utils.result import InversionSettings
from nti_utils.storage import save_inversion

STOP_AFTER_ENV = "NTI_BATCH_STOP_AFTER"
"""The testing hook's environment variable (see the module docstring)."""
MARKER = ".nti-batch"
"""The file that marks a folder as the runner's output (written when the runner creates the folder
or takes over an empty one). The runner writes and deletes only its own files, and only in a
folder with this marker."""
_MARKER_TEXT = (
    "This folder is the output of `python -m nti_utils.batch`; the runner owns items/, tmp/, "
    "errors.jsonl and summary.csv here.\n"
)
_TMP_ENTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.rank\d+")
"""Names of the runner's temporary item folders in ``tmp/``."""


@dataclass(frozen=True)
class BatchSettings:
    """Settings shared by every item of a run.

    Attributes:
        model (`str`, defaults to ``"toy"``): ``"toy"`` or a local diffusers folder (``--model``).
        inversion (`InversionSettings`): the null-text inversion's settings; ``--steps``,
            ``--guidance`` and ``--inner-steps`` set its `num_steps`, `guidance_scale` (also the
            edits' w) and `inner_steps`.
        seed (`int`, defaults to 0): combined with each item's id into the item's seed (``--seed``).
        captioner (`str`, defaults to ``"toy"``): writes the source prompt of entries without one
            (``--captioner``: ``"toy"``, a local transformers folder or a cached hub id, see
            :func:`nti_utils.caption.load_captioner`).
    """

    model: str = "toy"
    inversion: InversionSettings = field(default_factory=InversionSettings)
    seed: int = 0
    captioner: str = "toy"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(
                f"BatchSettings.model must be 'toy' or a folder path (a string), got {self.model!r}"
            )
        if not isinstance(self.inversion, InversionSettings):
            raise ValueError(
                "BatchSettings.inversion must be an InversionSettings (which checks its values), "
                f"got {type(self.inversion).__name__}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"BatchSettings.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.captioner, str) or not self.captioner.strip():
            raise ValueError(
                "BatchSettings.captioner must be 'toy', a folder or a hub id (a string), got "
                f"{self.captioner!r}"
            )


def check_out(out: str | Path) -> Path:
    """Check that `out` can be the runner's output folder, touching nothing: a new folder (not
    under a file), an empty one, or one the runner made (with the :data:`MARKER` file).

    Raises:
        NotADirectoryError: `out`, or a folder above it, is a file.
        FileExistsError: `out` holds files and was not made by the runner.
        PermissionError: it cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder (new, empty or a run's)")
    existing = next(p for p in [out, *out.parents] if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {existing} is not writable")
    if existing == out and not (out / MARKER).is_file() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        raise FileExistsError(
            f"--out {out} is not empty ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) "
            f"and was not made by nti_utils.batch (no {MARKER} file). The runner writes items/, "
            "tmp/, errors.jsonl and summary.csv there and would replace files of those names: "
            "choose a new or empty folder. If it is the output of a run made before marker files "
            f"existed, create {out / MARKER} to let the runner continue it."
        )
    return out


def claim_out(out: Path) -> None:
    """Create `out` (checked by :func:`check_out`) and mark it as the runner's."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        marker.write_text(_MARKER_TEXT)


def config_hash(item: Item, settings: BatchSettings, model_key: str) -> str:
    """What an item's outputs depend on: the item, the settings and the model (`model_key`: its
    fingerprint and scheduler hash, so the folder it was loaded from does not matter)."""
    blob = {"item": item.spec(), "settings": asdict(settings) | {"model": model_key}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def process_item(pipe, item: Item, settings: BatchSettings, folder: Path, chash: str = "") -> dict:
    """Invert and edit one item, writing its files into `folder`; returns its metrics."""
    t0 = time.perf_counter()
    seed = int(hashlib.sha256(f"{settings.seed}:{item.id}".encode()).hexdigest()[:15], 16)
    torch.manual_seed(seed)
    image = load_image(item.path, model_resolution(pipe))
    result = null_text_inversion(pipe, image, item.source, settings.inversion, progress=False)
    t1 = time.perf_counter()
    ctrl = item.controller(pipe.tokenizer, settings.inversion.num_steps)
    out = edit(pipe, result, item.prompts, ctrl, progress=False)
    t2 = time.perf_counter()
    folder.mkdir(parents=True)
    save_inversion(dataclasses.replace(result, timings={}), folder / "inversion.safetensors")
    out.images[0].save(folder / "source.png")
    for k, im in enumerate(out.images[1:]):
        im.save(folder / f"edit_{k}.png")
    metrics = {
        "id": item.id,
        "config_hash": chash,
        "source": item.source,
        "source_from": item.source_from,
        "psnr": psnr(image, out.images[0]),
        "ssim": ssim(image, out.images[0]),
        "inner_steps": sum(result.inner_steps),
        "inner_steps_per_step": result.inner_steps,
        "final_latent_mse": result.step_errors[-1],
        "seconds": {"inversion": t1 - t0, "edit": t2 - t1, "total": time.perf_counter() - t0},
        "item": item.spec(),
        "settings": asdict(settings),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for f in folder.iterdir():  # on disk before the rename makes the item visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return metrics


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop_after() -> int | None:
    """The testing hook's N, or `None` when it is not set."""
    value = os.environ.get(STOP_AFTER_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{STOP_AFTER_ENV} must be a whole number >= 0, got {value!r}")
    return int(value)


def _crash() -> None:
    """Die at once, leaving files as they are (the testing hook)."""
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


def run(
    manifest: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    settings: BatchSettings = BatchSettings(),
    threads: int | None = None,
    cpu: bool = False,
    progress: bool = True,
    allow_outside_images: bool = False,
) -> dict | None:
    """Invert and edit every item of `manifest` into `out` (see :mod:`nti_utils.batch`).

    Everything that concerns the whole run is checked before the model is loaded: the output
    folder (:func:`check_out`), the manifest file, the images folder, the settings; then the step
    count against the model's scheduler. Bad entries go to ``errors.jsonl``.

    Args:
        manifest (`str` or `Path`): JSONL or CSV.
        out (`str` or `Path`): output folder (created and marked with :data:`MARKER`, or an empty
            one taken over; reused by reruns; a non-empty folder the runner did not make is
            refused).
        images (`str` or `Path`, *optional*): folder the `image` paths are relative to; defaults
            to the manifest's folder. Paths leading outside it are bad entries unless
            `allow_outside_images`.
        settings (`BatchSettings`): model, inversion settings, seed.
        threads (`int`, *optional*): torch threads per process on the CPU; defaults to
            ``cores // processes``.
        cpu (`bool`, defaults to `False`): run on the CPU even where a GPU is available.
        progress (`bool`, defaults to `True`): show a bar (main process only).
        allow_outside_images (`bool`, defaults to `False`): accept `image` paths outside `images`.

    Returns:
        On the main process, the summary (counts, means); `None` on the others.

    Raises:
        ValueError: bad settings, a manifest that cannot be read as a whole (encoding, CSV header)
            or has no entries, a step count above the scheduler's training timesteps.
        FileNotFoundError, NotADirectoryError, FileExistsError: see :func:`check_out`; no manifest
            or images folder.
    """
    from accelerate import PartialState

    if not isinstance(settings, BatchSettings):
        raise ValueError(f"settings must be a BatchSettings, got {type(settings).__name__}")
    out, manifest = check_out(out), Path(manifest)
    images = Path(images) if images is not None else manifest.parent
    if not images.is_dir():
        raise NotADirectoryError(f"--images {images} is not a folder")
    rows = read_manifest(manifest)
    if not rows:
        raise ValueError(f"manifest {manifest} has no entries")
    stop_after = _stop_after()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accel = getattr(torch, "accelerator", None)
    has_accelerator = accel.is_available() if accel is not None else torch.cuda.is_available()
    # without --cpu, accelerate gives each of several CPU-only processes a world of its own
    state = PartialState(cpu=cpu or not has_accelerator, timeout=timedelta(hours=24))
    rank, world = state.process_index, state.num_processes
    if world != launched:
        raise RuntimeError(
            f"launched as {launched} processes, but accelerate made a group of {world}"
        )
    if state.device.type == "cpu":  # share the cores among this machine's processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(threads or max(1, (cores or 1) // local))
    pipe = load_pipeline(settings.model, device=state.device)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    if settings.inversion.num_steps > n_train:
        raise ValueError(
            f"--steps {settings.inversion.num_steps} is more than the model's {n_train} training "
            f"timesteps; use at most {n_train} (the paper uses 50)"
        )
    items_dir, tmp_root = out / "items", out / "tmp"
    state.wait_for_everyone()  # every process has checked `out` before anyone writes to it
    if state.is_main_process:  # stale temp dirs of killed runs, and error fragments: ours only
        claim_out(out)
        for d in tmp_root.iterdir() if tmp_root.is_dir() else []:
            if d.is_dir() and _TMP_ENTRY.fullmatch(d.name):
                shutil.rmtree(d, ignore_errors=True)
        for f in out.glob("errors.rank*.jsonl"):
            f.unlink()
        items_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    good, errors, n_entries = load_items(
        manifest, images, pipe, settings, rows=rows, allow_outside_images=allow_outside_images
    )
    model_key = f"{model_fingerprint(pipe)}/{scheduler_hash(pipe.scheduler)}"
    done_before, pending = [], []
    for item in sorted(good, key=lambda i: i.id):
        folder = items_dir / item.id
        if not folder.exists():
            pending.append(item)
            continue
        try:
            old = json.loads((folder / "metrics.json").read_text()).get("config_hash")
        except (OSError, ValueError):
            old = None
        if old == config_hash(item, settings, model_key):
            done_before.append(item)
        else:
            reason = (
                f"{folder} was made from other inputs or settings; delete it to redo the item, "
                "or write to another --out"
            )
            errors.append({"id": item.id, "line": item.line, "stage": "resume", "reason": reason})

    mine = pending[rank::world]
    frag = out / f"errors.rank{rank}.jsonl"
    frag.write_text("")
    show = progress and state.is_main_process
    bar = tqdm(total=len(pending), desc="items", unit="item", disable=not show)
    placed = 0
    for item in mine:
        tmp = tmp_root / f"{item.id}.rank{rank}"
        try:
            process_item(pipe, item, settings, tmp, config_hash(item, settings, model_key))
            if stop_after is not None and placed >= stop_after:
                _crash()
            os.replace(tmp, items_dir / item.id)
            placed += 1
        except Exception as err:  # a bad item is reported, the run goes on
            shutil.rmtree(tmp, ignore_errors=True)
            reason = f"{type(err).__name__}: {err}"
            rec = {"id": item.id, "line": item.line, "stage": "process", "reason": reason}
            with open(frag, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            tqdm.write(f"[process {rank}] item {item.id!r} failed: {reason}")
        if not bar.disable:  # everyone's progress, read from the shared output folder
            failed = sum(len(f.read_text().splitlines()) for f in out.glob("errors.rank*.jsonl"))
            bar.n = min(len(pending), failed + sum((items_dir / i.id).exists() for i in pending))
            bar.refresh()
    state.wait_for_everyone()
    bar.n = len(pending)
    bar.close()
    if not state.is_main_process:
        return None
    return finish(out, n_entries, done_before, pending, errors, world)


SUMMARY_LABELS = {
    "processes": "processes",
    "entries": "manifest entries",
    "done_now": "done in this run",
    "skipped": "skipped (done before)",
    "failed": "failed (errors.jsonl)",
    "mean_psnr": "mean PSNR (dB)",
    "mean_ssim": "mean SSIM",
    "mean_seconds": "mean seconds per item",
}
"""Summary key -> its label in the printed table."""


def finish(
    out: Path,
    n_entries: int,
    done_before: list[Item],
    pending: list[Item],
    errors: list[dict],
    world: int,
) -> dict:
    """Main process, after everyone is done: merge errors, write summary.csv, print the table."""
    for f in sorted(out.glob("errors.rank*.jsonl")):
        errors += [json.loads(x) for x in f.read_text().splitlines() if x]
        f.unlink()
    errors.sort(key=lambda e: (e["id"], e["line"]))
    _write_atomic(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    done_now = [i for i in pending if (out / "items" / i.id).exists()]
    rows = []
    for item in done_before + done_now:
        m = json.loads((out / "items" / item.id / "metrics.json").read_text())
        rows.append(
            {
                "id": item.id,
                "psnr": m["psnr"],
                "ssim": m["ssim"],
                "inner_steps": m["inner_steps"],
                "seconds": m["seconds"]["total"],
            }
        )
    rows.sort(key=lambda r: r["id"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["id", "psnr", "ssim", "inner_steps", "seconds"])
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "summary.csv", buf.getvalue())

    def mean(key):
        return sum(r[key] for r in rows) / len(rows) if rows else float("nan")

    summary = {
        "processes": world,
        "entries": n_entries,
        "done": len(rows),
        "done_now": len(done_now),
        "skipped": len(done_before),
        "failed": len(errors),
        "mean_psnr": mean("psnr"),
        "mean_ssim": mean("ssim"),
        "mean_seconds": mean("seconds"),
    }
    lines = [f"  {label:<24}{summary[k]:>10.4g}" for k, label in SUMMARY_LABELS.items()]
    print(f"batch summary ({out})\n" + "\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    """The command line: ``python -m nti_utils.batch --manifest m.jsonl --out runs/a ...``."""
    p = argparse.ArgumentParser(
        prog="python -m nti_utils.batch",
        description="Invert and edit many images, on one or many processes/GPUs, resumable.",
    )
    p.add_argument("--manifest", type=Path, required=True, help="JSONL or CSV of items")
    p.add_argument("--out", type=Path, required=True, help="output folder (reruns resume it)")
    p.add_argument("--images", type=Path, default=None, help="image folder (default: manifest's)")
    d = BatchSettings()
    p.add_argument("--model", default=d.model, help='"toy" or a local diffusers folder')
    p.add_argument("--steps", type=int, default=d.inversion.num_steps, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=d.inversion.guidance_scale)
    p.add_argument(
        "--inner-steps", type=int, default=d.inversion.inner_steps, help="Adam steps per timestep"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--captioner",
        default=d.captioner,
        help='writes the source prompt of entries without one: "toy", a folder or a cached hub id',
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per CPU process")
    p.add_argument("--cpu", action="store_true", help="use the CPU even if a GPU is available")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="accept manifest `image` paths outside --images (../x.png, absolute paths)",
    )
    a = p.parse_args(argv)
    if not a.manifest.is_file():
        p.error(f"no manifest at {a.manifest}")
    if a.images is not None and not a.images.is_dir():
        p.error(f"--images {a.images} is not a folder")
    if a.steps < 1 or a.inner_steps < 0:
        p.error("--steps must be >= 1 and --inner-steps >= 0")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    try:
        check_out(a.out)
    except (NotADirectoryError, FileExistsError, PermissionError) as err:
        p.error(str(err))
    try:
        inversion = dataclasses.replace(
            d.inversion, num_steps=a.steps, guidance_scale=a.guidance, inner_steps=a.inner_steps
        )
    except ValueError as err:
        p.error(str(err))
    diffusers.utils.logging.disable_progress_bar()  # loading bars, one per process
    transformers.utils.logging.disable_progress_bar()
    try:
        settings = BatchSettings(
            model=str(a.model), inversion=inversion, seed=a.seed, captioner=a.captioner
        )
    except ValueError as err:
        p.error(str(err))
    try:
        run(
            a.manifest,
            a.out,
            a.images,
            settings,
            a.threads,
            a.cpu,
            not a.no_progress,
            allow_outside_images=a.allow_outside_images,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        # the run's up-front checks (settings, manifest, model, steps): nothing was done
        p.error(str(err))

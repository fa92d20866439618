"""Invert and edit many images, on one or many processes/GPUs, resumable: ``python -m nti_utils.batch``.

Input: a folder of images and a manifest, JSONL (one object per line, wrapped here) or CSV (same fields as
columns, ``targets`` separated by ``|``, `blend_words`/`reweight`/window values as JSON)::

    {"id": "c1", "image": "c1.png", "source": "a red circle on a white background",
     "targets": ["a red square on a white background"], "edit": "replace",
     "cross_replace_steps": 0.8, "self_replace_steps": 0.4,
     "blend_words": [["circle"], ["square"]], "reweight": {"square": 2.0}}

Only `image`, `source` and `targets` are required; `id` defaults to the image's stem, `edit` to
``"replace"`` (word swap; ``"refine"`` for prompts of different lengths). `blend_words` (one list
per prompt, source first) adds a :class:`~nti_utils.p2p.LocalBlend`, `reweight` a
:class:`~nti_utils.p2p.Reweight` on top of the edit.

Output, per item, in ``<out>/items/<id>/``: ``inversion.safetensors``
(:func:`~nti_utils.inversion.save_inversion`), ``source.png`` (the reconstruction), ``edit_<k>.png``
per target, ``metrics.json`` (PSNR/SSIM of the reconstruction against the input at the model's
resolution, inner steps, seconds). Plus ``errors.jsonl`` (id, line, stage, reason of every bad item)
and ``summary.csv`` (one row per done item).

Resumable and loss-free: an item is written into ``<out>/tmp/`` and renamed to ``items/<id>`` as its
last step, so it is complete or absent; a rerun skips items whose folder exists (and reports one made
from other inputs or settings rather than mixing them). An item's computation depends only on the
item and the settings (seeded from a hash of its id), so a run killed mid-way and restarted writes
byte for byte what an uninterrupted run writes, whichever process handles an item. For that, timings
stay out of the saved inversion (they are in ``metrics.json``; ``save_inversion`` writes its
safetensors header with sorted keys). This holds for one device type and torch thread count (CPU
results can differ in the last bits between thread counts). One run per output folder at a time.

Scale-out with Hugging Face ``accelerate``, data parallel over items: process r takes
``pending[r::world_size]`` of the pending ids in sorted order, and the main process merges errors
and writes the summary when all are done::

    python -m nti_utils.batch --manifest m.jsonl --out runs/a     # one process
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m nti_utils.batch --manifest m.jsonl --out runs/a

``--multi_gpu`` is what makes ``accelerate launch`` start N processes (via torchrun): one per GPU,
or, on a machine without GPUs, N CPU processes talking over gloo (``torchrun --nproc_per_node N -m
nti_utils.batch`` does the same). ``accelerate launch --cpu --num_processes N`` starts only *one*
process outside mpirun. On the CPU each process uses ``cores // processes`` torch threads (1 for 2
processes on 2 cores, which avoids oversubscription) unless ``--threads`` says otherwise.
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
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import diffusers
import torch
import transformers
from tqdm.auto import tqdm

from nti_utils.align import prompt_tokens
from nti_utils.images import load_image, model_resolution
from nti_utils.inversion import InversionSettings, null_text_inversion, save_inversion
from nti_utils.metrics import psnr, ssim
from nti_utils.models import load_pipeline, model_fingerprint, scheduler_hash
from nti_utils.p2p import AttentionEdit, LocalBlend, Refine, Replace, Reweight, edit, equalizer

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class BatchSettings:
    """Settings shared by every item of a run (CLI flags of the same names).

    Attributes:
        model (`str`, defaults to ``"toy"``): ``"toy"`` or a local diffusers folder.
        num_steps (`int`, defaults to 50): DDIM steps.
        guidance_scale (`float`, defaults to 7.5): w of inversion and editing.
        inner_steps (`int`, defaults to 10): at most this many Adam steps per timestep.
        seed (`int`, defaults to 0): combined with each item's id into the item's seed.
    """

    model: str = "toy"
    num_steps: int = 50
    guidance_scale: float = 7.5
    inner_steps: int = 10
    seed: int = 0

    def inversion(self) -> InversionSettings:
        return InversionSettings(
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            inner_steps=self.inner_steps,
        )


@dataclass(frozen=True)
class Item:
    """One manifest entry, checked: an image, its source prompt, target prompts and edit options.

    Attributes:
        id (`str`): names the output folder ``items/<id>``; defaults to the image's stem.
        line (`int`): where it is in the manifest (1-based; error reports cite it).
        image (`str`): the path as the manifest gives it; `path` is where it was found.
        source (`str`), targets (`tuple[str, ...]`): the source prompt and the edited prompts.
        edit (`str`): ``"replace"`` (:class:`~nti_utils.p2p.Replace`) or ``"refine"``.
        cross_replace_steps, self_replace_steps: as :class:`~nti_utils.p2p.AttentionEdit` takes
            them (JSON lists become ``(start, end)`` windows).
        blend_words (`tuple`, *optional*): words per prompt for a :class:`~nti_utils.p2p.LocalBlend`.
        reweight (`dict[str, float]`, *optional*): word -> factor for :class:`~nti_utils.p2p.Reweight`.
    """

    id: str
    line: int
    image: str
    path: Path
    source: str
    targets: tuple[str, ...]
    edit: str = "replace"
    cross_replace_steps: object = 0.8
    self_replace_steps: object = 0.4
    blend_words: tuple | None = None
    reweight: dict | None = None

    def spec(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("line", "path")}

    def controller(self, tokenizer, num_steps: int) -> AttentionEdit:
        """The Prompt-to-Prompt controller (raises `ValueError` for prompts that do not fit it)."""
        prompts = [self.source, *self.targets]
        kw: dict = dict(cross_replace_steps=self.cross_replace_steps,
                        self_replace_steps=self.self_replace_steps)  # fmt: skip
        if self.blend_words:
            kw["local_blend"] = LocalBlend(self.blend_words, tokenizer, prompts)
        ctrl = (Replace if self.edit == "replace" else Refine)(tokenizer, prompts, num_steps, **kw)
        if self.reweight:
            eq = equalizer(tokenizer, prompts, self.reweight)
            ctrl = Reweight(tokenizer, prompts, num_steps, eq, base=ctrl)
        return ctrl


def _tuples(v):
    """JSON lists -> tuples (step windows), recursively through dicts."""
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _cell(v):
    """A CSV cell: JSON if it looks like it, a number if it is one, else the text."""
    v = v.strip()
    if v[:1] in "[{":
        return json.loads(v)
    try:
        return float(v)
    except ValueError:
        return v


def read_manifest(path: str | Path) -> list[tuple[int, dict | str]]:
    """(line number, record) per entry of a JSONL or CSV manifest; unparsable lines give the
    reason as a string instead of a record."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".ndjson"):
        raise ValueError(f"manifest {path} must be .jsonl or .csv, got {path.suffix!r}")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict | str]] = []
    if path.suffix.lower() == ".csv":
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            rec = {k.strip(): v for k, v in row.items() if k and v is not None and v.strip()}
            try:
                rec = {k: v if k in ("id", "image", "source", "edit") else _cell(v)
                       for k, v in rec.items()}  # fmt: skip
            except json.JSONDecodeError as err:
                rows.append((n, f"bad JSON in a cell: {err}"))
                continue
            if isinstance(rec.get("targets"), str):
                rec["targets"] = [t.strip() for t in rec["targets"].split("|")]
            rows.append((n, rec))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    rec = json.loads(line)
                    rows.append((n, rec if isinstance(rec, dict) else "not a JSON object"))
                except json.JSONDecodeError as err:
                    rows.append((n, f"not valid JSON: {err}"))
    return rows


def parse_item(rec: dict, line: int, images: Path) -> Item:
    """Build an :class:`Item` from a manifest record; `ValueError` says what is wrong with it."""
    if not isinstance(rec.get("image"), str) or not rec["image"].strip():
        raise ValueError("no `image` field (a path relative to the images folder)")
    path = images / rec["image"]
    item_id = str(rec.get("id", Path(rec["image"]).stem))
    if not _ID.fullmatch(item_id):
        raise ValueError(f"id {item_id!r} must be 1-128 letters, digits, '.', '_' or '-'")
    source = rec.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("the source prompt is empty")
    targets = rec.get("targets")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError("`targets` must be a non-empty list of non-empty prompts")
    if rec.get("edit", "replace") not in ("replace", "refine"):
        raise ValueError(f"`edit` must be 'replace' or 'refine', got {rec.get('edit')!r}")
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    return Item(item_id, line, rec["image"], path, source.strip(), tuple(t.strip() for t in targets),
                rec.get("edit", "replace"), _tuples(rec.get("cross_replace_steps", 0.8)),
                _tuples(rec.get("self_replace_steps", 0.4)), _tuples(rec.get("blend_words")),
                rec.get("reweight"))  # fmt: skip


def load_items(manifest: Path, images: Path, pipe, settings: BatchSettings):
    """Read and check every manifest entry before any work: fields, image file present, ids unique,
    and against the model's tokenizer (prompt length, token alignment of replace edits, blend and
    reweight words). Returns (good items, error records, number of entries)."""
    good, errors, seen = [], [], {}
    tok = pipe.tokenizer
    rows = read_manifest(manifest)
    for line, rec in rows:
        item_id = f"line{line}"
        if isinstance(rec, dict):
            item_id = str(rec.get("id") or Path(str(rec.get("image") or "")).stem or item_id)
        try:
            if isinstance(rec, str):
                raise ValueError(rec)
            item = parse_item(rec, line, images)
            if item.id in seen:
                raise ValueError(
                    f"duplicate id (first on line {seen[item.id]}); give lines distinct ids"
                )
            seen[item.id] = line
            for prompt in (item.source, *item.targets):
                if len(prompt_tokens(tok, prompt)) > tok.model_max_length:
                    raise ValueError(
                        f"prompt {prompt!r} is longer than the model's {tok.model_max_length} tokens"
                    )
            item.controller(tok, settings.num_steps)
            good.append(item)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            errors.append({"id": item_id, "line": line, "stage": "validate", "reason": str(err)})
    return good, errors, len(rows)


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
    result = null_text_inversion(pipe, image, item.source, settings.inversion(), progress=False)
    t1 = time.perf_counter()
    out = edit(pipe, result, [item.source, *item.targets],
               item.controller(pipe.tokenizer, settings.num_steps), progress=False)  # fmt: skip
    t2 = time.perf_counter()
    folder.mkdir(parents=True)
    save_inversion(dataclasses.replace(result, timings={}), folder / "inversion.safetensors")
    out.images[0].save(folder / "source.png")
    for k, im in enumerate(out.images[1:]):
        im.save(folder / f"edit_{k}.png")
    metrics = {
        "id": item.id,
        "config_hash": chash,
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


def run(manifest, out, images=None, settings=BatchSettings(), threads=None, cpu=False,
        progress=True) -> dict | None:  # fmt: skip
    """Invert and edit every item of `manifest` into `out` (see the module docstring).

    Args:
        manifest (`str` or `Path`): JSONL or CSV.
        out (`str` or `Path`): output folder (created; reused by reruns).
        images (`str` or `Path`, *optional*): folder the `image` paths are relative to; defaults
            to the manifest's folder.
        settings (`BatchSettings`): model, steps, guidance, inner steps, seed.
        threads (`int`, *optional*): torch threads per process on the CPU; defaults to
            ``cores // processes``.
        cpu (`bool`, defaults to `False`): run on the CPU even where a GPU is available.
        progress (`bool`, defaults to `True`): show a bar (main process only).

    Returns:
        On the main process, the summary (counts, means); `None` on the others.
    """
    from accelerate import PartialState

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
    out, manifest = Path(out), Path(manifest)
    images = Path(images) if images is not None else manifest.parent
    items_dir, tmp_root = out / "items", out / "tmp"
    if state.is_main_process:  # stale temp dirs of killed runs, and error fragments
        shutil.rmtree(tmp_root, ignore_errors=True)
        for f in out.glob("errors.rank*.jsonl"):
            f.unlink()
        items_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    good, errors, n_entries = load_items(manifest, images, pipe, settings)
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
            errors.append({"id": item.id, "line": item.line, "stage": "resume",
                           "reason": f"{folder} was made from other inputs or settings; delete "
                           "it to redo the item, or write to another --out"})  # fmt: skip

    mine = pending[rank::world]
    frag = out / f"errors.rank{rank}.jsonl"
    frag.write_text("")
    bar = tqdm(total=len(pending), desc="items", unit="item",
               disable=not (progress and state.is_main_process))  # fmt: skip
    for item in mine:
        tmp = tmp_root / f"{item.id}.rank{rank}"
        try:
            process_item(pipe, item, settings, tmp, config_hash(item, settings, model_key))
            os.replace(tmp, items_dir / item.id)
        except Exception as err:  # a bad item is reported, the run goes on
            shutil.rmtree(tmp, ignore_errors=True)
            rec = {"id": item.id, "line": item.line, "stage": "process",
                   "reason": f"{type(err).__name__}: {err}"}  # fmt: skip
            with open(frag, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            tqdm.write(f"[process {rank}] item {item.id!r} failed: {rec['reason']}")
        if not bar.disable:  # everyone's progress, read from the shared output folder
            failed = sum(len(f.read_text().splitlines()) for f in out.glob("errors.rank*.jsonl"))
            bar.n = min(len(pending), failed + sum((items_dir / i.id).exists() for i in pending))
            bar.refresh()
    state.wait_for_everyone()
    bar.n = len(pending)
    bar.close()
    if not state.is_main_process:
        return None
    return _finish(out, n_entries, done_before, pending, errors, world)


def _finish(out: Path, n_entries: int, done_before, pending, errors, world: int) -> dict:
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
        rows.append({"id": item.id, "psnr": m["psnr"], "ssim": m["ssim"],
                     "inner_steps": m["inner_steps"], "seconds": m["seconds"]["total"]})  # fmt: skip
    rows.sort(key=lambda r: r["id"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["id", "psnr", "ssim", "inner_steps", "seconds"])
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "summary.csv", buf.getvalue())

    def mean(key):
        return sum(r[key] for r in rows) / len(rows) if rows else float("nan")

    summary = {"processes": world, "entries": n_entries, "done": len(rows),
               "done_now": len(done_now), "skipped": len(done_before), "failed": len(errors),
               "mean_psnr": mean("psnr"), "mean_ssim": mean("ssim"),
               "mean_seconds": mean("seconds")}  # fmt: skip
    labels = {"processes": "processes", "entries": "manifest entries",
              "done_now": "done in this run", "skipped": "skipped (done before)",
              "failed": "failed (errors.jsonl)", "mean_psnr": "mean PSNR (dB)",
              "mean_ssim": "mean SSIM", "mean_seconds": "mean seconds per item"}  # fmt: skip
    lines = [f"  {label:<24}{summary[k]:>10.4g}" for k, label in labels.items()]
    print(f"batch summary ({out})\n" + "\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="JSONL or CSV of items")
    p.add_argument("--out", type=Path, required=True, help="output folder (reruns resume it)")
    p.add_argument("--images", type=Path, default=None, help="image folder (default: manifest's)")
    d = BatchSettings()
    p.add_argument("--model", default=d.model, help='"toy" or a local diffusers folder')
    p.add_argument("--steps", type=int, default=d.num_steps, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=d.guidance_scale)
    p.add_argument("--inner-steps", type=int, default=d.inner_steps, help="Adam steps per timestep")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads per CPU process")
    p.add_argument("--cpu", action="store_true", help="use the CPU even if a GPU is available")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not a.manifest.is_file():
        p.error(f"no manifest at {a.manifest}")
    if a.steps < 1 or a.inner_steps < 0:
        p.error("--steps must be >= 1 and --inner-steps >= 0")
    diffusers.utils.logging.disable_progress_bar()  # loading bars, one per process
    transformers.utils.logging.disable_progress_bar()
    settings = BatchSettings(str(a.model), a.steps, a.guidance, a.inner_steps, a.seed)
    run(a.manifest, a.out, a.images, settings, a.threads, a.cpu, not a.no_progress)


if __name__ == "__main__":
    main()

"""The benchmark's outputs: summary per method, printed table, CSV, JSON and a plot.

:func:`write_outputs` writes to one folder: ``summary.csv`` (one row per method, the columns of
:data:`COLUMNS`), ``per_scene.csv`` (one row per method and scene), ``results.json`` (configuration,
machine, summary, performance target, per-scene rows) and ``bench.png``; it returns the table text.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..shapes.edits import EditScore, edit_rates

COLUMNS: tuple[str, ...] = (
    "method",
    "group",
    "n",
    "psnr",
    "ssim",
    "latent_mse",
    "vae_bound",
    "gap_to_vae",
    "wall_s",
    "rec_wall_s",
    "cpu_s",
    "unet_forward",
    "unet_backward",
    "peak_mem_mb",
    "edit_success",
    "edit_psnr_target",
    "edit_psnr_background",
    "sweep_inner_steps",
)
"""Columns of the summary (``summary.csv`` and the ``summary`` list of ``results.json``)."""

MARKER = ".nti-bench"
"""The file that marks a folder as a benchmark's output (the command line refuses a non-empty
``--out`` without it or ``results.json``)."""
OUTPUT_FILES = ("summary.csv", "per_scene.csv", "results.json", "table.txt", "bench.png")
"""The files :func:`write_outputs` writes (and replaces)."""

_MEANS = tuple(c for c in COLUMNS if c not in ("method", "group", "n", "sweep_inner_steps"))
_TABLE = (  # (column, header, width, format)
    ("psnr", "PSNR", 7, ".2f"),
    ("ssim", "SSIM", 6, ".3f"),
    ("latent_mse", "z MSE", 9, ".2e"),
    ("gap_to_vae", "gap", 6, ".2f"),
    ("wall_s", "wall s", 8, ".2f"),
    ("rec_wall_s", "rec s", 7, ".2f"),
    ("cpu_s", "cpu s", 8, ".2f"),
    ("unet_forward", "fwd", 7, ".0f"),
    ("unet_backward", "bwd", 7, ".0f"),
    ("peak_mem_mb", "mem MB", 8, ".1f"),
    ("edit_success", "edit ok", 8, ".2f"),
    ("edit_psnr_target", "tgt dB", 7, ".2f"),
    ("edit_psnr_background", "bg dB", 7, ".2f"),
)


def _mean(values: list) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    vals = [v for v in vals if math.isfinite(v)] or vals  # an identical image gives PSNR inf
    return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: list[dict], order: list[str]) -> list[dict]:
    """Mean of every measure per method (in `order`), over the scenes it ran on.

    Returns:
        `list[dict]` with the keys of :data:`COLUMNS`; `edit_success` is a rate in [0, 1]; a
        measure a method has no value for (edits of the inner-step sweep) is NaN.
    """
    out = []
    for name in order:
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        row = {"method": name, "group": mine[0]["group"], "n": len(mine)}
        row |= {k: _mean([r.get(k) for r in mine]) for k in _MEANS}
        row["sweep_inner_steps"] = mine[0].get("sweep_inner_steps")
        out.append(row)
    return out


def edits_by_kind(per_scene: list[dict], order: list[str]) -> list[dict]:
    """Edit success and PSNR outside the edit region per method and edit kind, aggregated by
    :func:`~nti_utils.shapes.edits.edit_rates` (the evaluator's aggregate).

    Args:
        per_scene (`list[dict]`): the benchmark's per-scene rows (``results["per_scene"]``).
        order (`list[str]`): the methods, in the table's order; methods without edits are left out.

    Returns:
        `list[dict]`: per method, ``{"method", kind: edit_rates(...)}`` for each kind it edited
        (``n``, ``success``, ``psnr_outside_mean``, ``psnr_outside_ge_25``, ...).
    """
    out = []
    for name in order:
        mine = [r for r in per_scene if r["method"] == name and _edited(r)]
        if not mine:
            continue
        row: dict = {"method": name}
        for kind in dict.fromkeys(r["edit_kind"] for r in mine):
            scores = [
                EditScore(
                    success=bool(r["edit_success"]),
                    psnr_target=float(r.get("edit_psnr_target", math.nan)),
                    psnr_outside=float(r["edit_psnr_background"]),
                )
                for r in mine
                if r["edit_kind"] == kind
            ]
            row[kind] = edit_rates(scores)
        out.append(row)
    return out


def _edited(row: dict) -> bool:
    v = row.get("edit_success")
    return v is not None and not math.isnan(float(v))


def kinds_text(results: dict, methods: list[str] | None = None) -> str:
    """The table's "edits by kind" rows for `methods` (in that order; default: every method that
    edited), with its header: per edit kind the number of scenes, the success rate, the share with
    >= 25 dB outside the edit region and its mean PSNR there. None of it depends on the machine.

    Raises:
        KeyError: a method the run has no edits for (the message lists the methods it has).
    """
    order = [r["method"] for r in results["summary"]] if methods is None else methods
    rows = edits_by_kind(results["per_scene"], order)
    missing = sorted(set(order) - {r["method"] for r in rows})
    if methods is not None and missing:
        have = [
            r["method"]
            for r in edits_by_kind(results["per_scene"], [r["method"] for r in results["summary"]])
        ]
        raise KeyError(f"no edit rows for {missing}; the run has edits for {have}")
    return "\n".join(_kinds_lines(rows))


def _kinds_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    kinds = list(dict.fromkeys(k for r in rows for k in r if k != "method"))
    name_w = max(len(r["method"]) for r in rows) + 2
    head = f"{'edits by kind':<{name_w}}" + "".join(
        f"{k + ' (n, ok, >=25 dB, out dB)':>36}" for k in kinds
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(
            f"{r[k]['n']:>12d}{r[k]['success']:>7.2f}{r[k]['psnr_outside_ge_25']:>7.2f}"
            f"{r[k]['psnr_outside_mean']:>10.2f}"
            if k in r
            else f"{'-':>36}"
            for k in kinds
        )
        lines.append(f"{r['method']:<{name_w}}{cells}")
    return lines


TIMING_COLUMNS = ("wall_s", "rec_wall_s", "cpu_s", "peak_mem_mb")
"""The table's columns that depend on the machine and its load (the others are the same on every
run of the same code, model and scenes)."""


def _summary_lines(summary: list[dict], columns: tuple[str, ...] | None = None) -> list[str]:
    table = [c for c in _TABLE if columns is None or c[0] in columns]
    name_w = max(len(r["method"]) for r in summary) + 2
    head = f"{'method':<{name_w}}{'n':>4}" + "".join(f"{h:>{w}}" for _, h, w, _ in table)
    lines = [head, "-" * len(head)]
    for r in summary:
        cells = "".join(f"{_fmt(r[k], f):>{w}}" for k, _, w, f in table)
        lines.append(f"{r['method']:<{name_w}}{r['n']:>4}{cells}")
    return lines


COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "data" / "benchmark" / "results.json"
"""The benchmark run committed with the course (``data/benchmark``, the README's table): the
notebooks print its rows next to their single-scene results."""


def load_results(path: str | Path = COMMITTED_RESULTS) -> dict:
    """A benchmark run's ``results.json`` (as :func:`write_outputs` wrote it), by default the
    committed run's (:data:`COMMITTED_RESULTS`).

    Raises:
        FileNotFoundError: no such file; run ``python -m nti_utils.bench`` to make one.
        ValueError: the file is not a benchmark's results.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python -m nti_utils.bench --out DIR` and pass DIR/results.json"
        )
    results = json.loads(path.read_text())
    if not isinstance(results, dict) or not {"summary", "per_scene", "config"} <= set(results):
        raise ValueError(f"{path} is not a benchmark's results.json (no summary/per_scene/config)")
    # JSON has no NaN: the file stores a missing number (a method that does not edit) as null
    results["summary"] = [
        {k: (math.nan if v is None else v) for k, v in row.items()} for row in results["summary"]
    ]
    return results


def rows_text(results: dict, methods: list[str], timings: bool = True) -> str:
    """The table's rows for `methods` only (in that order), with its header: the many-scene
    numbers to print next to a single-scene result. ``timings=False`` leaves out the columns that
    depend on the machine (:data:`TIMING_COLUMNS`), as a notebook does, whose checked outputs must
    not change when the run is measured again elsewhere.

    Raises:
        KeyError: a method the run has no row for (the message lists the rows it has).
    """
    by_name = {r["method"]: r for r in results["summary"]}
    missing = [m for m in methods if m not in by_name]
    if missing:
        raise KeyError(f"no benchmark rows {missing}; the run has {list(by_name)}")
    summary = [by_name[m] for m in methods]
    columns = None if timings else tuple(c for c, *_ in _TABLE if c not in TIMING_COLUMNS)
    return "\n".join(_summary_lines(summary, columns))


def run_label(ctx: dict) -> str:
    """A run's start date and, where its context knows it, its commit."""
    return f"{ctx['date']} at {ctx['commit']}" if ctx.get("commit") else ctx["date"]


def format_table(results: dict) -> str:
    """The summary as fixed-width text, with the VAE bound, the target and the context."""
    summary, ctx, cfg = results["summary"], results["context"], results["config"]
    lines = [
        f"Null-text inversion benchmark: model {ctx['model_id']!r} ({ctx['resolution']} px), "
        f"{cfg['steps']} DDIM steps, w={cfg['guidance']:g}, {ctx['device']} {ctx['dtype']}, "
        f"{ctx['threads']} threads",
        *_summary_lines(summary),
    ]
    vae = [r["vae_bound"] for r in summary if r["group"] == "method"]
    lines += [
        "",
        f"VAE bound (round trip) mean PSNR: {_fmt(_mean(vae), '.2f')} dB; gap = bound - PSNR; "
        "z MSE: reconstructed vs encoded latents z_0 (the inversion alone, without the VAE).",
        "fwd/bwd: latent rows through the UNet per image (a [∅; C] batch counts 2).",
        f"Batched rows (ours) invert up to {cfg['batch']} images per call (its ablations: the "
        "ablation scenes of the batch): their wall s, cpu s, fwd and "
        "bwd are the batch's shared per image, their mem is the batch's.",
        f"mem: {results.get('memory_kind', '')}.",
        f"Ablations run on the first {min(cfg['ablation_scenes'], cfg['scenes'])} scenes: compare "
        "them with the 'ablation baseline' rows (the library's or ours on those scenes).",
        "Ours: the reference's update rule with Adam's learning rate x "
        f"{ctx.get('ours_step_scale', 1):g} and the inner-step ceiling divided by it (rounded up); "
        "'ours, paper schedule': x 1.",
        "edit ok: success rate of the intended change (renderer's scorer); tgt dB: PSNR against "
        "the target render; bg dB: PSNR against the input outside the edit region.",
    ]
    kinds = kinds_text(results)
    lines += ["", kinds] if kinds else []
    if ctx.get("resumed_from"):
        lines.append(
            f"Resumed run: rows measured in runs started {', '.join(ctx['resumed_from'])} "
            f"and {run_label(ctx)} (a batched method's batch always in one run)."
        )
    lines += [_target_line(label, t) for label, t in results.get("targets", {}).items()]
    return "\n".join(lines)


def _target_line(label: str, t: dict) -> str:
    verdict = "MET" if t["met"] else "NOT MET"
    limit = f"wall time ratio {t['wall_ratio']:.3f} (at most {t['wall_ratio_max']:.3f})"
    edits = f"edit success {_fmt(t['edit_success'], '.2f')}"
    if "psnr_reference" in t:  # null-text inversion against the reference loop
        return (
            f"Target {label!r} (the reference's PSNR within 0.1 dB and edit success within 0.05): "
            f"{verdict}: {t['psnr']:.2f} vs {t['psnr_reference']:.2f} dB (shortfall "
            f"{t['psnr_shortfall_db']:+.2f} dB), {edits} vs "
            f"{_fmt(t['edit_success_reference'], '.2f')}, {limit}, CPU time ratio "
            f"{t['cpu_ratio']:.3f}."
        )
    return (
        f"Target {label!r} (within 0.1 dB of the VAE bound, edit success at least the reference's, "
        f"inversion + reconstruction against DDIM inversion's): {verdict}: gap "
        f"{t['gap_to_vae']:.2f} dB, {edits} vs {_fmt(t['edit_success_reference'], '.2f')}, {limit}."
    )


def _fmt(v, f: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(results: dict) -> Figure:
    """Three panels: PSNR vs wall time per method, PSNR vs inner steps, edit success rate."""
    summary = results["summary"]
    fig = Figure(figsize=(16, 4.5))
    ax_t, ax_k, ax_e = fig.subplots(1, 3)
    for r in summary:
        color = "tab:blue" if r["group"] == "method" else "tab:gray"
        ax_t.scatter(r["wall_s"], r["psnr"], color=color)
        ax_t.annotate(
            r["method"],
            (r["wall_s"], r["psnr"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    vae = _mean([r["vae_bound"] for r in summary if r["group"] == "method"])
    ax_t.axhline(vae, color="k", ls="--", lw=0.8, label="VAE bound")
    ax_t.set(
        xscale="log",
        xlabel="wall time per image (s)",
        ylabel="PSNR (dB)",
        title="reconstruction vs time",
    )
    ax_t.legend(fontsize=7)
    points = [r for r in summary if r.get("sweep_inner_steps") is not None]  # same scenes
    if points:
        ax_k.plot(*zip(*sorted((r["sweep_inner_steps"], r["psnr"]) for r in points)), marker="o")
        ax_k.axhline(_mean([r["vae_bound"] for r in points]), color="k", ls="--", lw=0.8)
    ax_k.set(
        xlabel="inner steps (ceiling)",
        ylabel="PSNR (dB)",
        title="null-text inversion: PSNR vs inner steps",
    )
    edits = [r for r in summary if not math.isnan(r["edit_success"])]
    ax_e.barh(
        [r["method"] for r in edits],
        [r["edit_success"] for r in edits],
        color=["tab:blue" if r["group"] == "method" else "tab:gray" for r in edits],
    )
    ax_e.invert_yaxis()
    ax_e.tick_params(axis="y", labelsize=7)
    ax_e.set(xlim=(0, 1), xlabel="edit success rate", title="Prompt-to-Prompt on each inversion")
    fig.tight_layout()
    return fig


def save_results(results: dict, out: str | Path) -> None:
    """Write ``results.json`` into the folder `out` atomically (a temporary file renamed into
    place), so that a run killed while saving leaves the previous file whole."""
    path = Path(out) / "results.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(results), indent=2))
    os.replace(tmp, path)


def write_outputs(results: dict, out: str | Path) -> str:
    """Write CSVs, JSON and the plot into `out` (created); return the table text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    table = format_table(results)
    _write_csv(out / "summary.csv", results["summary"], list(COLUMNS))
    per_scene = results["per_scene"]
    cols = list(dict.fromkeys(k for r in per_scene for k in r))
    _write_csv(out / "per_scene.csv", per_scene, cols)
    save_results(results, out)
    (out / "table.txt").write_text(table + "\n")
    plot(results).savefig(out / "bench.png", dpi=110)
    return table

"""Command line of the benchmark: ``python -m nti_utils.bench`` (see :mod:`nti_utils.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nti_utils.bench import __doc__ as package_doc
from nti_utils.bench.config import AUTOCAST_CHOICES, DTYPE_CHOICES, QUICK, BenchConfig
from nti_utils.bench.report import MARKER, OUTPUT_FILES, save_results, write_outputs
from nti_utils.bench.run import previous_results, run
from nti_utils.models import resolve_device


def check_out(out: Path) -> None:
    """Check that `out` can hold the benchmark's outputs, touching nothing: a new folder (not under
    a file), an empty one, or a benchmark's (``results.json`` or the :data:`MARKER` file).

    Raises:
        NotADirectoryError: `out`, or a folder above it, is a file.
        FileExistsError: `out` holds other files: the benchmark would replace files of its output
            names (``summary.csv``, ``table.txt``, ...) there.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    existing = next(p for p in [out, *out.parents] if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out} cannot be created: {existing} is a file")
    if existing != out or (out / "results.json").exists() or (out / MARKER).exists():
        return
    names = sorted(p.name for p in out.iterdir())
    if names:
        raise FileExistsError(
            f"--out {out} holds other files ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) and is not a benchmark output folder (no "
            f"results.json or {MARKER}); the benchmark writes {', '.join(OUTPUT_FILES)} there and "
            "would replace files of those names: choose a new or empty folder"
        )


def _ceilings(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2), for ``--inner-sweep``."""
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2,5, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> dict:
    """Command line: parse flags into a :class:`BenchConfig`, run, write outputs, print the table."""
    p = argparse.ArgumentParser(description=package_doc.split("\n")[0])
    p.add_argument("--model", help='"toy" (default) or a diffusers pipeline folder')
    p.add_argument("--scenes", type=int, help="scenes for the methods (50; quick: 3)")
    p.add_argument("--ablation-scenes", type=int, help="of which run the ablations (20; quick: 1)")
    p.add_argument("--steps", type=int, help="DDIM steps (50; quick: 5)")
    p.add_argument("--guidance", type=float, help="w (7.5)")
    p.add_argument("--inner-steps", type=int, help="null-text inner-step ceiling (10; quick: 3)")
    p.add_argument(
        "--inner-sweep",
        type=_ceilings,
        help="inner-step ceilings of the ablation, comma-separated integers (0,1,2,5; quick: 0)",
    )
    p.add_argument("--seed-offset", type=int, help="scene i is HELD_OUT_SEED + offset + i (20000)")
    p.add_argument("--batch", type=int, help="images per batch of ours (25; quick: 3)")
    p.add_argument(
        "--global-passes",
        type=int,
        help="passes of the global-null ablation, Alg. 2 (150; quick: 4)",
    )
    p.add_argument(
        "--global-scenes", type=int, help="scenes that run the global-null ablation (3; quick: 1)"
    )
    p.add_argument("--device", help="cuda, cpu, ... (CUDA if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="(float32)")
    p.add_argument(
        "--autocast",
        choices=AUTOCAST_CHOICES,
        help="CUDA autocast for ours (auto: float16 on CUDA)",
    )
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--quick", action="store_true", help="a small smoke run (tests): see QUICK")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="(results/bench)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out (same flags): keep the rows it saved",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if k in BenchConfig.__dataclass_fields__}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        cfg = BenchConfig(
            **{**(QUICK if a.quick else {}), **given, "ablations": not a.no_ablations}
        )
    except ValueError as err:
        p.error(str(err))
    if cfg.device is not None:
        try:
            resolve_device(cfg.device)
        except (ValueError, TypeError) as err:
            p.error(f"--device: {err}")
    check_out(a.out)
    resume = previous_results(a.out, cfg) if a.resume else None
    if resume is None and (a.out / "results.json").exists() and not a.overwrite:
        raise FileExistsError(
            f"{a.out} holds a benchmark's results: pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / MARKER).touch()
    results = run(
        cfg,
        progress=not a.no_progress,
        resume=resume,
        on_batch=lambda partial: write_outputs(partial, a.out),
        on_row=lambda partial: save_results(partial, a.out),
    )
    table = write_outputs(results, a.out)
    print(table)
    from nti_utils.caption import TOY_CAPTIONER_DIR

    if cfg.model == "toy" and (TOY_CAPTIONER_DIR / "config.json").is_file():
        print(caption_speed())
    return results


def caption_speed(n: int = 50) -> str:
    """One line: the embedded captioner's wall time per caption on one CPU thread, images one at a
    time (after loading, after one warm-up call), over `n` held-out renders."""
    import time

    import torch

    from nti_utils.caption import load_captioner
    from nti_utils.shapes.seeds import CAPTIONER_CHECK
    from nti_utils.shapes.world import scene_from_seed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        captioner = load_captioner("toy", "cpu")
        images = [scene_from_seed(CAPTIONER_CHECK + i).render() for i in range(n)]
        captioner(images[0])
        t0 = time.perf_counter()
        for image in images:
            captioner(image)
        ms = 1000 * (time.perf_counter() - t0) / n
    finally:
        torch.set_num_threads(threads)
    return (
        f"embedded captioner: {ms:.1f} ms per caption on one CPU thread ({n} images, one at a time)"
    )

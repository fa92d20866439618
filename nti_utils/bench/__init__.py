"""Benchmark of the paper's claims on shapes-world scenes: ``python -m nti_utils.bench``.

On the same held-out rendered scenes (each with an edit that has a ground truth), every inversion
method and ablation is measured for reconstruction, cost and editability, in one run on one machine.

* :mod:`~nti_utils.bench.config`: :class:`BenchConfig`, the row names, the scenes;
* :mod:`~nti_utils.bench.reference`: the original notebook's null-text loop, the yardstick;
* :mod:`~nti_utils.bench.methods`: the methods and ablations;
* :mod:`~nti_utils.bench.measure`: wall/CPU time, UNet rows, peak memory of a block of work;
* :mod:`~nti_utils.bench.run`: running them on batches of scenes, resumable row by row;
* :mod:`~nti_utils.bench.report`: summary, table, CSV, JSON and plot;
* :mod:`~nti_utils.bench.cli`: the command line.

Prints a table and writes ``summary.csv``, ``per_scene.csv``, ``results.json``, ``table.txt`` and
``bench.png`` to ``--out`` (default ``results/bench``). ``--quick`` is a smoke run for tests
(:data:`~nti_utils.bench.config.QUICK`).

:mod:`~nti_utils.bench.memory` is a separate measurement, ``python -m nti_utils.bench.memory``: the
peak memory of a Prompt-to-Prompt edit at SD's 512 px on an SD-shaped UNet of random weights,
against plain sampling and against materializing every attention probability.
"""

from nti_utils.bench.cli import main
from nti_utils.bench.config import (
    ABLATION_BASELINE,
    DDIM_W,
    DDIM_W1,
    LIBRARY,
    OURS,
    OURS_BASELINE,
    OURS_ONE,
    QUICK,
    REFERENCE,
    BenchConfig,
    BenchScene,
    bench_scene,
)
from nti_utils.bench.methods import SHORT_STEP_SCALE, Method, methods, ours_settings
from nti_utils.bench.reference import reference_null_text_inversion
from nti_utils.bench.run import previous_results, run

__all__ = [
    "ABLATION_BASELINE",
    "DDIM_W",
    "DDIM_W1",
    "LIBRARY",
    "OURS",
    "OURS_BASELINE",
    "OURS_ONE",
    "QUICK",
    "REFERENCE",
    "SHORT_STEP_SCALE",
    "BenchConfig",
    "BenchScene",
    "Method",
    "bench_scene",
    "main",
    "methods",
    "ours_settings",
    "previous_results",
    "reference_null_text_inversion",
    "run",
]

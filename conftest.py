"""The suite runs in parallel: pytest-xdist workers (`-n auto --dist loadfile` in pyproject.toml), a
whole test file or notebook per worker, the cores shared among the workers.

On the CPU much of the embedded model's work is small operations that a second thread speeds up
by far less than twice: on the 2-core machine, in the notebooks, a null-text inversion took about
30 s with one thread and 20 s with two (notebook 4: 31.2 and 21.6 s; notebook 7: 28.0 and 18.4 s),
and a script timing the inversion alone measured 28 s on one thread and 30 s on two; two one-thread
inversions side by side took 30 s each: two inversions in the time of one. So the cores are shared among workers rather than
threads, and each worker gets ``cores // workers`` threads.

Every process the tests start (nbval's notebook kernels, JupyterLab's kernel in the browser test,
and any other that does not set its own count; the batch runner sets its own) gets one thread,
``OMP_NUM_THREADS=1``, on any machine: the thread count changes float reductions, and the
notebooks' checked outputs were executed with one thread, so that they reproduce whatever the
number of cores. `python -m pytest -n 0` runs the tests in one process.
"""

import os

import pytest
import torch

MAX_WORKERS = 4  # each worker loads its own models (about 1-2 GB of memory with a notebook kernel)

SLOW_FIRST = (
    "tests/test_toy_model.py",
    "notebooks/04_null_text_optimization.ipynb",
    "notebooks/05_prompt_to_prompt.ipynb",
    "notebooks/01_ddim_sampling.ipynb",
    "notebooks/06_ablations_widgets.ipynb",
    "notebooks/07_after_null_text.ipynb",
    "notebooks/03_pivotal_inversion.ipynb",
    "tests/test_bench.py",
    "notebooks/02_naive_inversion.ipynb",
    "tests/browser/test_browser_course.py",
)
"""The files that took longest (about 1 to 5 minutes each on two workers), longest first: the workers
take files in collection order (`--no-loadscope-reorder`), so that no long file starts last while
the other worker has nothing left to do. The other files follow in their usual order."""


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, _cores()))


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: a notebook's cells keep their order


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
THREADS = max(1, _cores() // _WORKERS) if _WORKERS else torch.get_num_threads()
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = "1"  # for the processes the tests start (workers set theirs above)


@pytest.fixture(autouse=True)
def _worker_threads():
    """A test that sets torch's thread count (the batch runner does) leaves the next one its share."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)

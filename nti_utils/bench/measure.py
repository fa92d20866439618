"""Measuring a block of work: wall and CPU time, UNet evaluations, peak memory.

>>> with measure(pipe.unet) as m:
...     result = null_text_inversion(pipe, image, prompt)
>>> m.wall_s, m.forward_rows, m.backward_rows, m.peak_mem_mb

UNet evaluations are counted by hooks on the UNet, per latent row (a classifier-free-guidance batch
[∅; C] of one image counts 2): a forward pre-hook counts rows going in, and a hook on the output
tensor counts rows whose gradient comes back (one backward pass through the UNet, whether it goes
to the weights, to the text embedding or to both).

Peak memory is device-specific and labelled as such in :attr:`Measurement.memory_kind`: on CUDA the
peak of `torch.cuda.max_memory_allocated` above the level at the start; on the CPU the peak resident
set size (RSS) of the process above the level at the start, sampled every 5 ms by a thread (freed
heap memory is handed back to the OS first, where the C library allows it, so that what an earlier
block freed does not hide what this one allocates).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

_MB = 2.0**20
CUDA_MEMORY_KIND = "CUDA: peak of torch.cuda.max_memory_allocated above the start"
CPU_MEMORY_KIND = "CPU: peak process RSS above the start, sampled every 5 ms"


@dataclass
class Measurement:
    """What :func:`measure` found.

    Attributes:
        wall_s (`float`): wall-clock seconds (CUDA synchronized at both ends).
        cpu_s (`float`): CPU seconds of the process (all threads).
        forward_rows (`int`), backward_rows (`int`): latent rows through the UNet, each way.
        peak_mem_mb (`float`): peak memory above the start, MiB (see `memory_kind`).
        memory_kind (`str`): what `peak_mem_mb` measures.
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    forward_rows: int = 0
    backward_rows: int = 0
    peak_mem_mb: float = float("nan")
    memory_kind: str = ""


class UNetCounter:
    """Counts latent rows through a UNet's forward and backward passes while installed."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.forward_rows = self.backward_rows = 0
        self._handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.forward_rows += int(sample.shape[0])

    def _post(self, module, args, output) -> None:
        sample = output.sample if hasattr(output, "sample") else output[0]
        if sample.requires_grad:
            sample.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.backward_rows += int(grad.shape[0])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _RssPeak(threading.Thread):
    """Samples the process RSS every `interval` seconds until stopped; keeps the peak."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval = psutil.Process(), interval
        self.start_rss = self.peak = self.proc.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return (self.peak - self.start_rss) / _MB


def release_freed_memory() -> None:
    """Collect garbage and, with glibc, return freed heap pages to the OS (``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def measure(unet: torch.nn.Module) -> Iterator[Measurement]:
    """Measure the block: time, UNet rows (hooks on `unet`), peak memory on `unet`'s device.

    Yields:
        :class:`Measurement`, filled in when the block ends (also if it raises).
    """
    m = Measurement()
    cuda = unet.device.type == "cuda"
    release_freed_memory()
    if cuda:
        torch.cuda.synchronize(unet.device)
        torch.cuda.reset_peak_memory_stats(unet.device)
        start_alloc = torch.cuda.memory_allocated(unet.device)
        m.memory_kind = CUDA_MEMORY_KIND
    else:
        sampler = _RssPeak()
        sampler.start()
        m.memory_kind = CPU_MEMORY_KIND
    counter = UNetCounter(unet)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield m
    finally:
        if cuda:
            torch.cuda.synchronize(unet.device)
        m.wall_s, m.cpu_s = time.perf_counter() - t0, time.process_time() - c0
        counter.remove()
        m.forward_rows, m.backward_rows = counter.forward_rows, counter.backward_rows
        if cuda:
            peak = torch.cuda.max_memory_allocated(unet.device) - start_alloc
            m.peak_mem_mb = peak / _MB
        else:
            m.peak_mem_mb = sampler.stop()

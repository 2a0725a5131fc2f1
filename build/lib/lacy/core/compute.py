"""One thread per process for torch's parallel work (what the serving processes compute on).

libgomp, torch's OpenMP on Linux, keeps its idle workers spinning between parallel regions only while
it manages no more threads than the machine has CPUs. Every other OS thread that runs a parallel region
brings a pool of its own, and from then on every pool waits passively, so each of a forward's many
small regions pays a wake-up. On the 2-core machine, ten SmolLM2 forwards at 2 threads take 0.85 s on
the only thread that ever computes and 1.25 s on a second thread once the main thread has computed:
as slow as 1 thread (1.27 s; `python -m bench.threads`, bench/results/threads.json). A server whose
decoding threads each run forwards is in the second state; `compute_thread().call(fn)` keeps every
model load and forward on one thread, whoever asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class ComputeThread:
    """A single worker thread that runs what `call` is given, in order; a call from the thread itself
    runs at once (so nested calls never wait on themselves)."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="torch")
        self.ident = self.executor.submit(threading.get_ident).result()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        return self.executor.submit(fn, *args, **kwargs).result()

    def set_threads(self, threads: int | None) -> None:
        """torch's intra-op threads for this thread's work (None: leave Ray's or torch's default). The
        setting is per OS thread under OpenMP, so it is made here, not in the caller's thread."""
        if threads is not None:
            self.call(torch.set_num_threads, threads)


_process_thread: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """The process's one compute thread (created on first use)."""
    global _process_thread
    with _lock:
        if _process_thread is None:
            _process_thread = ComputeThread()
        return _process_thread


def device_for(gpus: float, what: str) -> str:
    """cuda when a deployment reserves GPUs for `what` (serve.<what>_gpus), else cpu; a reservation
    without CUDA is an error."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"serve.{what}_gpus is {gpus} but this process sees no CUDA device")
    return "cuda"

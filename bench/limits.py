"""This machine's limits, measured in the same run as the benchmark that is compared against them.

Every benchmark in `bench/` reports its figure as a ratio to a ceiling taken here, on an otherwise idle
machine: `load_guard` prints the load average and refuses to record a result above 1.5 runnable
processes per core (`--force` records it marked as taken under load, never as a result).

    .venv/bin/python -m bench.limits --preset small --batch 16 --seq-len 128 --vocab 4097 --threads 2

Ceilings:
- `matmul_ceiling`: FLOP/s of a bare loop over the GEMMs of one training step of a GPT-2 preset (the
  forward GEMMs and both backward GEMMs of each, the attention batch-GEMMs, the LM head), fp32, in
  one process with `threads` torch threads; beside it, a large square GEMM (the BLAS peak).
- `train_flops_per_token`: the model FLOPs a training step spends per token (6 N + 12 L T C, N the
  GEMM parameters including the LM head), so tokens/s x FLOPs/token over the ceiling is the MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from lacy.core.provenance import machine

MAX_LOAD_PER_CORE = 1.5


@dataclass
class Load:
    """Load average (1, 5, 15 min) against the cores; `idle` when the 1-min figure is within the bound."""

    one: float
    five: float
    fifteen: float
    cores: int

    @property
    def per_core(self) -> float:
        return self.one / self.cores

    @property
    def idle(self) -> bool:
        return self.per_core <= MAX_LOAD_PER_CORE

    def __str__(self) -> str:
        return (f"load average {self.one:.2f} {self.five:.2f} {self.fifteen:.2f} on {self.cores} cores "
                f"({self.per_core:.2f} per core; results need <= {MAX_LOAD_PER_CORE})")


def load_now() -> Load:
    one, five, fifteen = os.getloadavg()
    return Load(one, five, fifteen, os.cpu_count() or 1)


def load_guard(force: bool = False) -> Load:
    """Print the load average; refuse (SystemExit) a run that starts on a busy machine unless `force`."""
    load = load_now()
    print(f"# {load}", flush=True)
    if not load.idle and not force:
        raise SystemExit(f"refusing to benchmark: {load}. Stop other jobs, or pass --force to take "
                         "figures that are marked as measured under load (not results).")
    return load


def record(path: Path, result: dict, start: Load, own_threads: int = 0, force: bool = False) -> dict:
    """Write `result` as JSON with the machine and the load at start and end, when the machine was idle:
    at the start, and at the end once the benchmark's own `own_threads` busy threads are taken off.

    Above the bound the figures are printed, and written (marked `under_load`) only with `force`."""
    end = load_now()
    others_at_end = Load(max(0.0, end.one - own_threads), end.five, end.fifteen, end.cores)
    result = {**result, "load_start": asdict(start), "load_end": asdict(end), "machine": machine(),
              "under_load": not (start.idle and others_at_end.idle),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"# end: {end}; less this benchmark's {own_threads} threads: {others_at_end.per_core:.2f} per core",
          flush=True)
    if result["under_load"] and not force:
        print(f"# NOT written to {path}: the machine was busy during the run", flush=True)
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# written to {path}", flush=True)
    return result


def process_group(title: str) -> str | None:
    """Every process by what it is: Ray workers by their title (`ray::<actor class>`), Ray's daemons by
    program, the benchmark itself as "driver"; a command line (`" ".join(cmdline)`) -> group."""
    if not title:
        return None
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0][:60]  # ray::Class.method -> ray::Class
    if "-m bench." in title:
        return "driver"
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if daemon in title:
            return daemon
    return "other: " + Path(title.split()[0]).name[:40]


def busiest(sampler: ProcessSampler, start: float, end: float, at_least: float = 0.01) -> dict[str, float]:
    """Cores each process group kept busy between `start` and `end`, busiest first."""
    cores = {g: round(sampler.cpu_share(g, start, end), 3) for g in sampler.groups()}
    return {g: c for g, c in sorted(cores.items(), key=lambda x: -x[1]) if c >= at_least}


class ProcessSampler:
    """RSS and CPU seconds of the processes `group(cmdline)` names (None: not sampled), every `every` s,
    in a thread, while the `with` block runs: who used the cores during a benchmark, and how much memory."""

    def __init__(self, group: Callable[[str], str | None], every: float = 0.2) -> None:
        self.group, self.every = group, every
        self.samples: list[tuple[float, int, str, int, float]] = []  # (time, pid, group, rss, cpu_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for proc in psutil.process_iter(["pid", "cmdline"]):
                name = self.group(" ".join(proc.info["cmdline"] or []))
                if name is None:
                    continue
                try:
                    cpu = proc.cpu_times()
                    self.samples.append((now, proc.pid, name, proc.memory_info().rss, cpu.user + cpu.system))
                except psutil.Error:
                    pass
            self._stop.wait(self.every)

    def _by_pid(self) -> dict[int, str]:
        """Each process's group by its last title: a Ray worker starts as `default_worker.py` and
        `ray::IDLE` and takes its actor's name once it has one."""
        return {pid: name for _, pid, name, _, _ in self.samples}

    def groups(self) -> list[str]:
        return sorted(set(self._by_pid().values()))

    def peak_rss(self, name: str) -> int:
        pids = {pid for pid, group in self._by_pid().items() if group == name}
        return max((s[3] for s in self.samples if s[1] in pids), default=0)

    def cpu_share(self, name: str, start: float, end: float) -> float:
        """Cores the `name` processes kept busy between `start` and `end` (time.time()): each process's
        CPU seconds over the wall seconds it was sampled there, summed (1.0 = one core throughout)."""
        total = 0.0
        for pid in (pid for pid, group in self._by_pid().items() if group == name):
            inside = [s for s in self.samples if s[1] == pid and start <= s[0] <= end]
            if len(inside) >= 2:
                total += (inside[-1][4] - inside[0][4]) / max(inside[-1][0] - inside[0][0], 1e-9)
        return total


# ----------------------------------------------------------------------------------------------
# FLOPs of a GPT-2 training step


def gemm_shapes(n_layer: int, n_embd: int, n_head: int, vocab: int, batch: int, seq_len: int
                ) -> list[tuple[int, int, int, int]]:
    """(count, m, k, n) of every GEMM in one forward pass: x[m,k] @ w[k,n], batched `count` times."""
    rows, c, d = batch * seq_len, n_embd, n_embd // n_head
    per_layer = [(1, rows, c, 3 * c), (1, rows, c, c), (1, rows, c, 4 * c), (1, rows, 4 * c, c)]
    # scores = q k^T and out = p v, per sequence and head: [T, d] x [d, T] and [T, T] x [T, d]
    attention = [(batch * n_head, seq_len, d, seq_len), (batch * n_head, seq_len, seq_len, d)]
    return [*(per_layer + attention) * n_layer, (1, rows, c, vocab)]


def train_flops_per_token(n_layer: int, n_embd: int, vocab: int, seq_len: int) -> float:
    """6 N + 12 L T C: forward 2 FLOPs per GEMM weight per token, backward twice that; N counts the
    block matrices (12 L C^2) and the LM head (V C); attention adds 2 x 2 L T C forward (PaLM's count,
    causal masking not discounted)."""
    n = 12 * n_layer * n_embd ** 2 + vocab * n_embd
    return 6 * n + 12 * n_layer * seq_len * n_embd


def _time_gemms(shapes: list[tuple[int, int, int, int]], seconds: float) -> float:
    """FLOP/s of running forward, grad-input and grad-weight GEMMs of every shape in turn (fp32)."""
    tensors = []
    for count, m, k, n in shapes:
        x, w, g = torch.randn(count, m, k), torch.randn(count, k, n), torch.randn(count, m, n)
        tensors.append((x, w, g))
    flops = sum(3 * 2 * count * m * k * n for count, m, k, n in shapes)

    def one_pass() -> None:
        for x, w, g in tensors:
            torch.bmm(x, w)                   # forward
            torch.bmm(g, w.transpose(1, 2))   # grad wrt input
            torch.bmm(x.transpose(1, 2), g)   # grad wrt weight

    one_pass()  # warm-up: thread pool, allocator
    passes, start = 0, time.perf_counter()
    while passes < 3 or time.perf_counter() - start < seconds:
        one_pass()
        passes += 1
    return flops * passes / (time.perf_counter() - start)


def matmul_ceiling(n_layer: int, n_embd: int, n_head: int, vocab: int, batch: int, seq_len: int,
                   threads: int, seconds: float = 3.0) -> dict:
    """FLOP/s of the model's GEMMs and of a 1024^3 GEMM at `threads` torch threads, in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _time_gemms(gemm_shapes(n_layer, n_embd, n_head, vocab, batch, seq_len), seconds)
        square = _time_gemms([(1, 1024, 1024, 1024)], seconds)
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "model_gemm_flops": model, "square_gemm_flops": square}


def main() -> None:
    from lacy.core.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4097)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    start = load_guard(args.force)
    p = PRESETS[args.preset]
    rows = [matmul_ceiling(p["n_layer"], p["n_embd"], p["n_head"], args.vocab, args.batch, args.seq_len, t,
                           args.seconds) for t in args.threads]
    flops = train_flops_per_token(p["n_layer"], p["n_embd"], args.vocab, args.seq_len)
    for row in rows:
        row["tokens_per_s_at_ceiling"] = row["model_gemm_flops"] / flops
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    record(Path("bench/results/limits.json"), {"args": vars(args), "flops_per_token": flops, "ceilings": rows},
           start, max(args.threads), args.force)


if __name__ == "__main__":
    main()

"""Why serving computes on one thread (`lacy.core.compute`): SmolLM2 forwards on one thread vs on a second.

    .venv/bin/python -m bench.threads

Each case in a fresh process (OpenMP pools live as long as their threads): ten forwards of 32 tokens,
median of 4 repeats, at `--threads` torch threads (a) on the only thread that ever computes, (b) on
a second thread after the main thread has computed, (c) at 1 thread. libgomp keeps idle workers
spinning only while it manages no more threads than CPUs, so (b) pays a wake-up per parallel region.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.limits import load_guard, record  # noqa: E402

CASE = r"""
import json, statistics, sys, threading, time
import torch
from lacy.model import load_big_model
case, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
ids = torch.randint(0, 1000, (1, 32))
out = {}

def forwards(model):
    times = []
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(4):
            start = time.perf_counter()
            for _ in range(10):
                model(ids)
            times.append(time.perf_counter() - start)
    out["seconds"] = statistics.median(times)

def alone():
    forwards(load_big_model("smollm2")[0])

if case == "second":
    model = load_big_model("smollm2")[0]
    with torch.inference_mode():
        model(ids)  # the main thread computes: it owns a pool from now on
    worker = threading.Thread(target=forwards, args=(model,))
else:
    worker = threading.Thread(target=alone)
worker.start()
worker.join()
print(json.dumps(out))
"""


def run_case(case: str, threads: int) -> float:
    proc = subprocess.run([sys.executable, "-c", CASE, case, str(threads)], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--force", action="store_true", help="run and write on a busy machine (marked under_load)")
    args = parser.parse_args()
    start = load_guard(args.force)
    one = run_case("alone", args.threads)
    second = run_case("second", args.threads)
    single = run_case("alone", 1)
    result = {"threads": args.threads, "one_computing_thread_s": one, "second_thread_s": second,
              "one_torch_thread_s": single, "second_over_one": second / one, "one_thread_over_one": single / one}
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    record(Path("bench/results/threads.json"), result, start, force=args.force)


if __name__ == "__main__":
    main()

"""bench.gpu_check is the script the first session with a GPU runs: its --dry-run takes the same code
paths on the CPU, so a refactor that breaks one shows here, not on a lent device (the cascade check once
built a Cascade on the pre-`BigModel` interface and failed only there)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lacy.core.paths import REPO_ROOT


@pytest.mark.slow
def test_every_gpu_check_passes_on_the_cpu_dry_run():
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert any("cascade on GPU" in line and "batch_people_per_s" in line for line in lines)
    assert lines and all(line.startswith("PASS") for line in lines), "\n".join(lines)

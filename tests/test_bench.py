"""The benchmarks' own arithmetic and guards (bench.limits): FLOP counts, load refusal."""

from __future__ import annotations

import json

import pytest
import torch

from bench.limits import Load, gemm_shapes, load_guard, record, train_flops_per_token
from lacy.core.config import PRESETS
from lacy.model import gpt2_config


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_flops_count_the_models_own_gemm_weights(preset):
    """6 N counts exactly the weights that take part in a GEMM: every block matrix and the LM head
    (tied to the token embedding), not biases, LayerNorms or position embeddings."""
    from transformers import GPT2LMHeadModel

    vocab, seq_len = 1031, 64
    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(preset, vocab, seq_len))
    gemm = sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and "wpe" not in name)  # wte is the LM head's weight
    p = PRESETS[preset]
    attention = 12 * p["n_layer"] * seq_len * p["n_embd"]
    assert train_flops_per_token(p["n_layer"], p["n_embd"], vocab, seq_len) == 6 * gemm + attention
    # The bench's GEMM list does the same work per token, forward: 2 x (weights + attention).
    shapes = gemm_shapes(p["n_layer"], p["n_embd"], p["n_head"], vocab, batch=2, seq_len=seq_len)
    forward = sum(2 * count * m * k * n for count, m, k, n in shapes) / (2 * seq_len)
    assert forward == 2 * gemm + attention / 3


def test_load_guard_refuses_a_busy_machine(monkeypatch, capsys):
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 8.0, 7.0))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with pytest.raises(SystemExit, match="refusing to benchmark.*4.50 per core"):
        load_guard()
    assert load_guard(force=True).per_core == 4.5
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.4, 0.3))
    assert load_guard().idle
    assert "load average 0.50" in capsys.readouterr().out


def test_record_writes_only_idle_results(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    busy, idle = Load(6.0, 6.0, 6.0, 2), Load(0.2, 0.2, 0.2, 2)
    monkeypatch.setattr("os.getloadavg", lambda: (3.5, 2.0, 1.0))  # the bench's own 2 threads + 1.5 others
    out = tmp_path / "r.json"
    assert record(out, {"x": 1}, busy)["under_load"] and not out.exists()
    assert record(out, {"x": 1}, busy, force=True)["under_load"] and json.loads(out.read_text())["under_load"]
    out.unlink()
    assert record(out, {"x": 1}, idle, own_threads=2)["under_load"] is False
    assert json.loads(out.read_text())["load_start"]["one"] == 0.2
    monkeypatch.setattr("os.getloadavg", lambda: (6.5, 4.0, 2.0))  # others took the cores meanwhile
    out.unlink()
    assert record(out, {"x": 1}, idle, own_threads=2)["under_load"] and not out.exists()


def test_process_sampler_sees_a_busy_and_an_idle_process():
    import subprocess
    import sys
    import time

    from bench.limits import ProcessSampler

    spin = subprocess.Popen([sys.executable, "-c", "import sys; x = bytearray(50 << 20)\nwhile True: pass",
                             "lacy-test-spin"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "lacy-test-idle"])
    group = lambda title: next((n for n in ("lacy-test-spin", "lacy-test-idle") if title.endswith(n)), None)
    try:
        with ProcessSampler(group, every=0.1) as sampler:
            start = time.time()
            time.sleep(2.0)
        end = time.time()
    finally:
        spin.kill()
        idle.kill()
    assert sampler.groups() == ["lacy-test-idle", "lacy-test-spin"]
    assert sampler.cpu_share("lacy-test-spin", start, end) > 0.3  # one core, less what others took
    assert sampler.cpu_share("lacy-test-idle", start, end) < 0.1
    assert sampler.peak_rss("lacy-test-spin") > 50 << 20 > sampler.peak_rss("lacy-test-idle")

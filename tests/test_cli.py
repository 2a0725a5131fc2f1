"""The `lacy` command: a subcommand per stage, `--ray` where a Ray version exists, each `--help` listing its
own stage's fields; installed as a console script from the package's metadata; `python -m` unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, main, module_of, run
from lacy.core.config import load_config
from lacy.shards.format import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _help(*args: str) -> str:
    """`lacy ARGS --help` as its own process (what a user sees), and whether it imported Ray."""
    code = ("import sys\nfrom jobs.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('RAY IMPORTED' if 'ray' in sys.modules else 'NO RAY')")
    out = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_each_help_lists_its_own_stages_fields():
    train = _help("train")
    assert train.startswith("usage: lacy train [--ray] --config FILE") and "(python -m lacy.train)" in train
    for needle in ("--train.lr", "--labels.rule", "--model.init_from", "--score.output_dir", "--run_dir"):
        assert needle in train, needle
    for absent in ("--serve.port", "--eval.entities", "--big.base_url", "--llm_judge.base_url"):
        assert absent not in train, absent
    assert train.rstrip().endswith("NO RAY")  # the one-process stage never imports Ray
    serve = _help("serve")
    assert "--serve.port" in serve and "--big.base_url" in serve and "--train.lr" not in serve
    assert "(python -m jobs.pretrain)" in _help("train", "--ray")
    experiment = _help("experiment")
    assert all(f"--{s}." in experiment for s in ("train", "serve", "eval", "llm_judge", "mlflow"))
    assert "--small PATH" in _help("calibrate") and "--train.lr" not in _help("calibrate")


def test_commands_and_their_refusals(capsys):
    assert module_of("score", False) == "lacy.shards.scoring" and module_of("score", True) == "jobs.score"
    assert module_of("sweep", True) == "jobs.sweep" and module_of("serve", False) == "services.cascade"
    with pytest.raises(SystemExit, match="lacy calibrate: there is no Ray version"):
        main(["calibrate", "--ray", "--config", "configs/tiny.yaml"])
    with pytest.raises(SystemExit, match="unknown command 'pretrain'"):
        main(["pretrain"])
    with pytest.raises(SystemExit):
        main([])
    assert "commands:" in capsys.readouterr().out
    for command, (local, ray, _) in COMMANDS.items():  # every module a command names exists and has main(argv)
        for module in {local, ray} - {None}:
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            assert "def main(argv: list[str] | None = None" in source, (command, module)


def test_lacy_score_and_train_run_the_stages(tmp_path):
    over = ["--config", "configs/tiny.yaml", "--run_dir", str(tmp_path), "--data.max_docs", "60",
            "--train.max_steps", "2", "--mlflow.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]
    manifest = run(["score", *over])
    assert manifest == read_manifest(tmp_path / "shards") and manifest.counts["train"]["docs"] > 40
    summary = run(["train", *over, "--labels.rule", "lacy"])
    assert summary["steps"] == 2 and (tmp_path / "train" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_console_script_installs_from_the_package_and_runs_on_ray(tmp_path):
    """The wheel's metadata names the script; pip installs it; `lacy score --ray` (jobs.score on Ray Data)
    writes the shards the one-process stage writes."""
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {"lacy": "jobs.cli:main"}
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(ROOT)],
                   check=True, timeout=300, cwd=tmp_path)
    [wheel] = (tmp_path / "wheel").glob("lacy-*.whl")
    # --target, not --prefix: pip then ignores what is installed, where --prefix uninstalls the environment's
    # own (editable) lacy first.
    site = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    script = site / "bin" / "lacy"
    assert script.read_text().startswith(f"#!{sys.executable}")
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this checkout
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--data.max_docs", "40", "--score.spacy_actors", "1",
              "--mlflow.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]
    for flag, name in (([], "local"), (["--ray"], "ray")):
        out = subprocess.run([str(script), "score", *flag, *common, "--run_dir", str(tmp_path / name)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    local, ray = (json.loads((tmp_path / name / "shards" / "manifest.json").read_text()) for name in ("local", "ray"))
    assert local["counts"] == ray["counts"] and local["corpus_fingerprint"] == ray["corpus_fingerprint"]
    for part in (tmp_path / "local" / "shards" / "train").glob("*.parquet"):
        assert part.read_bytes() == (tmp_path / "ray" / "shards" / "train" / part.name).read_bytes()
    assert load_config(tmp_path / "ray" / "shards" / "config.yaml").data.max_docs == 40


def test_a_stage_run_as_a_module_shows_its_progress_lines():
    """`python -m lacy.experiment` runs the module as __main__, so its logger is "__main__": its stage lines
    ("stage 4, train ...") were silently dropped while the same stage run from the sweep showed them."""
    code = ("import logging; from lacy.core.console import setup_logging; setup_logging(); "
            "logging.getLogger('__main__').info('stage 4, train')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "__main__: stage 4, train" in out.stderr


def test_an_unreachable_tracking_server_is_named_at_once(tmp_path, monkeypatch):
    """`source cluster/env.sh` points MLFLOW_TRACKING_URI at a server; when none runs, the stage says so
    before it does any work instead of MLflow's client retrying for minutes."""
    from llama_server import free_port

    from lacy.core.config import ConfigError
    from lacy.core.tracking import start_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the old code fails fast too, but unnamed
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config("configs/tiny.yaml", ["--run_dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match=f"MLflow server at {uri}.*does not answer.*cluster/mlflow_server.sh"):
        with start_run(cfg, "unreached"):
            pass

"""`python -m lacy.experiment --until train --reuse_shards`: every rule of an experiment trained without
Ray, DeepSpeed, MLflow or spaCy (what a lent GPU box has), from shards copied away from their
tokenizer's recorded path, leaving models and stage records that the full experiment reuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lacy.core.config import load_config

BLOCKED = ("ray", "deepspeed", "mlflow", "spacy", "fastapi", "starlette", "matplotlib", "httpx", "psutil")
"""What the GPU machine's image lacks: importing any of them fails in the subprocess."""


@pytest.fixture(scope="module")
def run_dir(scored_run, tmp_path_factory) -> Path:
    """A copy of the library-built shards whose manifest's tokenizer path no longer exists; the
    tokenizer sits beside the shards (where the scoring stage puts it)."""
    source = Path(scored_run[scored_run.index("--run_dir") + 1])
    run = tmp_path_factory.mktemp("gpu_box")
    shutil.copytree(source / "shards", run / "shards")
    shutil.copytree(source / "tokenizer", run / "tokenizer")
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    manifest["tokenizer_path"] = "/elsewhere/tokenizer"
    (run / "shards" / "manifest.json").write_text(json.dumps(manifest))
    return run


def _overrides(run: Path) -> list[str]:
    return ["--run_dir", str(run), "--model.seq_len", "32", "--train.max_steps", "4", "--train.log_every", "2",
            "--train.eval_every", "4", "--experiment.rules", "[plain, lacy]",
            "--experiment.comparisons", "[steps, tokens]"]


def test_trains_every_rule_without_the_cluster_stack_and_the_experiment_reuses_them(run_dir):
    code = (f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
            "from lacy.experiment import main; main(sys.argv[1:])")
    args = ["--config", "configs/tiny.yaml", *_overrides(run_dir), "--until", "train", "--reuse_shards",
            "--save_dtype", "bfloat16", "--max_shard_mb", "0.2"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    train = run_dir / "train"
    assert sorted(p.name for p in train.iterdir()) == ["lacy-steps", "lacy-tokens", "plain-steps"]
    plain = json.loads((train / "plain-steps" / "stage.json").read_text())
    lacy_tokens = json.loads((train / "lacy-tokens" / "stage.json").read_text())
    assert plain["trainer"] == "lacy.experiment" and plain["steps"] == 4
    # Token equalisation: lacy trains until it has supervised as many real tokens as plain did, and
    # its schedule ends at the floor as plain's does.
    assert lacy_tokens["supervised_tokens"] >= plain["supervised_tokens"] and lacy_tokens["steps"] > 4
    assert lacy_tokens["budget_reached"] and lacy_tokens["final_lr_factor"] == pytest.approx(plain["final_lr_factor"])
    final = train / "lacy-steps" / "final"
    assert (final / "model.safetensors.index.json").is_file() and len(list(final.glob("*.safetensors"))) > 1

    from lacy.experiment import train_all, train_stage
    from lacy.model import load_small_model
    from lacy.shards.format import read_manifest

    model, tok = load_small_model(str(final))  # fp32 again, from bf16 shards
    assert next(model.parameters()).dtype.is_floating_point and "<CALL>" in tok.get_vocab()
    cfg = load_config("configs/tiny.yaml", _overrides(run_dir))

    def never(rcfg):
        raise AssertionError(f"{rcfg.labels.rule} trained again")

    manifest_hash = read_manifest(run_dir / "shards").config_hash
    trained = train_all(cfg, lambda rule, comparison, budget, seed: train_stage(
        cfg, rule, comparison, budget, manifest_hash, never, seed))
    assert set(trained) == {"plain-steps", "plain-tokens", "lacy-steps", "lacy-tokens"}
    assert trained["lacy-steps"]["final"] == str(final)


def test_a_subset_needs_plain_for_token_budgets(run_dir, tmp_path):
    from lacy.experiment import LocalBackend, run

    fresh = tmp_path / "run"
    shutil.copytree(run_dir / "shards", fresh / "shards")
    shutil.copytree(run_dir / "tokenizer", fresh / "tokenizer")
    cfg = load_config("configs/tiny.yaml", _overrides(fresh))
    with pytest.raises(ValueError, match="train plain first"):
        run(cfg, LocalBackend(reuse_shards=True), until="train", rules=["lacy"])
    with pytest.raises(ValueError, match="not among experiment.rules"):
        run(cfg, LocalBackend(reuse_shards=True), until="train", rules=["loss"])


def test_a_different_tokenizer_is_refused(run_dir, tmp_path, embedded_docs):
    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.shards.format import load_shard_tokenizer

    shutil.copytree(run_dir / "shards", tmp_path / "shards")
    train_tokenizer([d["text"] for d in embedded_docs[:50]], 512, tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="not the one the shards"):
        load_shard_tokenizer(tmp_path / "shards")
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="/elsewhere/tokenizer"):
        load_shard_tokenizer(tmp_path / "shards")


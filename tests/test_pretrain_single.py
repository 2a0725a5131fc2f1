"""jobs.pretrain_single: every rule of an experiment trained without Ray, DeepSpeed, MLflow or spaCy
(what a lent GPU box has), from shards copied away from their tokenizer's recorded path, leaving
models and stage records that jobs.experiment reuses instead of training again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lacy.config import FactsConfig, LacyConfig, load_config, to_dict
from lacy.facts import FactTagger
from lacy.shards import SCHEMA_VERSION, Manifest, encode_documents, pack_documents, write_shard
from lacy.tokenizer import EOS_TOKEN, tokenizer_hash

SEQ_LEN = 64
BLOCKED = ("ray", "deepspeed", "mlflow", "spacy")
"""What the GPU machine's image lacks: importing any of them fails in the subprocess."""


@pytest.fixture(scope="module")
def run_dir(embedded_docs, tiny_tokenizer, tmp_path_factory) -> Path:
    """<run_dir>/shards with a manifest whose tokenizer path no longer exists, and <run_dir>/tokenizer."""
    run = tmp_path_factory.mktemp("run")
    docs = encode_documents(embedded_docs[:80], tiny_tokenizer, FactTagger(FactsConfig()), val_fraction=0.2)
    eos = tiny_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    shards = run / "shards"
    for split in ("train", "val"):
        write_shard(list(pack_documents([d for d in docs if d.split == split], SEQ_LEN, eos)),
                    shards / f"{split}/part-00000.parquet")
    tiny_tokenizer.save_pretrained(run / "tokenizer")
    Manifest(schema_version=SCHEMA_VERSION, config=to_dict(LacyConfig()), config_hash="shards-v1",
             tokenizer_hash=tokenizer_hash(tiny_tokenizer), tokenizer_path="/elsewhere/tokenizer", spacy={},
             corpus_fingerprint="test", seq_len=SEQ_LEN, judge_top_k=None, counts={}, rejects={},
             shards={"train": ["train/part-00000.parquet"], "val": ["val/part-00000.parquet"]}).save(shards)
    return run


def _overrides(run: Path) -> list[str]:
    return ["--run_dir", str(run), "--model.seq_len", str(SEQ_LEN), "--train.max_steps", "4",
            "--train.log_every", "2", "--train.eval_every", "4", "--experiment.rules", "[plain, lacy]",
            "--experiment.comparisons", "[steps, tokens]"]


def test_trains_every_rule_without_the_cluster_stack_and_the_experiment_reuses_them(run_dir):
    code = (f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
            "from jobs.pretrain_single import main; main(sys.argv[1:])")
    args = ["--config", "configs/tiny.yaml", *_overrides(run_dir), "--save_dtype", "bfloat16",
            "--max_shard_mb", "0.2"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    train = run_dir / "train"
    assert sorted(p.name for p in train.iterdir()) == ["lacy-steps", "lacy-tokens", "plain-steps"]
    plain = json.loads((train / "plain-steps" / "stage.json").read_text())
    lacy_tokens = json.loads((train / "lacy-tokens" / "stage.json").read_text())
    assert plain["trainer"] == "jobs.pretrain_single" and plain["step"] == 4
    # Token equalisation: lacy trains until it has supervised as many real tokens as plain did.
    assert lacy_tokens["supervised_tokens"] >= plain["supervised_tokens"] and lacy_tokens["step"] > 4
    final = train / "lacy-steps" / "final"
    assert (final / "model.safetensors.index.json").is_file() and len(list(final.glob("*.safetensors"))) > 1

    from lacy.model import load_big_model

    model, tok = load_big_model(str(final))  # fp32 again, from bf16 shards
    assert next(model.parameters()).dtype.is_floating_point and "<CALL>" in tok.get_vocab()

    from jobs.experiment import train_all, train_stage

    cfg = load_config("configs/tiny.yaml", _overrides(run_dir))

    def never(rcfg):
        raise AssertionError(f"{rcfg.labels.rule} trained again")

    trained = train_all(cfg, lambda rule, comparison, budget: train_stage(
        cfg, rule, comparison, budget, "shards-v1", never))
    assert set(trained) == {"plain-steps", "plain-tokens", "lacy-steps", "lacy-tokens"}
    assert trained["lacy-steps"]["final"] == str(final)


def test_a_subset_needs_plain_for_token_budgets(run_dir, tmp_path):
    from jobs.pretrain_single import run

    fresh = tmp_path / "run"
    shutil.copytree(run_dir / "shards", fresh / "shards")
    shutil.copytree(run_dir / "tokenizer", fresh / "tokenizer")
    cfg = load_config("configs/tiny.yaml", _overrides(fresh))
    with pytest.raises(ValueError, match="train plain first"):
        run(cfg, rules=["lacy"])
    with pytest.raises(ValueError, match="not among experiment.rules"):
        run(cfg, rules=["rho"])


def test_a_different_tokenizer_is_refused(run_dir, tmp_path, embedded_docs):
    from lacy.shards import load_shard_tokenizer
    from lacy.tokenizer import train_tokenizer

    shutil.copytree(run_dir / "shards", tmp_path / "shards")
    train_tokenizer([d["text"] for d in embedded_docs[:50]], 512, tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="not the one the shards"):
        load_shard_tokenizer(tmp_path / "shards")
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="/elsewhere/tokenizer"):
        load_shard_tokenizer(tmp_path / "shards")

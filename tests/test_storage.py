"""A run kept in an object store (`run_dir: s3://...`): a real S3 server over HTTP (moto's, on loopback)
and pyarrow's S3 client. Every stage pulls what it reads into its node's mirror and pushes what it
wrote; a machine with an empty mirror reuses everything the store holds; Ray Train checkpoints there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lacy.core.config import load_config


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 endpoint with one bucket; yields a function giving a fresh run URI in it."""
    import itertools

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://lacy-test?{query}&allow_bucket_creation=true")
    fs.create_dir("lacy-test")
    counter, given = itertools.count(), []

    def new_run() -> str:
        given.append(f"s3://lacy-test/run{next(counter)}?{query}")
        return given[-1]

    yield new_run
    server.stop()
    from lacy.core.paths import mirror_dir

    for uri in given:  # the mirrors live in the user cache
        shutil.rmtree(mirror_dir(uri), ignore_errors=True)


def _objects(uri: str) -> set[str]:
    import pyarrow.fs as pafs

    from lacy.core.storage import filesystem

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_mirrors_move_only_what_changed(s3, tmp_path):
    from lacy.core.storage import Mirror

    uri, a, b = s3(), tmp_path / "a", tmp_path / "b"
    for name, text in {"shards/x.bin": "1", "shards/y.bin": "22", "train/r/ray/ckpt": "no", "z/.w.tmp": "no"}.items():
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (a / name).write_text(text)
    writer = Mirror(uri, a)
    assert writer.push() == 2 and writer.push() == 0
    assert _objects(uri) == {"shards/x.bin", "shards/y.bin"}  # no Ray Train storage, no half-written files
    (a / "shards/x.bin").write_text("333")
    assert writer.push() == 1
    reader = Mirror(uri, b)
    assert reader.pull(b / "shards" / "x.bin") == 1 and (b / "shards/x.bin").read_text() == "333"
    assert reader.pull() == 1 and reader.pull() == 0 and (b / "shards/y.bin").read_text() == "22"
    (b / "shards/y.bin").write_text("local, not pushed yet")
    assert reader.pull() == 0 and (b / "shards/y.bin").read_text() == "local, not pushed yet"
    assert reader.pull(b / "missing") == 0


def test_only_run_dir_may_be_a_uri(s3) -> None:
    from lacy.core.config import ConfigError
    from lacy.core.paths import mirror_dir

    uri = s3()
    cfg = load_config("configs/tiny.yaml", ["--run_dir", uri])
    assert cfg.store == uri and cfg.run_dir == str(mirror_dir(uri))
    assert cfg.score.output_dir == str(Path(cfg.run_dir) / "shards")
    moved = cfg.moved(Path(cfg.run_dir) / "people-10")
    assert moved.store.startswith(uri.split("?")[0] + "/people-10?") and moved.run_dir == str(mirror_dir(moved.store))
    with pytest.raises(ConfigError, match="score.output_dir.*only run_dir"):
        load_config("configs/tiny.yaml", ["--score.output_dir", uri])


def _tiny(uri: str, *extra: str):
    return load_config("configs/tiny.yaml", ["--run_dir", uri, "--data.max_docs", "120", "--train.max_steps", "4",
                                             "--train.eval_every", "2", "--train.checkpoint_every", "2",
                                             "--experiment.rules", "[plain, lacy]", *extra])


class _NoTraining:
    """A backend for the second machine: building shards is allowed (they must be reused), training not."""

    def __init__(self) -> None:
        from lacy.experiment import LocalBackend

        self.local = LocalBackend()

    def build_shards(self, cfg, parent_run_id):
        return self.local.build_shards(cfg, parent_run_id)

    def train(self, rcfg, parent_run_id):
        raise AssertionError(f"{rcfg.labels.rule} trained again although the store holds it")


def test_experiment_in_a_store_is_reused_by_a_machine_with_an_empty_mirror(s3, caplog) -> None:
    import logging

    from lacy.cascade.big import Retrieval, build_big
    from lacy.corpus.corpora import corpus_for
    from lacy.experiment import knowledge_stage, run
    from lacy.serve.engine import CascadeEngine

    uri = s3()
    cfg = _tiny(uri)
    run(cfg, until="train")
    knowledge_stage(cfg, corpus_for(cfg))
    stored = _objects(uri)
    for name in ("config.yaml", "shards/manifest.json", "tokenizer/tokenizer.json", "knowledge.sqlite",
                 "knowledge/stage.json", "train/plain-steps/stage.json", "train/lacy-steps/final/model.safetensors",
                 "train/lacy-steps/final/tokenizer.json", "train/lacy-steps/metrics.jsonl"):
        assert name in stored, name

    shutil.rmtree(cfg.run_dir)  # a second machine: nothing local, the same URI
    with caplog.at_level(logging.INFO, logger="lacy"):
        run(_tiny(uri), _NoTraining(), until="train")
    assert "in 2 units; 2 already done" in caplog.text
    assert caplog.text.count("done before") == 2

    shutil.rmtree(cfg.run_dir)  # Serve replicas on a node that never saw the run
    final = str(Path(cfg.run_dir) / "train" / "lacy-steps" / "final")
    engine = CascadeEngine(_tiny(uri, "--serve.small_path", final), big=None)
    assert "lacy" in engine.models and Path(final, "model.safetensors").is_file()
    assert isinstance(build_big(_tiny(uri, "--big.retrieval", "true")), Retrieval)  # found its store
    assert Path(cfg.knowledge.db_path).is_file()


def test_ray_jobs_read_and_write_through_the_store(s3, ray_session, mlflow_uri) -> None:
    """Scoring actors load the tokenizer from the store, Ray Train workers the shards (the driver's
    mirror emptied in between), checkpoints go straight to the store, the final model is pushed."""
    from jobs import pretrain, score

    uri = s3()
    cfg = _tiny(uri, "--mlflow.tracking_uri", mlflow_uri, "--score.spacy_actors", "1",
                "--labels.rule", "lacy", "--train.cpus_per_worker", "1")
    score.run(cfg)
    assert {"shards/manifest.json", "tokenizer/tokenizer.json"} <= _objects(uri)
    shutil.rmtree(cfg.run_dir)
    final = pretrain.run(cfg)
    stored = _objects(uri)
    checkpoints = {n.split("/")[3] for n in stored if n.startswith("train/ray/pretrain/checkpoint_")}
    assert len(checkpoints) >= 1, sorted(stored)[:20]
    assert "train/final/model.safetensors" in stored and "train/config.yaml" in stored
    assert Path(final, "model.safetensors").is_file()
    assert any(Path(cfg.score.output_dir).glob("train/*.parquet")), "the worker pulled no shards"

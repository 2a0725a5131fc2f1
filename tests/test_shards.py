"""lacy.shards.format: packing (hand-computed), Parquet schema, manifest, seeded batches, encode_documents."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lacy.core.config import FactsConfig
from lacy.shards.format import (
    SCHEMA_VERSION,
    Manifest,
    TokenizedDoc,
    pack_documents,
    read_batches,
    read_manifest,
    read_shard,
    rows_to_table,
    write_shard,
)
from lacy.shards.scoring import encode_documents

EOS, PAD = 0, 1


def doc(doc_id: str, ids: list[int], fact: list[bool] | None = None, ref: list[float] | None = None,
        judge: list[list[int]] | None = None) -> TokenizedDoc:
    n = len(ids)
    return TokenizedDoc(id=doc_id, title=doc_id.upper(), split="train", ids=np.array(ids, np.int32),
                        fact=np.array(fact if fact is not None else [False] * n),
                        offsets=np.zeros((n, 2), np.int32),
                        ref_loss=None if ref is None else np.array(ref, np.float32),
                        judge_accept=None if judge is None else np.array(judge, np.int32))


# ----------------------------------------------------------------------------------------------
# Packing


def test_pack_hand_computed_with_padding():
    # stream: 5 6 7 EOS | 8 9 EOS  -> L = 4: [5 6 7 EOS] [8 9 EOS PAD]
    docs = [doc("a", [5, 6, 7], [True, False, True]), doc("b", [8, 9], [False, True])]
    rows = list(pack_documents(docs, seq_len=3, eos_id=EOS, pad_id=PAD))
    assert [r["input_ids"].tolist() for r in rows] == [[5, 6, 7, EOS], [8, 9, EOS, PAD]]
    assert [r["fact"].tolist() for r in rows] == [[True, False, True, False], [False, True, False, False]]
    assert [r["doc_ids"] for r in rows] == [["a"], ["b"]]
    assert all(r["input_ids"].dtype == np.int32 for r in rows)
    # Without a pad id the partial tail is dropped.
    assert [r["input_ids"].tolist() for r in pack_documents(docs, 3, EOS)] == [[5, 6, 7, EOS]]


def test_pack_document_spanning_rows_and_optional_columns():
    # stream: 1 2 3 4 5 6 EOS | 7 EOS -> L = 3: [1 2 3] [4 5 6] [EOS 7 EOS]
    docs = [doc("long", [1, 2, 3, 4, 5, 6], ref=[0.5] * 6, judge=[[i, -1] for i in range(6)]),
            doc("short", [7], ref=[2.0], judge=[[9, 8]])]
    rows = list(pack_documents(docs, seq_len=2, eos_id=EOS, pad_id=PAD))
    assert [r["input_ids"].tolist() for r in rows] == [[1, 2, 3], [4, 5, 6], [EOS, 7, EOS]]
    assert [r["doc_ids"] for r in rows] == [["long"], ["long"], ["long", "short"]]
    last = rows[2]
    np.testing.assert_array_equal(np.isnan(last["ref_loss"]), [True, False, True])
    assert last["ref_loss"][1] == 2.0
    assert last["judge_accept"].tolist() == [-1, -1, 9, 8, -1, -1]  # row-major [L, k], EOS rows -1
    assert rows[0]["judge_accept"].tolist() == [0, -1, 1, -1, 2, -1]


def test_pack_is_deterministic_and_loses_no_token():
    rng = np.random.default_rng(0)
    docs = [doc(f"d{i}", rng.integers(2, 100, rng.integers(1, 40)).tolist()) for i in range(30)]
    rows = list(pack_documents(docs, seq_len=15, eos_id=EOS, pad_id=PAD))
    again = list(pack_documents(docs, seq_len=15, eos_id=EOS, pad_id=PAD))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, again, strict=True))
    stream = np.concatenate([r["input_ids"] for r in rows])
    expected = np.concatenate([np.append(d.ids, EOS) for d in docs])
    np.testing.assert_array_equal(stream[:len(expected)], expected)
    assert set(stream[len(expected):].tolist()) <= {PAD} and len(stream) - len(expected) < 16


def test_pack_refuses_mixed_scoring():
    with pytest.raises(ValueError, match="scored alike"):
        list(pack_documents([doc("a", [1], ref=[1.0]), doc("b", [2])], 3, EOS, PAD))


# ----------------------------------------------------------------------------------------------
# Parquet, manifest, batches


def make_shard_dir(tmp_path, n_rows: int = 10, seq_len: int = 7, with_ref: bool = True):
    """n_rows rows whose first token is the row number; two shards; a manifest."""
    length = seq_len + 1
    rows = [{"input_ids": np.full(length, i, np.int32), "fact": np.arange(length) % 2 == 0,
             **({"ref_loss": np.full(length, i / 10, np.float32)} if with_ref else {}),
             "judge_accept": np.arange(length * 2, dtype=np.int32), "doc_ids": [f"d{i}"]}
            for i in range(n_rows)]
    write_shard(rows[:4], tmp_path / "train" / "part-00000.parquet")
    write_shard(rows[4:], tmp_path / "train" / "part-00001.parquet")
    Manifest(schema_version=SCHEMA_VERSION, config={}, config_hash="x", tokenizer_hash="t", tokenizer_path="",
             spacy={}, corpus_fingerprint="f", seq_len=seq_len, judge_top_k=2,
             counts={"train": {"sequences": n_rows}}, rejects={},
             shards={"train": ["train/part-00000.parquet", "train/part-00001.parquet"], "val": []},
             ).save(tmp_path)
    return rows


def test_shard_schema_and_roundtrip(tmp_path):
    rows = make_shard_dir(tmp_path)
    table = read_shard(tmp_path / "train" / "part-00001.parquet")
    kinds = {f.name: f.type.value_type for f in table.schema}
    assert kinds == {"input_ids": pa.int32(), "fact": pa.bool_(), "ref_loss": pa.float32(),
                     "judge_accept": pa.int32(), "doc_ids": pa.string()}
    assert table.num_rows == 6
    assert table.column("judge_accept")[0].as_py() == rows[4]["judge_accept"].tolist()
    assert pq.read_schema(tmp_path / "train" / "part-00000.parquet").metadata[b"lacy.schema_version"] == b"1"
    assert read_manifest(tmp_path).seq_len == 7
    assert not list(tmp_path.glob("train/.*tmp")), "temp files must be renamed away"


def test_read_batches_shapes_permutation_and_resume(tmp_path):
    make_shard_dir(tmp_path, n_rows=10)
    batches = list(read_batches(tmp_path, "train", batch_size=4, seed=3))
    assert [b["input_ids"].shape for b in batches] == [(4, 8), (4, 8), (2, 8)]
    first = batches[0]
    assert first["input_ids"].dtype == torch.long and first["fact"].dtype == torch.bool
    assert first["ref_loss"].dtype == torch.float32 and first["judge_accept"].shape == (4, 8, 2)
    order = torch.cat([b["input_ids"][:, 0] for b in batches]).tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10))  # each row once, shuffled
    # ref_loss travels with its row
    assert torch.allclose(first["ref_loss"][:, 0], first["input_ids"][:, 0].float() / 10)
    same = torch.cat([b["input_ids"][:, 0] for b in read_batches(tmp_path, "train", 4, seed=3)]).tolist()
    assert same == order
    other = torch.cat([b["input_ids"][:, 0] for b in read_batches(tmp_path, "train", 4, seed=4)]).tolist()
    assert other != order
    resumed = torch.cat([b["input_ids"][:, 0] for b in read_batches(tmp_path, "train", 4, seed=3,
                                                                     start_row=6)]).tolist()
    assert resumed == order[6:]


def test_read_batches_loop_crosses_epochs(tmp_path):
    make_shard_dir(tmp_path, n_rows=10, with_ref=False)
    stream = read_batches(tmp_path, "train", batch_size=4, seed=0, loop=True)
    rows = torch.cat([next(stream)["input_ids"][:, 0] for _ in range(5)]).tolist()  # 20 rows = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # each epoch its own permutation
    resumed = read_batches(tmp_path, "train", batch_size=4, seed=0, start_row=12, loop=True)
    assert next(resumed)["input_ids"][:, 0].tolist() == rows[12:16]
    assert "ref_loss" not in next(resumed)


def test_bad_versions_and_missing_split_are_named(tmp_path):
    make_shard_dir(tmp_path)
    with pytest.raises(ValueError, match="no val sequences"):
        next(read_batches(tmp_path, "val", 2))
    with pytest.raises(ValueError, match="split must be"):
        next(read_batches(tmp_path, "test", 2))
    table = rows_to_table([{"input_ids": np.zeros(8, np.int32), "fact": np.zeros(8, bool), "doc_ids": []}])
    pq.write_table(table.replace_schema_metadata({b"lacy.schema_version": b"0"}), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="schema version"):
        read_shard(tmp_path / "old.parquet")
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(data, schema_version=99)))
    with pytest.raises(ValueError, match="schema version 99"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# encode_documents with real spaCy and a real tokenizer


@pytest.fixture(scope="module")
def tagger_and_tokenizer():
    from lacy.corpus.corpora import read_corpus
    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.labels.facts import FactTagger

    texts = [d["text"] for d in read_corpus("embedded", max_docs=200)]
    return FactTagger(FactsConfig()), train_tokenizer(texts, vocab_size=600)


def test_encode_documents_matches_tagger_and_rejects_bad_docs(tagger_and_tokenizer):
    from lacy.corpus.readers import split_of

    tagger, tok = tagger_and_tokenizer
    docs = [{"id": "1", "title": "Curie", "text": "Marie Curie was born in Warsaw in 1867."},
            {"id": "2", "title": "Empty", "text": ""},
            {"id": "3", "title": "Broken", "text": "Bad \ud800 surrogate"},  # the tokenizer cannot encode it
            {"id": "4", "title": "Plain", "text": "the cat sat on the mat"}]
    rejects: list[dict] = []
    encoded = encode_documents(docs, tok, tagger, val_fraction=0.5, rejects=rejects)
    assert [d.id for d in encoded] == ["1", "4"]
    assert {r["id"]: r["reason"].split(":")[0] for r in rejects} == {"2": "text shorter than 1 characters",
                                                                    "3": "tagging failed"}
    ids, fact, offsets, _ = tagger.tag([docs[0]["text"]], tok)[0]
    np.testing.assert_array_equal(encoded[0].ids, ids)
    np.testing.assert_array_equal(encoded[0].fact, fact)
    assert encoded[0].split == split_of("1", 0.5)
    text = docs[0]["text"]
    covered = np.zeros(len(text), bool)  # characters inside flagged tokens
    for (a, b), flag in zip(offsets, fact, strict=True):
        covered[a:b] |= flag
    for word, is_fact in (("Warsaw", True), ("1867", True), ("Marie", True), ("born", False)):
        start = text.index(word)
        assert covered[start:start + len(word)].all() == is_fact, word
    assert not encoded[1].fact.any()
    assert encoded[0].ref_loss is None and encoded[0].judge_accept is None
    assert set(asdict(encoded[0])) >= {"id", "title", "split", "ids", "fact", "ref_loss", "judge_accept"}

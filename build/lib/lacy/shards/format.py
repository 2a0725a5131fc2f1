"""Packed training sequences: the shard format, packing, Parquet I/O with a manifest, seeded batches.

Schema version 1. One Parquet row per training sequence of L = seq_len + 1 tokens (inputs `[:-1]`,
targets `[1:]`). Documents are each followed by `<|endoftext|>` and packed greedily, a document
continuing into the next row when it does not fit; the last partial row of a pack is padded with
`<pad>` (or dropped when `pad_id` is None). Columns (k = judge top-k):

    input_ids     list<int32>[L]
    fact          list<bool>[L]       token overlaps a spaCy fact word (EOS and pad: false)
    ref_loss      list<float32>[L]    reference-model loss in nats; NaN where unknown (optional)
    judge_accept  list<int32>[L*k]    row-major [L, k] our-vocab ids the judge accepts, -1 pad (optional)
    oracle        list<int8>[L]       exact attribute code of the token, 0 = none (optional: corpora
                                      with exact fact spans, lacy.labels.facts.ORACLE_ATTRIBUTES)
    doc_ids       list<string>        documents with tokens in the row, in order

Layout of an output directory (written by `lacy.shards.scoring.build_shards`, in one process or on Ray Data):

    train/part-00000.parquet ...   rows of training sequences, one file per unit of documents
    val/part-00000.parquet ...     same for validation (a unit without val documents has no file)
    docs.parquet                   per document: id, title, split, unit, tokens, fact_tokens
    manifest.json                  see `Manifest`
    units/part-00000.json          per-unit commit record (resume state); manifest is built from them
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lacy.corpus.tokenizer import load_tokenizer, tokenizer_hash

SCHEMA_VERSION = 1
SPLITS = ("train", "val")
_META_KEY = b"lacy.schema_version"


@dataclass
class TokenizedDoc:
    """One document, tokenised and fact-flagged; `offsets` (char ranges) align model scores to tokens."""

    id: str
    title: str
    split: str
    ids: np.ndarray                          # int32 [n]
    fact: np.ndarray                         # bool [n]
    offsets: np.ndarray                      # int32 [n, 2] character range of each token in the text
    ref_loss: np.ndarray | None = None       # float32 [n], NaN where undefined
    judge_accept: np.ndarray | None = None   # int32 [n, k], -1 pad
    oracle: np.ndarray | None = None         # int8 [n], exact attribute code (lacy.labels.facts.ORACLE_ATTRIBUTES)


# ----------------------------------------------------------------------------------------------
# Packing


def pack_documents(docs: Iterable[TokenizedDoc], seq_len: int, eos_id: int,
                   pad_id: int | None = None) -> Iterator[dict]:
    """Rows of L = seq_len + 1 tokens: documents each followed by EOS, concatenated, cut every L.

    The remainder after the last full row becomes a row padded with `pad_id` (fact false, ref_loss
    NaN, judge -1), or is dropped when `pad_id` is None. Deterministic: same docs, same rows.
    """
    length = seq_len + 1
    chunks: dict[str, list[np.ndarray]] = {}
    owners: list[list[Any]] = []  # [doc id, its tokens not yet emitted], in stream order
    pending = 0
    columns: tuple[str, ...] | None = None
    k = 0
    for doc in docs:
        has = ("input_ids", "fact") + (("ref_loss",) if doc.ref_loss is not None else ()) + (
            ("judge_accept",) if doc.judge_accept is not None else ()) + (
            ("oracle",) if doc.oracle is not None else ())
        if columns is None:
            columns, chunks = has, {c: [] for c in has}
            k = doc.judge_accept.shape[1] if doc.judge_accept is not None else 0
        elif has != columns:
            raise ValueError(f"document {doc.id!r} has columns {has}, earlier documents {columns}: "
                             "all documents of a pack must be scored alike")
        chunks["input_ids"].append(np.append(doc.ids, eos_id).astype(np.int32))
        chunks["fact"].append(np.append(doc.fact, False))
        if doc.ref_loss is not None:
            chunks["ref_loss"].append(np.append(doc.ref_loss, np.nan).astype(np.float32))
        if doc.judge_accept is not None:
            if doc.judge_accept.shape[1] != k:
                raise ValueError(f"document {doc.id!r} has judge top-k {doc.judge_accept.shape[1]}, not {k}")
            chunks["judge_accept"].append(np.vstack([doc.judge_accept, np.full((1, k), -1, np.int32)]))
        if doc.oracle is not None:
            chunks["oracle"].append(np.append(doc.oracle, 0).astype(np.int8))
        owners.append([doc.id, len(doc.ids) + 1])
        pending += len(doc.ids) + 1
        if pending >= length:
            stream = {c: np.concatenate(v) for c, v in chunks.items()}
            start = 0
            while pending - start >= length:
                yield _row(stream, start, length, owners)
                start += length
            chunks = {c: [v[start:]] for c, v in stream.items()}
            pending -= start
    if pending and pad_id is not None and columns is not None:
        stream = {c: np.concatenate(v) for c, v in chunks.items()}
        pad = length - pending
        stream["input_ids"] = np.append(stream["input_ids"], np.full(pad, pad_id, np.int32))
        stream["fact"] = np.append(stream["fact"], np.zeros(pad, bool))
        if "ref_loss" in stream:
            stream["ref_loss"] = np.append(stream["ref_loss"], np.full(pad, np.nan, np.float32))
        if "judge_accept" in stream:
            stream["judge_accept"] = np.vstack([stream["judge_accept"], np.full((pad, k), -1, np.int32)])
        if "oracle" in stream:
            stream["oracle"] = np.append(stream["oracle"], np.zeros(pad, np.int8))
        yield _row(stream, 0, length, owners)


def _row(stream: dict[str, np.ndarray], start: int, length: int, owners: list[list[Any]]) -> dict:
    """Row `stream[start:start+length]`; consumes `owners` (doc id, tokens left) for its doc_ids."""
    row: dict[str, Any] = {c: v[start:start + length] for c, v in stream.items()}
    if "judge_accept" in row:
        row["judge_accept"] = row["judge_accept"].reshape(-1)
    doc_ids, need = [], length
    while need and owners:
        take = min(need, owners[0][1])
        doc_ids.append(owners[0][0])
        owners[0][1] -= take
        need -= take
        if owners[0][1] == 0:
            owners.pop(0)
    row["doc_ids"] = doc_ids
    return row


# ----------------------------------------------------------------------------------------------
# Parquet I/O


def _list_column(flat: np.ndarray, width: int, kind: pa.DataType) -> pa.Array:
    offsets = np.arange(0, len(flat) + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=kind))


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Packed rows -> an Arrow table with the schema above (schema version in its metadata)."""
    if not rows:
        raise ValueError("rows_to_table: no rows")
    length = len(rows[0]["input_ids"])
    kinds = {"input_ids": pa.int32(), "fact": pa.bool_(), "ref_loss": pa.float32(),
             "judge_accept": pa.int32(), "oracle": pa.int8()}
    arrays, names = [], []
    for name, kind in kinds.items():
        if name in rows[0]:
            width = len(rows[0][name])
            if name != "judge_accept" and width != length:
                raise ValueError(f"column {name} has {width} values per row, input_ids {length}")
            arrays.append(_list_column(np.concatenate([r[name] for r in rows]), width, kind))
            names.append(name)
    arrays.append(pa.array([r["doc_ids"] for r in rows], type=pa.list_(pa.string())))
    names.append("doc_ids")
    table = pa.Table.from_arrays(arrays, names=names)
    return table.replace_schema_metadata({_META_KEY: str(SCHEMA_VERSION).encode()})


def write_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write Parquet to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def write_shard(rows: list[dict], path: str | Path) -> Path:
    """Write packed rows as one Parquet shard, atomically."""
    return write_atomic(rows_to_table(rows), path)


def write_json_atomic(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_shard(path: str | Path) -> pa.Table:
    """One shard, after checking it carries this schema version."""
    table = pq.read_table(path)
    version = (table.schema.metadata or {}).get(_META_KEY)
    if version != str(SCHEMA_VERSION).encode():
        raise ValueError(f"{path}: shard schema version {version!r}, this code reads {SCHEMA_VERSION}; "
                         "rebuild the shards with jobs.score")
    return table


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass
class Manifest:
    """What a shard directory holds and how it was made; later stages read it, never recompute it."""

    schema_version: int
    config: dict
    """The resolved LacyConfig of the run that wrote the shards."""
    config_hash: str
    """Hash of everything that determines the shards' content (see `jobs.score.shard_config_hash`)."""
    tokenizer_hash: str
    tokenizer_path: str
    spacy: dict
    """`lacy.labels.facts.spacy_info`: model, version, spaCy version, components."""
    corpus_fingerprint: str
    """sha256 over the per-unit fingerprints (ids, titles and texts of the documents read)."""
    seq_len: int
    judge_top_k: int | None
    counts: dict[str, dict[str, int]]
    """Per split: docs, tokens (without EOS), fact_tokens, sequences."""
    rejects: dict
    """{"read": ReadReport.to_dict(), "encode": [{"id", "title", "reason"}], "total": int}"""
    shards: dict[str, list[str]] = field(default_factory=dict)
    """Per split, shard paths relative to the directory, in unit order."""

    def save(self, directory: str | Path) -> Path:
        return write_json_atomic(asdict(self), Path(directory) / "manifest.json")


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a finished shard directory (run jobs.score)")
    data = json.loads(path.read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {data.get('schema_version')}, this code reads "
                         f"{SCHEMA_VERSION}; rebuild the shards with jobs.score")
    return Manifest(**data)


def load_shard_tokenizer(directory: str | Path, also: Sequence[str | Path | None] = ()) -> Any:
    """The tokenizer the shards at `directory` were made with: the manifest's path, else a folder of
    `also`, else `<directory>/../tokenizer` (where `jobs.score` puts it: shards copied to another
    machine keep it beside them). Whichever loads must have the manifest's tokenizer hash."""

    manifest = read_manifest(directory)
    tried = []
    for candidate in (manifest.tokenizer_path, *also, Path(directory).resolve().parent / "tokenizer"):
        if candidate is None or not (Path(candidate) / "tokenizer.json").is_file():
            tried.append(str(candidate))
            continue
        tok = load_tokenizer(candidate)
        if tokenizer_hash(tok) != manifest.tokenizer_hash:
            raise ValueError(f"the tokenizer at {candidate} is not the one the shards at {directory} were "
                             f"made with (hash {tokenizer_hash(tok)}, manifest {manifest.tokenizer_hash})")
        return tok
    raise FileNotFoundError(f"no tokenizer for the shards at {directory}: tried {', '.join(tried)}")


# ----------------------------------------------------------------------------------------------
# Reading batches


def _load_split(directory: Path, manifest: Manifest, split: str) -> dict[str, np.ndarray]:
    """A split's rows: input_ids int32 [N, L], fact [N, L], ref_loss [N, L], judge_accept [N, L, k],
    oracle int8 [N, L] (the optional ones when the shards have them)."""
    tables = [read_shard(directory / rel) for rel in manifest.shards.get(split, [])]
    if not tables:
        raise ValueError(f"{directory}: no {split} sequences (shards: {manifest.shards})")
    table = pa.concat_tables(tables)
    length = manifest.seq_len + 1
    out = {}
    for name in ("input_ids", "fact", "ref_loss", "judge_accept", "oracle"):
        if name in table.column_names:
            values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out[name] = values.reshape(table.num_rows, length, -1) if name == "judge_accept" else \
                values.reshape(table.num_rows, length)
    return out


def read_batches(directory: str | Path, split: str, batch_size: int, seed: int = 0, start_row: int = 0,
                 loop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of a split: input_ids long [B, L], fact bool [B, L], and ref_loss float [B, L],
    judge_accept long [B, L, k], oracle int8 [B, L] when the shards have them.

    The row order is a stream of epochs, epoch e a permutation seeded by (seed, e); `start_row` skips
    that many rows of the stream, so a resumed run continues exactly where it stopped. Without
    `loop` the stream is one epoch and its last batch may be short; with `loop` it never ends.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if batch_size <= 0 or start_row < 0:
        raise ValueError("batch_size must be positive and start_row non-negative")
    directory = Path(directory)
    arrays = _load_split(directory, read_manifest(directory), split)
    stream = _row_stream(len(arrays["input_ids"]), seed, start_row, loop)
    while picked := list(islice(stream, batch_size)):
        yield _tensors(arrays, np.asarray(picked))


def _row_stream(n: int, seed: int, start_row: int, loop: bool) -> Iterator[int]:
    """Row indices: permutation of epoch 0, then (with `loop`) epoch 1, ...; the first `start_row` skipped."""
    epoch, offset = divmod(start_row, n)
    while loop or epoch == 0:
        yield from np.random.default_rng([seed, epoch]).permutation(n)[offset:].tolist()
        epoch, offset = epoch + 1, 0


def _tensors(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.from_numpy(arrays["input_ids"][rows].astype(np.int64)),
           "fact": torch.from_numpy(arrays["fact"][rows])}
    if "ref_loss" in arrays:
        out["ref_loss"] = torch.from_numpy(arrays["ref_loss"][rows])
    if "judge_accept" in arrays:
        out["judge_accept"] = torch.from_numpy(arrays["judge_accept"][rows].astype(np.int64))
    if "oracle" in arrays:
        out["oracle"] = torch.from_numpy(arrays["oracle"][rows])
    return out

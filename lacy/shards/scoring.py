"""Stage 2 → 3: corpus → tokenizer → tokenised, fact-tagged (+ reference losses, judge sets) shards.

    python -m lacy.shards.scoring --config configs/tiny.yaml          # one process, no Ray
    python -m jobs.score   --config configs/tiny.yaml          # the same stage on Ray Data

`build_shards(cfg)` is the whole stage: read the corpus (bad records counted and logged with file,
line and reason), train or reuse the tokenizer, cut the documents into units of
`score.docs_per_shard`, skip units already on disk with the same config hash and document
fingerprint, encode the others, and write each unit's shards and then its commit record
`units/part-N.json` (every file atomically), so a killed run restarts where it stopped and ends with
the same bytes. `docs.parquet` and `manifest.json` are built from the unit records at the end.

Encoding is pluggable: by default `encode_units_locally` runs in this process; `jobs.score` passes
an encoder that maps the same `tag_documents` / `score_documents` over Ray Data actors and hands the
units back whole. Both feed the same writer, so their shards are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lacy.core import storage
from lacy.core.config import LacyConfig, config_hash, parse_cli, save_config, to_dict
from lacy.core.console import progress, setup_logging
from lacy.core.tracking import active, log_dataset, log_metrics, start_run
from lacy.corpus.corpora import corpus_for
from lacy.corpus.readers import ReadReport, doc_split
from lacy.corpus.tokenizer import SPECIAL_TOKENS, extend_tokenizer, load_tokenizer, tokenizer_hash, train_tokenizer
from lacy.labels.facts import FactTagger, merge_spans, tag_spans, tagger_info
from lacy.labels.reference import JudgeLabeler, ReferenceScorer
from lacy.model import load_big_model, pretrained_dir
from lacy.shards.format import (
    SCHEMA_VERSION,
    SPLITS,
    Manifest,
    TokenizedDoc,
    pack_documents,
    write_atomic,
    write_json_atomic,
    write_shard,
)

log = logging.getLogger(__name__)

Result = TokenizedDoc | str
"""A document's encoding, or why it was rejected."""
UnitEncoder = Callable[[LacyConfig, Path, dict[int, list[dict]]], Iterable[tuple[int, list[Result]]]]
"""(cfg, tokenizer dir, {unit: documents}) -> (unit, per-document results in order), each unit whole."""


# ----------------------------------------------------------------------------------------------
# Encoding documents (what every worker runs, in one process or in Ray actors)


def reject(doc: dict, reason: str) -> dict[str, str]:
    """The manifest entry for a document that read fine but could not be encoded."""
    return {"id": str(doc.get("id")), "title": str(doc.get("title", "")), "reason": reason}


def tag_documents(docs: list[dict], tokenizer: Any, tagger: Any, *, val_fraction: float,
                  min_chars: int = 1) -> list[Result]:
    """Tokenise and fact-flag `docs`: per input document its `TokenizedDoc`, or why it was rejected.

    A document is rejected when its text is shorter than `min_chars`, when tagging it raises, or when
    it has no tokens. A failing batch is retried one document at a time so only the bad one is lost.
    `tagger` is a `lacy.labels.facts.FactTagger` (spaCy) or anything with its `tag(texts, tokenizer, docs)`.
    """
    kept = [i for i, doc in enumerate(docs) if len(doc.get("text") or "") >= min_chars]
    batch = [docs[i] for i in kept]
    try:
        tagged: list[Any] = tagger.tag([d["text"] for d in batch], tokenizer, docs=batch)
    except Exception:  # one bad text must not sink its whole batch
        tagged = []
        for doc in batch:
            try:
                tagged.append(tagger.tag([doc["text"]], tokenizer, docs=[doc])[0])
            except Exception as err:
                tagged.append(err)
    results: list[Result] = [f"text shorter than {min_chars} characters"] * len(docs)
    for i, result in zip(kept, tagged, strict=True):
        if isinstance(result, Exception):
            results[i] = f"tagging failed: {type(result).__name__}: {result}"
            continue
        if len(result.ids) == 0:
            results[i] = "no tokens"
            continue
        doc_id = str(docs[i]["id"])
        results[i] = TokenizedDoc(id=doc_id, title=str(docs[i].get("title", "")),
                                  split=doc_split(docs[i], val_fraction), ids=np.asarray(result.ids, np.int32),
                                  fact=np.asarray(result.fact, bool),
                                  offsets=np.asarray(result.offsets, np.int32).reshape(-1, 2),
                                  oracle=result.oracle)
    return results


class SpansGiven:
    """A tagger whose fact spans were found elsewhere: a long document's pieces, tagged by several
    workers (`piece_spans`) and merged (`join_pieces`). Its `tag` is `FactTagger.tag` without spaCy."""

    def __init__(self, spans: list[np.ndarray]) -> None:
        self.spans = spans

    def tag(self, texts: list[str], tokenizer: Any, docs: list[dict] | None = None) -> list[Any]:
        return tag_spans(texts, self.spans, tokenizer, docs)


def piece_spans(tagger: FactTagger, pieces: list[tuple[int, str]]) -> list[np.ndarray | str]:
    """Per (start, text) piece of a document (`lacy.labels.facts.split_long` at facts.max_chars), its
    fact spans in the document's offsets, int64 [k, 2], or why tagging it failed: what a worker does
    with a piece, so one huge document is tagged by every worker instead of one."""
    try:
        found = tagger.fact_spans([text for _, text in pieces])
    except Exception:  # one bad piece must not sink the others
        found = []
        for _, text in pieces:
            try:
                found.append(tagger.fact_spans([text])[0])
            except Exception as err:
                found.append(err)
    return [f"tagging failed: {type(spans).__name__}: {spans}" if isinstance(spans, Exception)
            else np.asarray(spans, np.int64).reshape(-1, 2) + start for (start, _), spans in zip(pieces, found,
                                                                                                strict=True)]


def join_pieces(doc: dict, parts: list[np.ndarray | str], tokenizer: Any, *, val_fraction: float,
                min_chars: int = 1) -> Result:
    """A document's result from its pieces' spans (`piece_spans`, any order): the same `TokenizedDoc` as
    tagging it whole (spaCy sees the same pieces either way, `FactTagger.fact_spans`), or the first
    piece's failure."""
    if failed := [p for p in parts if isinstance(p, str)]:
        return failed[0]
    spans = merge_spans(np.concatenate([p for p in parts if not isinstance(p, str)]))
    return tag_documents([doc], tokenizer, SpansGiven([spans]), val_fraction=val_fraction, min_chars=min_chars)[0]


def score_documents(encoded: list[TokenizedDoc], texts: list[str], reference: Any = None,
                    judge: Any = None) -> None:
    """Fill `ref_loss` and `judge_accept` of `encoded` (texts in the same order) in place.

    `reference`: a `lacy.labels.reference.ReferenceScorer`; `judge`: a `lacy.labels.reference.JudgeLabeler`. Their
    batch methods run the windows of all texts together.
    """
    offsets = [doc.offsets for doc in encoded]
    if reference is not None:
        for doc, loss in zip(encoded, reference.token_losses_batch(texts, offsets), strict=True):
            doc.ref_loss = np.asarray(loss, np.float32)
            if doc.ref_loss.shape != doc.ids.shape:
                raise ValueError(f"reference losses of {doc.id!r} have shape {doc.ref_loss.shape}, "
                                 f"not {doc.ids.shape}")
    if judge is not None:
        accepted = judge.accept_sets_batch(texts, offsets, [doc.ids for doc in encoded])
        for doc, sets in zip(encoded, accepted, strict=True):
            doc.judge_accept = np.asarray(sets, np.int32)
            if doc.judge_accept.ndim != 2 or len(doc.judge_accept) != len(doc.ids):
                raise ValueError(f"judge accept sets of {doc.id!r} have shape {doc.judge_accept.shape}, "
                                 f"not ({len(doc.ids)}, k)")


def encode_documents(docs: Iterable[dict], tokenizer: Any, tagger: Any, reference: Any = None,
                     judge: Any = None, *, val_fraction: float = 0.05, min_chars: int = 1,
                     rejects: list[dict] | None = None) -> list[TokenizedDoc]:
    """Documents -> `TokenizedDoc`s in order (rejected ones left out, appended to `rejects` when given)."""
    docs = list(docs)
    results = tag_documents(docs, tokenizer, tagger, val_fraction=val_fraction, min_chars=min_chars)
    encoded = [r for r in results if isinstance(r, TokenizedDoc)]
    if reference is not None or judge is not None:
        texts = [doc["text"] for doc, r in zip(docs, results, strict=True) if isinstance(r, TokenizedDoc)]
        score_documents(encoded, texts, reference, judge)
    if rejects is not None:
        rejects.extend(reject(doc, r) for doc, r in zip(docs, results, strict=True) if isinstance(r, str))
    return encoded


class Encoder:
    """The tagger, tokenizer and reference/judge scorers of one worker, loaded once; docs -> results."""

    def __init__(self, cfg: LacyConfig, tokenizer_dir: str | Path, device: str = "cpu") -> None:

        self.cfg = cfg
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tagger = FactTagger(cfg.facts)
        self.reference, self.judge = load_scorers(cfg, self.tokenizer, device)

    def __call__(self, docs: list[dict]) -> list[Result]:
        results = tag_documents(docs, self.tokenizer, self.tagger, val_fraction=self.cfg.data.val_fraction,
                                min_chars=self.cfg.data.min_chars)
        if self.reference is not None or self.judge is not None:
            ok = [(r, d["text"]) for r, d in zip(results, docs, strict=True) if isinstance(r, TokenizedDoc)]
            score_documents([r for r, _ in ok], [t for _, t in ok], self.reference, self.judge)
        return results


def load_scorers(cfg: LacyConfig, our_tokenizer: Any, device: str = "cpu") -> tuple[Any, Any]:
    """(ReferenceScorer | None, JudgeLabeler | None) of `cfg.score`; one copy of a model used as both."""
    sc = cfg.score
    if not (sc.reference or sc.judge):
        return None, None

    loaded = {path: load_big_model(path) for path in {sc.reference, sc.judge} - {None}}
    reference = ReferenceScorer(*loaded[sc.reference], device=device) if sc.reference else None
    judge = JudgeLabeler(*loaded[sc.judge], our_tokenizer, cfg.labels.judge_top_k, cfg.labels.judge_margin,
                         device=device) if sc.judge else None
    return reference, judge


def encode_units_locally(cfg: LacyConfig, tokenizer_dir: Path,
                         units: dict[int, list[dict]]) -> Iterator[tuple[int, list[Result]]]:
    """The default `UnitEncoder`: every unit in this process, `facts.batch_size` documents at a time."""
    encoder = Encoder(cfg, tokenizer_dir, device="cuda" if cfg.score.model_actor_gpus > 0 else "cpu")
    size = cfg.facts.batch_size
    for unit, docs in units.items():
        yield unit, [r for i in range(0, len(docs), size) for r in encoder(docs[i:i + size])]


# ----------------------------------------------------------------------------------------------
# Arrow transport of results (Ray Data actors hand back columns, never Python objects)


def list_values(table: pa.Table, name: str, width: int = 1) -> list[np.ndarray]:
    """Per row of a list column, its values as a numpy array ([n] or [n, width] when width > 1)."""
    column = table.column(name).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    bounds = column.offsets.to_numpy()
    bounds = bounds - bounds[0]  # a sliced batch's offsets are absolute; flatten() starts at its first
    rows = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [r.reshape(-1, width) for r in rows] if width > 1 else rows


def list_array(rows: list[np.ndarray], kind: pa.DataType) -> pa.Array:
    """A list column from per-row numpy arrays (flattened row-major)."""
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=kind))


_OPTIONAL = {"ref_loss": pa.float32(), "judge_accept": pa.int32(), "oracle": pa.int8()}


def results_to_table(keys: pa.Table, results: list[Result]) -> pa.Table:
    """`keys` (index, unit, ... columns passed through) + the results as columns: split, ids, fact,
    error and, where any document has them, ref_loss / judge_accept / oracle."""
    encoded = [r if isinstance(r, TokenizedDoc) else None for r in results]
    empty = np.zeros(0, np.int32)
    columns = dict(zip(keys.column_names, keys.columns, strict=True))
    columns.update({
        "split": pa.array([d.split if d else "" for d in encoded], pa.string()),
        "ids": list_array([d.ids if d else empty for d in encoded], pa.int32()),
        "fact": list_array([d.fact if d else empty.astype(bool) for d in encoded], pa.bool_()),
        "error": pa.array([r if isinstance(r, str) else None for r in results], pa.string())})
    for name, kind in _OPTIONAL.items():
        if any(d is not None and getattr(d, name) is not None for d in encoded):
            columns[name] = list_array([getattr(d, name) if d is not None and getattr(d, name) is not None
                                        else empty for d in encoded], kind)
    return pa.table(columns)


def results_from_table(batch: pa.Table, top_k: int) -> list[tuple[int, int, Result]]:
    """(document index, unit, TokenizedDoc or reject reason) per row of `results_to_table`'s output."""
    columns = {name: batch.column(name).to_pylist() for name in ("index", "unit", "id", "title", "split", "error")}
    ids, fact = list_values(batch, "ids"), list_values(batch, "fact")
    extra = {name: list_values(batch, name, top_k if name == "judge_accept" else 1)
             for name in _OPTIONAL if name in batch.column_names}
    out: list[tuple[int, int, Result]] = []
    for r, error in enumerate(columns["error"]):
        if error is not None:
            out.append((columns["index"][r], columns["unit"][r], error))
            continue
        doc = TokenizedDoc(id=columns["id"][r], title=columns["title"][r], split=columns["split"][r],
                           ids=ids[r], fact=fact[r], offsets=np.zeros((0, 2), np.int32),
                           **{name: values[r] for name, values in extra.items()})
        out.append((columns["index"][r], columns["unit"][r], doc))
    return out


# ----------------------------------------------------------------------------------------------
# Identity of the output: what must match for a unit on disk to be reused


def shard_config_hash(cfg: LacyConfig, tok_hash: str) -> str:
    """Hash of every setting that changes shard content; parallelism, paths and batch sizes excluded."""
    facts = {k: v for k, v in asdict(cfg.facts).items() if k != "batch_size"}
    judge = {"path": cfg.score.judge, "top_k": cfg.labels.judge_top_k,
             "margin": cfg.labels.judge_margin} if cfg.score.judge else None
    return config_hash({"schema_version": SCHEMA_VERSION, "tokenizer": tok_hash, "seq_len": cfg.model.seq_len,
                        "val_fraction": cfg.data.val_fraction, "min_chars": cfg.data.min_chars,
                        "facts": facts, "reference": cfg.score.reference, "judge": judge,
                        "docs_per_shard": cfg.score.docs_per_shard})


def unit_fingerprint(docs: Iterable[dict]) -> str:
    """sha256 over the ids, titles, texts (and oracle fact spans, when given) of a unit's documents."""
    h = hashlib.sha256()
    for doc in docs:
        facts = json.dumps(doc["facts"], sort_keys=True) if "facts" in doc else ""
        for part in (str(doc["id"]), str(doc.get("title", "")), doc["text"], facts, str(doc.get("person") or "")):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()


def unit_name(unit: int) -> str:
    return f"part-{unit:05d}"


# ----------------------------------------------------------------------------------------------
# Tokenizer


def prepare_tokenizer(cfg: LacyConfig, docs: list[dict], corpus_fingerprint: str) -> tuple[Any, Path]:
    """cfg.tokenizer.path, else run_dir/tokenizer: reused when made with the same settings and corpus, else
    made anew (in a temp dir, renamed): the tokenizer of model.init_from with `<CALL>` added, or a BPE trained
    on the first `train_docs` training documents."""
    if cfg.tokenizer.path is not None:
        path = Path(cfg.tokenizer.path).resolve()
        return load_tokenizer(path), path
    path = Path(cfg.run_dir).resolve() / "tokenizer"
    if cfg.model.init_from is not None:
        source = pretrained_dir(cfg.model.init_from, "model.init_from")
        key = config_hash({"init_from": _file_hash(source / "tokenizer.json"), "specials": SPECIAL_TOKENS})
    else:
        key = config_hash({"tokenizer": asdict(cfg.tokenizer), "val_fraction": cfg.data.val_fraction,
                           "corpus": corpus_fingerprint, "specials": SPECIAL_TOKENS})
    marker = path / "lacy_tokenizer.json"
    if marker.is_file() and _read_json(marker).get("key") == key:
        return load_tokenizer(path), path
    tmp = path.with_name(f".tokenizer.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.model.init_from is not None:
        tok = extend_tokenizer(source, out_dir=tmp)
        log.info("the tokenizer of %s with <CALL> added: %d ids", source, len(tok))
        write_json_atomic({"key": key, "init_from": str(source)}, tmp / marker.name)
    else:
        texts = [d["text"] for d in docs if doc_split(d, cfg.data.val_fraction) == "train"]
        texts = texts[:cfg.tokenizer.train_docs]
        if not texts:
            raise ValueError(f"no training documents to train the tokenizer on (corpus {cfg.data.corpus!r})")
        log.info("training a %d-id BPE tokenizer on %d documents", cfg.tokenizer.vocab_size, len(texts))
        train_tokenizer(texts, cfg.tokenizer.vocab_size, out_dir=tmp)
        write_json_atomic({"key": key, "train_docs": len(texts)}, tmp / marker.name)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return load_tokenizer(path), path


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# Units: written as their documents come back


def write_unit(out: Path, unit: int, docs: list[dict], results: list[Result], *,
               seq_len: int, eos_id: int, pad_id: int, shard_hash: str, fingerprint: str) -> dict:
    """Pack and write one unit's shards, then its commit record (last, so a crash redoes the unit)."""
    encoded = [r for r in results if isinstance(r, TokenizedDoc)]
    record: dict[str, Any] = {
        "unit": unit, "config_hash": shard_hash, "fingerprint": fingerprint, "shards": {}, "counts": {},
        "rejects": [reject(d, r) for d, r in zip(docs, results, strict=True) if isinstance(r, str)],
        "docs": [{"id": d.id, "title": d.title, "split": d.split, "tokens": len(d.ids),
                  "fact_tokens": int(d.fact.sum())} for d in encoded]}
    for split in SPLITS:
        part = [d for d in encoded if d.split == split]
        rows = list(pack_documents(part, seq_len, eos_id, pad_id=pad_id))
        rel = f"{split}/{unit_name(unit)}.parquet"
        if rows:
            write_shard(rows, out / rel)
            record["shards"][split] = rel
        else:  # a stale file of an earlier config would otherwise linger
            (out / rel).unlink(missing_ok=True)
        record["counts"][split] = {"docs": len(part), "tokens": int(sum(len(d.ids) for d in part)),
                                   "fact_tokens": int(sum(int(d.fact.sum()) for d in part)),
                                   "sequences": len(rows)}
    write_json_atomic(record, out / "units" / f"{unit_name(unit)}.json")
    return record


def unit_done(out: Path, unit: int, shard_hash: str, fingerprint: str) -> dict | None:
    """The unit's commit record if it matches this config and these documents and its shards exist."""
    record = _read_json(out / "units" / f"{unit_name(unit)}.json")
    if record.get("config_hash") != shard_hash or record.get("fingerprint") != fingerprint:
        return None
    if not all((out / rel).is_file() for rel in record.get("shards", {}).values()):
        return None
    return record


def _remove_stale_units(out: Path, n_units: int) -> None:
    """Delete shards and records of units past the end (an earlier, larger corpus)."""
    for folder, suffix in (("train", ".parquet"), ("val", ".parquet"), ("units", ".json")):
        for path in (out / folder).glob(f"part-*{suffix}"):
            if int(path.name[5:10]) >= n_units:
                path.unlink()


def finalize(out: Path, cfg: LacyConfig, records: list[dict], *, shard_hash: str, tok_hash: str,
             tok_path: Path, report: ReadReport, spacy: dict) -> Manifest:
    """docs.parquet and manifest.json from the unit records (in unit order)."""
    counts = {s: {"docs": 0, "tokens": 0, "fact_tokens": 0, "sequences": 0} for s in SPLITS}
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    encode_rejects, doc_rows = [], []
    for record in records:
        for split in SPLITS:
            for key, value in record["counts"][split].items():
                counts[split][key] += value
            if split in record["shards"]:
                shards[split].append(record["shards"][split])
        encode_rejects.extend(record["rejects"])
        doc_rows.extend(dict(row, unit=record["unit"]) for row in record["docs"])
    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("split", pa.string()),
                        ("unit", pa.int32()), ("tokens", pa.int32()), ("fact_tokens", pa.int32())])
    write_atomic(pa.Table.from_pylist(doc_rows, schema=schema), out / "docs.parquet")
    fingerprint = hashlib.sha256("".join(r["fingerprint"] for r in records).encode()).hexdigest()
    read = report.to_dict()
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, config=to_dict(cfg), config_hash=shard_hash, tokenizer_hash=tok_hash,
        tokenizer_path=str(tok_path), spacy=spacy, corpus_fingerprint=fingerprint, seq_len=cfg.model.seq_len,
        judge_top_k=cfg.labels.judge_top_k if cfg.score.judge else None, counts=counts,
        rejects={"read": read, "encode": encode_rejects, "total": read["total_bad"] + len(encode_rejects)},
        shards=shards)
    manifest.save(out)
    return manifest


# ----------------------------------------------------------------------------------------------
# The stage


def build_shards(cfg: LacyConfig, encode_units: UnitEncoder = encode_units_locally) -> tuple[Manifest, dict]:
    """Build (or finish building) the shards of `cfg` at `cfg.score.output_dir`; returns the manifest
    and the run's metrics (counts per split, rejects, units reused, fact share, tokens/s)."""

    out = Path(cfg.score.output_dir).resolve()
    storage.pull(cfg, out, Path(cfg.run_dir) / "tokenizer")  # units another machine finished are reused
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.rglob(".*.tmp"):  # half-written files of a killed run, never renamed into place
        if partial.is_file():
            partial.unlink()
    save_config(cfg, out / "config.yaml")
    report = ReadReport()
    docs = list(corpus_for(cfg).documents(report))
    if report.total_bad:
        log.warning("corpus %s: %s", cfg.data.corpus, report.summary(max_reasons=20))
    if not docs:
        raise ValueError(f"corpus {cfg.data.corpus!r} has no readable documents:\n{report.summary()}")
    size = cfg.score.docs_per_shard
    units = [docs[i:i + size] for i in range(0, len(docs), size)]
    fingerprints = [unit_fingerprint(u) for u in units]
    corpus_fp = hashlib.sha256("".join(fingerprints).encode()).hexdigest()
    tokenizer, tok_path = prepare_tokenizer(cfg, docs, corpus_fp)
    storage.push(cfg, tok_path)  # the scoring actors load it, wherever they run
    tok_hash = tokenizer_hash(tokenizer)
    shard_hash = shard_config_hash(cfg, tok_hash)
    records = {u: r for u, fp in enumerate(fingerprints) if (r := unit_done(out, u, shard_hash, fp)) is not None}
    pending = {u: units[u] for u in range(len(units)) if u not in records}
    log.info("%d documents in %d units; %d already done; %d bad records", len(docs), len(units),
             len(records), report.total_bad)

    start, new_tokens = time.perf_counter(), 0
    with progress(total=sum(len(u) for u in pending.values()), desc="scoring", unit="doc") as bar:
        for unit, results in encode_units(cfg, tok_path, pending):
            record = write_unit(out, unit, units[unit], results, seq_len=cfg.model.seq_len,
                                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                shard_hash=shard_hash, fingerprint=fingerprints[unit])
            records[unit] = record
            new_tokens += sum(c["tokens"] for c in record["counts"].values())
            bar.update(len(units[unit]))
    if missing := sorted(set(range(len(units))) - set(records)):
        raise RuntimeError(f"units {missing} were not encoded")
    for record in records.values():
        for rejected in record["rejects"]:
            log.warning("document %r (%s) rejected: %s", rejected["id"], rejected["title"], rejected["reason"])
    elapsed = time.perf_counter() - start
    _remove_stale_units(out, len(units))
    manifest = finalize(out, cfg, [records[u] for u in range(len(units))], shard_hash=shard_hash,
                        tok_hash=tok_hash, tok_path=tok_path, report=report, spacy=tagger_info(cfg.facts))
    storage.push(cfg, out)
    tokens = sum(c["tokens"] for c in manifest.counts.values())
    facts = sum(c["fact_tokens"] for c in manifest.counts.values())
    metrics = {f"{split}_{key}": value for split, c in manifest.counts.items() for key, value in c.items()}
    metrics.update(rejects=manifest.rejects["total"], units_reused=len(units) - len(pending),
                   fact_share=facts / max(tokens, 1), new_tokens=new_tokens,
                   tokens_per_s=new_tokens / elapsed if new_tokens else 0.0)
    log.info("wrote %s: %s", out, metrics)
    return manifest, metrics


def log_inputs(cfg: LacyConfig, manifest: Manifest) -> None:
    """The corpus and the shards as inputs of the active MLflow run (context "training"), each with the
    digest that identifies its content (the corpus fingerprint; the shards' config hash); nothing without one."""
    if active() is None:
        return
    log_dataset(f"corpus:{cfg.data.corpus if '/' not in cfg.data.corpus else Path(cfg.data.corpus).name}",
                corpus_for(cfg).source(), manifest.corpus_fingerprint, "training")
    log_dataset("shards", str(Path(cfg.score.output_dir).resolve()), manifest.config_hash, "training")


def main(argv: list[str] | None = None) -> Manifest:
    """The stage in this process, logged as MLflow run "score" (metrics, the corpus and shards as inputs)."""
    setup_logging()
    cfg = parse_cli(argv, __doc__ or "", stage="score")
    with start_run(cfg, "score"):
        manifest, metrics = build_shards(cfg)
        log_metrics(metrics)
        log_inputs(cfg, manifest)
    return manifest


if __name__ == "__main__":
    main()

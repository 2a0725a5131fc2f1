"""Scoring job: corpus -> tokenised, fact-tagged (+ reference losses, judge sets) packed Parquet shards.

    # local: reuses an initialised Ray, else starts one on this machine
    python -m jobs.score --config configs/tiny.yaml [--score.output_dir runs/x/shards]
    # a CPU cluster started with `ray start --head --num-cpus=16`: one spaCy actor a core, one core free
    RAY_ADDRESS=auto python -m jobs.score --config configs/default.yaml \\
        --score.spacy_actors 15 --score.spacy_actor_cpus 1
    # as a Ray job (the entrypoint connects through the RAY_ADDRESS the job supervisor sets)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.score --config configs/tiny.yaml

Pipeline: the driver reads the corpus with `lacy.data.read_corpus` (bad records counted with their line
numbers), trains the tokenizer if none is configured, and cuts the documents into units of
`score.docs_per_shard`. Units already on disk with the same config hash and document fingerprint are
skipped; the rest go through Ray Data: a pool of spaCy actors (`TagActor`, fractional CPUs) and, when a
reference or judge model is configured, a pool of model actors (`ModelActor`). Actors run the same
`lacy.shards` functions as the single-process `encode_documents` and return Arrow lists, never spaCy
objects. As each unit's documents come back the driver packs it and writes its shards, then its commit
record `units/part-N.json` (each file atomically: temp + rename), so a killed job restarts where it
stopped and ends with the same bytes. Finally `docs.parquet` and `manifest.json` are built from the
unit records, and the run is logged to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lacy.config import FactsConfig, LacyConfig, config_hash, parse_cli, save_config, to_dict
from lacy.data import ReadReport, read_corpus, split_of
from lacy.shards import (
    SCHEMA_VERSION,
    SPLITS,
    Manifest,
    TokenizedDoc,
    pack_documents,
    score_documents,
    tag_documents,
    write_atomic,
    write_json_atomic,
    write_shard,
)
from lacy.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_hash, train_tokenizer

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
    """sha256 over the ids, titles and texts of a unit's documents, in order."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (str(doc["id"]), str(doc.get("title", "")), doc["text"]):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()


def unit_name(unit: int) -> str:
    return f"part-{unit:05d}"


# ----------------------------------------------------------------------------------------------
# Tokenizer


def prepare_tokenizer(cfg: LacyConfig, docs: list[dict], corpus_fingerprint: str) -> tuple[Any, Path]:
    """cfg.tokenizer.path, else run_dir/tokenizer: reused when trained with the same settings and
    corpus, else trained on the first `train_docs` training documents (written to a temp dir, renamed)."""
    if cfg.tokenizer.path is not None:
        path = Path(cfg.tokenizer.path).resolve()
        return load_tokenizer(path), path
    path = Path(cfg.run_dir).resolve() / "tokenizer"
    key = config_hash({"tokenizer": asdict(cfg.tokenizer), "val_fraction": cfg.data.val_fraction,
                       "corpus": corpus_fingerprint, "specials": SPECIAL_TOKENS})
    marker = path / "lacy_tokenizer.json"
    if marker.is_file() and _read_json(marker).get("key") == key:
        return load_tokenizer(path), path
    texts = [d["text"] for d in docs if split_of(d["id"], cfg.data.val_fraction) == "train"]
    texts = texts[:cfg.tokenizer.train_docs]
    if not texts:
        raise ValueError(f"no training documents to train the tokenizer on (corpus {cfg.data.corpus!r})")
    tmp = path.with_name(f".tokenizer.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, cfg.tokenizer.vocab_size, out_dir=tmp)
    write_json_atomic({"key": key, "train_docs": len(texts)}, tmp / marker.name)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return load_tokenizer(path), path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# Ray Data actors: the same lacy.shards functions as encode_documents, on Arrow batches


def _list_values(table: pa.Table, name: str, width: int = 1) -> list[np.ndarray]:
    """Per row of a list column, its values as a numpy array ([n] or [n, width] when width > 1)."""
    column = table.column(name).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    bounds = column.offsets.to_numpy()
    bounds = bounds - bounds[0]  # a sliced batch's offsets are absolute; flatten() starts at its first
    rows = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [r.reshape(-1, width) for r in rows] if width > 1 else rows


def _list_array(rows: list[np.ndarray], kind: pa.DataType) -> pa.Array:
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=kind))


def _empty_doc() -> TokenizedDoc:
    return TokenizedDoc(id="", title="", split="", ids=np.zeros(0, np.int32), fact=np.zeros(0, bool),
                        offsets=np.zeros((0, 2), np.int32))


class TagActor:
    """spaCy + our tokenizer, loaded once per actor: batch of documents -> ids, fact flags, offsets."""

    def __init__(self, facts: FactsConfig, tokenizer_path: str, val_fraction: float, min_chars: int,
                 keep_text: bool) -> None:
        from lacy.facts import FactTagger

        self.tagger = FactTagger(facts)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.val_fraction, self.min_chars = val_fraction, min_chars
        self.keep_text = keep_text  # the model actors downstream need texts and offsets

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs = [{"id": i, "title": t, "text": x} for i, t, x in zip(
            batch.column("id").to_pylist(), batch.column("title").to_pylist(),
            batch.column("text").to_pylist(), strict=True)]
        results = tag_documents(docs, self.tokenizer, self.tagger, val_fraction=self.val_fraction,
                                min_chars=self.min_chars)
        encoded = [r if isinstance(r, TokenizedDoc) else _empty_doc() for r in results]
        columns = {
            "index": batch.column("index"), "unit": batch.column("unit"), "id": batch.column("id"),
            "title": batch.column("title"), "split": pa.array([d.split for d in encoded], pa.string()),
            "ids": _list_array([d.ids for d in encoded], pa.int32()),
            "fact": _list_array([d.fact for d in encoded], pa.bool_()),
            "error": pa.array([r if isinstance(r, str) else None for r in results], pa.string())}
        if self.keep_text:
            columns["text"] = batch.column("text")
            columns["offsets"] = _list_array([d.offsets for d in encoded], pa.int32())
        return pa.table(columns)


class ModelActor:
    """Reference and/or judge model, loaded once per actor: adds ref_loss and judge_accept columns."""

    def __init__(self, reference: str | None, judge: str | None, tokenizer_path: str, top_k: int,
                 margin: float, device: str) -> None:
        from lacy.model import load_big_model
        from lacy.reference import JudgeLabeler, ReferenceScorer

        # One copy when the reference and the judge are the same model; the scorers move it to `device`.
        loaded = {path: load_big_model(path) for path in {reference, judge} - {None}}
        self.reference = ReferenceScorer(*loaded[reference], device=device) if reference else None
        self.judge = JudgeLabeler(*loaded[judge], load_tokenizer(tokenizer_path), top_k, margin,
                                  device=device) if judge else None
        self.top_k = top_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = [e is None for e in batch.column("error").to_pylist()]
        docs = [TokenizedDoc(id="", title="", split="", ids=ids, fact=fact, offsets=offsets)
                for ids, fact, offsets in zip(_list_values(batch, "ids"), _list_values(batch, "fact"),
                                              _list_values(batch, "offsets", 2), strict=True)]
        texts = batch.column("text").to_pylist()
        scored = [d for d, good in zip(docs, ok, strict=True) if good]
        score_documents(scored, [t for t, good in zip(texts, ok, strict=True) if good], self.reference,
                        self.judge)
        if self.reference is not None:
            losses = [d.ref_loss if good else np.zeros(0, np.float32)
                      for d, good in zip(docs, ok, strict=True)]
            batch = batch.append_column("ref_loss", _list_array(losses, pa.float32()))
        if self.judge is not None:
            sets = [d.judge_accept if good else np.zeros((0, self.top_k), np.int32)
                    for d, good in zip(docs, ok, strict=True)]
            batch = batch.append_column("judge_accept", _list_array(sets, pa.int32()))
        return batch.drop_columns(["text", "offsets"])


def _decode(batch: pa.Table, top_k: int) -> list[tuple[int, int, TokenizedDoc | str]]:
    """(doc index, unit, TokenizedDoc or reject reason) per row of an actor output batch."""
    columns = {name: batch.column(name).to_pylist()
               for name in ("index", "unit", "id", "title", "split", "error")}
    ids, fact = _list_values(batch, "ids"), _list_values(batch, "fact")
    ref = _list_values(batch, "ref_loss") if "ref_loss" in batch.column_names else None
    judge = _list_values(batch, "judge_accept", top_k) if "judge_accept" in batch.column_names else None
    out = []
    for r, error in enumerate(columns["error"]):
        if error is not None:
            out.append((columns["index"][r], columns["unit"][r], error))
            continue
        doc = TokenizedDoc(id=columns["id"][r], title=columns["title"][r], split=columns["split"][r],
                           ids=ids[r], fact=fact[r], offsets=np.zeros((0, 2), np.int32),
                           ref_loss=None if ref is None else ref[r],
                           judge_accept=None if judge is None else judge[r])
        out.append((columns["index"][r], columns["unit"][r], doc))
    return out


# ----------------------------------------------------------------------------------------------
# Units: written by the driver as their documents come back


def write_unit(out: Path, unit: int, docs: list[dict], results: list[TokenizedDoc | str], *,
               seq_len: int, eos_id: int, pad_id: int, shard_hash: str, fingerprint: str) -> dict:
    """Pack and write one unit's shards, then its commit record (last, so a crash redoes the unit)."""
    encoded = [r for r in results if isinstance(r, TokenizedDoc)]
    record: dict[str, Any] = {
        "unit": unit, "config_hash": shard_hash, "fingerprint": fingerprint, "shards": {}, "counts": {},
        "rejects": [{"id": str(d["id"]), "title": str(d.get("title", "")), "reason": r}
                    for d, r in zip(docs, results, strict=True) if isinstance(r, str)],
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
# The job


def init_ray() -> Any:
    """Connect to the cluster named by RAY_ADDRESS, else reuse an initialised Ray, else start one."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto")
        else:
            ray.init(include_dashboard=False)
    return ray


def _spacy_info(facts: FactsConfig) -> dict:
    from lacy.facts import load_spacy, needed_components, spacy_info

    return spacy_info(load_spacy(facts.spacy_model, needed_components(facts)))


def run(cfg: LacyConfig, parent_run_id: str | None = None) -> Manifest:
    """Build (or finish building) the shards of `cfg`; returns the manifest. See the module docstring."""
    import mlflow

    from lacy.tracking import log_metrics, start_run

    out = Path(cfg.score.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.rglob(".*.tmp"):  # half-written files of a killed run, never renamed into place
        if partial.is_file():
            partial.unlink()
    save_config(cfg, out / "config.yaml")
    report = ReadReport()
    docs = list(read_corpus(cfg.data.corpus, report, cfg.data.max_docs, min_chars=cfg.data.min_chars))
    if not docs:
        raise ValueError(f"corpus {cfg.data.corpus!r} has no readable documents:\n{report.summary()}")
    size = cfg.score.docs_per_shard
    units = [docs[i:i + size] for i in range(0, len(docs), size)]
    fingerprints = [unit_fingerprint(u) for u in units]
    corpus_fp = hashlib.sha256("".join(fingerprints).encode()).hexdigest()
    tokenizer, tok_path = prepare_tokenizer(cfg, docs, corpus_fp)
    tok_hash = tokenizer_hash(tokenizer)
    shard_hash = shard_config_hash(cfg, tok_hash)
    records: dict[int, dict] = {}
    for u, fp in enumerate(fingerprints):
        if (record := unit_done(out, u, shard_hash, fp)) is not None:
            records[u] = record
    pending = [u for u in range(len(units)) if u not in records]
    print(f"[score] {len(docs)} documents in {len(units)} units; {len(records)} already done; "
          f"{report.total_bad} bad records", flush=True)

    with start_run(cfg, "score", nested=mlflow.active_run() is not None, parent_run_id=parent_run_id):
        start = time.perf_counter()
        new_tokens = 0
        if pending:
            for record in _run_pipeline(cfg, out, units, pending, fingerprints, tok_path, tokenizer,
                                        shard_hash):
                records[record["unit"]] = record
                new_tokens += sum(c["tokens"] for c in record["counts"].values())
        elapsed = time.perf_counter() - start
        _remove_stale_units(out, len(units))
        manifest = finalize(out, cfg, [records[u] for u in range(len(units))], shard_hash=shard_hash,
                            tok_hash=tok_hash, tok_path=tok_path, report=report, spacy=_spacy_info(cfg.facts))
        tokens = sum(c["tokens"] for c in manifest.counts.values())
        facts = sum(c["fact_tokens"] for c in manifest.counts.values())
        metrics = {f"{split}_{key}": value
                   for split, c in manifest.counts.items() for key, value in c.items()}
        metrics.update(rejects=manifest.rejects["total"], units_reused=len(units) - len(pending),
                       fact_share=facts / max(tokens, 1), new_tokens=new_tokens,
                       tokens_per_s=new_tokens / elapsed if new_tokens else 0.0)
        log_metrics(metrics)
        mlflow.log_artifact(str(out / "manifest.json"))
    print(f"[score] wrote {out}: {metrics}", flush=True)
    return manifest


def _run_pipeline(cfg: LacyConfig, out: Path, units: list[list[dict]], pending: list[int],
                  fingerprints: list[str], tok_path: Path, tokenizer: Any, shard_hash: str) -> Iterable[dict]:
    """Tag (and score) the pending units' documents on Ray Data; yield each unit's record once written."""
    ray = init_ray()
    sc = cfg.score
    items = [{"index": i, "unit": u, "id": str(d["id"]), "title": str(d.get("title", "")), "text": d["text"]}
             for u in pending for i, d in enumerate(units[u])]
    # About one block per actor batch, so every actor of the pool gets work from the start.
    blocks = max(sc.spacy_actors, -(-len(items) // cfg.facts.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(TagActor, batch_size=cfg.facts.batch_size, batch_format="pyarrow",
                        fn_constructor_kwargs={"facts": cfg.facts, "tokenizer_path": str(tok_path),
                                               "val_fraction": cfg.data.val_fraction,
                                               "min_chars": cfg.data.min_chars,
                                               "keep_text": bool(sc.reference or sc.judge)},
                        compute=ray.data.ActorPoolStrategy(size=sc.spacy_actors),
                        num_cpus=sc.spacy_actor_cpus)
    if sc.reference or sc.judge:
        ds = ds.map_batches(ModelActor, batch_size=cfg.facts.batch_size, batch_format="pyarrow",
                            fn_constructor_kwargs={"reference": sc.reference, "judge": sc.judge,
                                                   "tokenizer_path": str(tok_path),
                                                   "top_k": cfg.labels.judge_top_k,
                                                   "margin": cfg.labels.judge_margin,
                                                   "device": "cuda" if sc.model_actor_gpus > 0 else "cpu"},
                            compute=ray.data.ActorPoolStrategy(size=sc.model_actors),
                            num_cpus=sc.model_actor_cpus, num_gpus=sc.model_actor_gpus)
    arrived: dict[int, list[tuple[int, TokenizedDoc | str]]] = {u: [] for u in pending}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for index, unit, result in _decode(batch, cfg.labels.judge_top_k):
            arrived[unit].append((index, result))
            if len(arrived[unit]) == len(units[unit]):  # complete: restore corpus order and write
                results = [r for _, r in sorted(arrived.pop(unit), key=lambda x: x[0])]
                yield write_unit(out, unit, units[unit], results, seq_len=cfg.model.seq_len,
                                 eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                 shard_hash=shard_hash, fingerprint=fingerprints[unit])
    if arrived:
        raise RuntimeError(f"units {sorted(arrived)} did not get all their documents back from Ray Data")


def main(argv: list[str] | None = None) -> Manifest:
    cfg = parse_cli(argv, description=__doc__ or "")
    return run(cfg)


if __name__ == "__main__":
    main()

"""Scoring on Ray Data: `lacy.shards.scoring.build_shards` with its documents encoded by a pool of actors.

    # local: reuses an initialised Ray, else starts one on this machine
    python -m jobs.score --config configs/tiny.yaml [--score.output_dir runs/x/shards]
    # a CPU cluster started with `ray start --head --num-cpus=16`: one spaCy actor a core, one core free
    RAY_ADDRESS=auto python -m jobs.score --config configs/default.yaml \\
        --score.spacy_actors 15 --score.spacy_actor_cpus 1
    # as a Ray job (the entrypoint connects through the RAY_ADDRESS the job supervisor sets)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.score --config configs/tiny.yaml

The stage (corpus, tokenizer, units, resume, packing, manifest) is the library's; this file only maps
its encoding over Ray Data: spaCy actors (`TagActor`, fractional CPUs) run `lacy.shards.scoring.tag_documents`,
model actors (`ModelActor`, when a reference or judge model is configured) run `score_documents`, and
both hand back Arrow columns (`lacy.shards.scoring.results_to_table`). The driver gathers each unit's
documents and gives the unit back to `build_shards` to write, so shards equal the one-process run's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lacy.core import storage
from lacy.core.config import LacyConfig, from_dict, parse_cli, to_dict
from lacy.core.console import setup_logging
from lacy.core.tracking import log_metrics, start_run
from lacy.corpus.tokenizer import load_tokenizer
from lacy.labels.facts import FactTagger, split_long
from lacy.shards.format import Manifest, TokenizedDoc
from lacy.shards.scoring import (
    Result,
    build_shards,
    join_pieces,
    list_array,
    list_values,
    load_scorers,
    log_inputs,
    piece_spans,
    results_from_table,
    results_to_table,
    score_documents,
    tag_documents,
)
from services.runtime import init_ray

log = logging.getLogger(__name__)
_KEYS = ["index", "unit", "id", "title"]


def _docs(batch: pa.Table) -> list[dict]:
    facts, people = batch.column("facts").to_pylist(), batch.column("person").to_pylist()
    return [{"id": i, "title": t, "text": x, **({"facts": json.loads(f)} if f else {}), **({"person": p} if p else {})}
            for i, t, x, f, p in zip(batch.column("id").to_pylist(), batch.column("title").to_pylist(),
                                     batch.column("text").to_pylist(), facts, people, strict=True)]


class TagActor:
    """spaCy + our tokenizer, loaded once per actor: documents -> ids, fact flags (+ text, offsets)."""

    def __init__(self, cfg: dict, tokenizer_dir: str, keep_text: bool) -> None:

        self.cfg = from_dict(LacyConfig, cfg)
        storage.pull(self.cfg, tokenizer_dir)  # this node's mirror of a store-backed run may be empty
        self.tagger, self.tokenizer = FactTagger(self.cfg.facts), load_tokenizer(tokenizer_dir)
        self.keep_text = keep_text  # the model actors downstream need texts and offsets

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs, pieces = _docs(batch), batch.column("pieces").to_pylist()
        whole = [i for i, n in enumerate(pieces) if n == 1]
        results: list[Result] = [""] * len(docs)  # a piece's "result" is its spans column
        spans = [np.zeros((0, 2), np.int64)] * len(docs)
        for i, result in zip(whole, tag_documents([docs[i] for i in whole], self.tokenizer, self.tagger,
                                                  val_fraction=self.cfg.data.val_fraction,
                                                  min_chars=self.cfg.data.min_chars), strict=True):
            results[i] = result
        parts = [i for i, n in enumerate(pieces) if n > 1]
        starts = batch.column("start").to_pylist()
        for i, found in zip(parts, piece_spans(self.tagger, [(starts[i], docs[i]["text"]) for i in parts]),
                            strict=True):
            if isinstance(found, str):
                results[i] = found
            else:
                spans[i] = found
        table = results_to_table(batch.select(_KEYS), results)
        table = table.append_column("pieces", batch.column("pieces"))
        table = table.append_column("spans", list_array(spans, pa.int64()))
        if self.keep_text:
            offsets = [r.offsets if isinstance(r, TokenizedDoc) else np.zeros((0, 2), np.int32) for r in results]
            table = table.append_column("text", batch.column("text"))
            table = table.append_column("offsets", list_array(offsets, pa.int32()))
        return table


class ModelActor:
    """Reference and/or judge model, loaded once per actor: adds ref_loss and judge_accept columns."""

    def __init__(self, cfg: dict, tokenizer_dir: str, device: str) -> None:
        self.cfg = from_dict(LacyConfig, cfg)
        storage.pull(self.cfg, tokenizer_dir)
        self.reference, self.judge = load_scorers(self.cfg, load_tokenizer(tokenizer_dir), device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results: list[Result] = [doc for _, _, doc in results_from_table(batch, self.cfg.labels.judge_top_k)]
        offsets = list_values(batch, "offsets", 2)
        scored = []
        for doc, off, text in zip(results, offsets, batch.column("text").to_pylist(), strict=True):
            if isinstance(doc, TokenizedDoc):
                doc.offsets = off
                scored.append((doc, text))
        score_documents([d for d, _ in scored], [t for _, t in scored], self.reference, self.judge)
        return results_to_table(batch.select(_KEYS), results)


def encode_on_ray(cfg: LacyConfig, tokenizer_dir: Path,
                  units: dict[int, list[dict]]) -> Iterator[tuple[int, list[Result]]]:
    """`lacy.shards.scoring.UnitEncoder` on Ray Data: every unit's documents through the actor pools; each unit
    is yielded, in its documents' order, as soon as all of them are back."""
    ray = init_ray()
    sc, config = cfg.score, to_dict(cfg)
    needs_model = bool(sc.reference or sc.judge)
    # A document longer than facts.max_chars goes to spaCy in pieces anyway (FactTagger.fact_spans):
    # the pieces become rows of their own, so every actor tags some of a huge document, and the driver
    # joins their spans (the same shards as tagging it whole). Not with a reference or judge model,
    # which need the whole document in one row.
    split = not needs_model and cfg.facts.source == "spacy"
    whole, pieces_rows = [], []
    for u, docs in units.items():
        for i, d in enumerate(docs):
            pieces = split_long(d["text"], cfg.facts.max_chars) if split else [(0, d["text"])]
            (whole if len(pieces) == 1 else pieces_rows).extend(
                {"index": i, "unit": u, "id": str(d["id"]), "title": str(d.get("title", "")), "text": text,
                 "facts": json.dumps(d["facts"]) if "facts" in d else "", "person": str(d.get("person") or ""),
                 "start": start, "pieces": len(pieces)} for start, text in pieces)
    items = _spread(whole, pieces_rows)
    if not items:
        return
    if pieces_rows:
        log.info("%d documents over facts.max_chars (%d) tagged as %d pieces across the actors",
                 len({(it["unit"], it["index"]) for it in pieces_rows}), cfg.facts.max_chars, len(pieces_rows))
    _check_gpus(ray, sc.model_actor_gpus * sc.model_actors if needs_model else 0, "score.model_actor_gpus")
    # A batch is what one actor tags at a time (Ray Data joins blocks up to batch_size rows): at least
    # four per actor, so the actors take turns to the end and a huge document's pieces (spread through
    # the rows) land in several batches instead of one actor's single batch while the other idles.
    batch = max(1, min(cfg.facts.batch_size, -(-len(items) // (4 * sc.spacy_actors))))
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch)).map_batches(
        TagActor, batch_size=batch, batch_format="pyarrow",
        fn_constructor_kwargs={"cfg": config, "tokenizer_dir": str(tokenizer_dir), "keep_text": needs_model},
        compute=ray.data.ActorPoolStrategy(size=sc.spacy_actors), num_cpus=sc.spacy_actor_cpus,
        resources=sc.actor_resources or None)
    if needs_model:
        ds = ds.map_batches(
            ModelActor, batch_size=cfg.facts.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"cfg": config, "tokenizer_dir": str(tokenizer_dir),
                                   "device": "cuda" if sc.model_actor_gpus > 0 else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=sc.model_actors), num_cpus=sc.model_actor_cpus,
            num_gpus=sc.model_actor_gpus, resources=sc.model_actor_resources or None)
    arrived: dict[int, list[tuple[int, Result]]] = {u: [] for u in units}
    parts: dict[tuple[int, int], list[np.ndarray | str]] = {}
    tokenizer = load_tokenizer(tokenizer_dir) if pieces_rows else None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pieces = batch.column("pieces").to_pylist() if "pieces" in batch.column_names else [1] * batch.num_rows
        spans = list_values(batch, "spans", 2) if pieces_rows else []
        for row, (index, unit, result) in enumerate(results_from_table(batch, cfg.labels.judge_top_k)):
            if pieces[row] > 1:  # a piece: the document is done when all its pieces are back
                got = parts.setdefault((unit, index), [])
                got.append(result if isinstance(result, str) and result else spans[row])
                if len(got) < pieces[row]:
                    continue
                result = join_pieces(units[unit][index], parts.pop((unit, index)), tokenizer,
                                     val_fraction=cfg.data.val_fraction, min_chars=cfg.data.min_chars)
            arrived[unit].append((index, result))
            if len(arrived[unit]) == len(units[unit]):  # complete: restore corpus order
                yield unit, [r for _, r in sorted(arrived.pop(unit), key=lambda x: x[0])]


def _spread(rows: list[dict], pieces: list[dict]) -> list[dict]:
    """`rows` with `pieces` spread evenly among them (each placed by its share of its own list)."""
    keyed = [((i + 0.5) / len(rows), 0, i) for i in range(len(rows))] + \
        [((k + 0.5) / len(pieces), 1, k) for k in range(len(pieces))]
    return [(rows, pieces)[kind][i] for _, kind, i in sorted(keyed)]


def _check_gpus(ray: Any, wanted: float, field: str) -> None:
    """A GPU request the cluster cannot meet would leave the job pending forever: refuse it now."""
    have = ray.cluster_resources().get("GPU", 0.0)
    if wanted > have:
        raise ValueError(f"{field}: {wanted:g} GPUs wanted, the Ray cluster has {have:g}")


def run(cfg: LacyConfig, parent_run_id: str | None = None) -> Manifest:
    """`build_shards` on Ray Data, logged as MLflow run "score" (nested under `parent_run_id`)."""
    import mlflow


    with start_run(cfg, "score", nested=mlflow.active_run() is not None, parent_run_id=parent_run_id):
        manifest, metrics = build_shards(cfg, encode_on_ray)
        log_metrics(metrics)
        log_inputs(cfg, manifest)
        mlflow.log_artifact(str(Path(cfg.score.output_dir) / "manifest.json"))
    return manifest


def main(argv: list[str] | None = None) -> Manifest:

    setup_logging()
    return run(parse_cli(argv, description=__doc__ or "", stage="score"))


if __name__ == "__main__":
    main()

"""Fact tagging on real Wikipedia: share of tokens flagged, and FactTagger's speed against spaCy.

Baseline: spaCy's own `nlp.pipe` with the full en_core_web_sm pipeline (tok2vec, tagger, parser,
attribute_ruler, lemmatizer, ner) on the same texts, in the same process, one thread. Ours:
`FactTagger` (only the components the rule needs) for spans alone, and `FactTagger.tag` end to end
(spans + our byte-level BPE + `align_flags`). Last, the token flags of the reduced pipeline are
compared with those of the full one. Tokens are always our tokenizer's tokens (an 8k BPE trained on
the slice), so tokens/s rows compare like with like. Speeds use process CPU time (the
machine is shared; CPU time is what one core delivers), best of `--repeats` interleaved runs.

    .venv/bin/python -m bench.facts --docs 40 --repeats 2
"""

from __future__ import annotations

import os

# One core: spaCy's numpy/BLAS must not spread over threads, or "per core" means nothing.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from lacy.core.config import FactsConfig  # noqa: E402
from lacy.corpus.corpora import read_corpus  # noqa: E402
from lacy.corpus.tokenizer import train_tokenizer  # noqa: E402
from lacy.labels.facts import FactTagger, align_flags, load_spacy, spacy_info  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best (CPU seconds, wall seconds) of `repeats` calls."""
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=40, help="wiki2015 articles in the slice (first N)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained on the slice")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is kept)")
    args = ap.parse_args(argv)

    docs = list(read_corpus("wiki2015", max_docs=args.docs))
    texts = [d["text"] for d in docs]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    cfg = FactsConfig()
    tagger = FactTagger(cfg)
    full = load_spacy(cfg.spacy_model)
    assert max(map(len, texts)) <= full.max_length, "baseline would need chunking; use fewer/shorter docs"

    tagged = tagger.tag(texts, tokenizer)
    n_tokens = sum(len(t.ids) for t in tagged)
    n_fact = sum(int(t.fact.sum()) for t in tagged)
    per_doc = np.array([t.fact.mean() for t in tagged if len(t.ids)])
    words = sum(len(t.split()) for t in texts)
    print(f"slice: {len(docs)} wiki2015 articles, {sum(map(len, texts)):,} chars, {words:,} words, "
          f"{n_tokens:,} tokens ({args.vocab}-vocab BPE)")
    print(f"fact tokens: {n_fact / n_tokens:.1%} of tokens (per-article mean {per_doc.mean():.1%}, "
          f"min {per_doc.min():.1%}, max {per_doc.max():.1%})")
    print(f"spaCy: {spacy_info(tagger.nlp)['model']} {spacy_info(tagger.nlp)['version']}; "
          f"ours runs {tagger.nlp.pipe_names}, baseline {full.pipe_names}")

    rows = {
        "spaCy nlp.pipe, full pipeline (baseline)":
            lambda: sum(len(d) for d in full.pipe(texts, batch_size=cfg.batch_size)),
        "spaCy nlp.pipe, needed components only":
            lambda: sum(len(d) for d in tagger.nlp.pipe(texts, batch_size=cfg.batch_size)),
        "FactTagger.fact_spans (needed components)": lambda: tagger.fact_spans(texts),
        "FactTagger.tag (spans + BPE + align_flags)": lambda: tagger.tag(texts, tokenizer),
    }
    results = {name: (float("inf"), float("inf")) for name in rows}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hurts every row alike
        for name, fn in rows.items():
            cpu, wall = timed(fn, 1)
            results[name] = (min(results[name][0], cpu), min(results[name][1], wall))

    base_cpu = results["spaCy nlp.pipe, full pipeline (baseline)"][0]
    print("\n| what | CPU s | wall s | tokens/s per core | docs/s per core | speed vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (cpu, wall) in results.items():
        print(f"| {name} | {cpu:.1f} | {wall:.1f} | {n_tokens / cpu:,.0f} | {len(docs) / cpu:.2f} | "
              f"{base_cpu / cpu:.2f}x |")

    # Alignment alone: the vectorised searchsorted over every token of the slice.
    spans = tagger.fact_spans(texts)
    cpu, _ = timed(lambda: [align_flags(t.offsets, s) for t, s in zip(tagged, spans, strict=True)],
                   args.repeats)
    print(f"\nalign_flags alone: {n_tokens / cpu:,.0f} tokens/s per core ({cpu * 1e3:.1f} ms for the slice)")

    # Are the dropped components (parser, lemmatizer) really not needed? Same rule on the full pipeline.
    full_spans = FactTagger(cfg, nlp=full).fact_spans(texts)
    same = sum(int((align_flags(t.offsets, f) == t.fact).sum())
               for t, f in zip(tagged, full_spans, strict=True))
    print(f"token flags equal to the full pipeline's: {same / n_tokens:.3%} "
          f"({n_tokens - same} of {n_tokens:,} tokens differ)")


if __name__ == "__main__":
    main()

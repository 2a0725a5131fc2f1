"""Birth-year probe: does the big model (SmolLM2-135M) know when people were born, alone and with
their article's passages in context?

    .venv/bin/python -m bench.birth_year_probe --people 50 --seed 0

50 random (fixed seed) wiki2015 people with a Pantheon birth year; prompt "NAME was born in the year";
greedy continuation of a few tokens; correct when the first year-like number (3-4 digits, "BC" makes it
negative) equals the birth year. Three arms on the same people, same HF big-model code path:
  - no retrieval: the bare prompt;
  - retrieval: the retrieval context (`lacy.cascade.big.Reader`) with topic = the article title
    (top-k passages of that article by BM25
    for the title words, topped up from the whole store);
  - lead passage: the article's first passage only (what an oracle "read the lead" would give).
Proportions with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from pathlib import Path

from lacy.cascade.big import Reader, format_passages
from lacy.cascade.hf_big import BigLM
from lacy.cascade.knowledge import SqlitePassageStore, build_store
from lacy.core.config import load_config
from lacy.core.paths import REPO_ROOT
from lacy.corpus.corpora import corpus_for
from lacy.model import load_big_model

_YEAR = re.compile(r"\b(\d{3,4})\b(\s*(?:BCE|BC|B\.C\.))?")


def first_year(text: str) -> int | None:
    """First year-like number in `text` ("384 BC" -> -384), None if there is none."""
    match = _YEAR.search(text)
    if match is None:
        return None
    year = int(match.group(1))
    return -year if match.group(2) else year


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--db", type=Path,
                        default=REPO_ROOT / "runs" / "bench" / "knowledge-wiki2015-100.sqlite",
                        help="wiki2015 store (built with 100-word passages if missing)")
    parser.add_argument("--show", type=int, default=5, help="print this many example continuations")
    args = parser.parse_args(argv)

    corpus = corpus_for(load_config(None, ["--data.corpus", "wiki2015"]))
    docs = list(corpus.documents())
    people = [e for e in corpus.people(docs) if e.birth_year is not None]
    chosen = random.Random(args.seed).sample(people, args.people)
    if not args.db.exists():
        print(build_store(docs, args.db, passage_words=100).summary())
    store = SqlitePassageStore(args.db)
    model, tokenizer = load_big_model("smollm2")
    big = BigLM(model, tokenizer)
    reader = Reader(store, top_k=args.top_k)

    arms = {
        "no retrieval": lambda e, prompt: big.continue_text(
            prompt, unit="tokens", max_tokens=args.max_tokens),
        f"retrieval (topic=title, top_k={args.top_k})": lambda e, prompt: big.continue_text(
            prompt, unit="tokens", max_tokens=args.max_tokens, context=reader.context_for(prompt, e.title)),
        "lead passage": lambda e, prompt: big.continue_text(
            prompt, unit="tokens", max_tokens=args.max_tokens,
            context=format_passages(store.passages_of(e.doc_id)[:1])),
    }
    for arm, answer in arms.items():
        start = time.perf_counter()
        correct = 0
        for i, entity in enumerate(chosen):
            prompt = f"{entity.name} was born in the year"
            out = answer(entity, prompt)
            ok = first_year(out) == entity.birth_year
            correct += ok
            if i < args.show:
                verdict = "ok" if ok else "wrong"
                print(f"  [{arm}] {prompt!r} -> {out!r} (true {entity.birth_year}, {verdict})")
        lo, hi = wilson(correct, len(chosen))
        print(f"{arm:40s} {correct}/{len(chosen)} = {correct / len(chosen):.2f}  "
              f"95% Wilson CI [{lo:.2f}, {hi:.2f}]  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

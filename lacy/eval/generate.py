"""How biographies get written: the prompt for a person, and the generators that write them.

    generator = LocalGenerator(cfg, {"lacy-steps": "runs/x/train/lacy-steps/final"})
    requests = [Request(bio_prompt(e, "name"), "lacy-steps", "retrieval", "p_call", threshold, 48, topic=e.name)
                for e in people]
    bios = biographies(people, generator.generate_many(requests), "name")   # one batch
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from lacy.cascade.big import BigCall, BigModel, BigSession, build_big
from lacy.cascade.engine import Cascade, generate_batch
from lacy.cascade.lm import SmallLM
from lacy.core.compute import compute_thread
from lacy.core.config import PROMPT_STYLES, LacyConfig
from lacy.core.console import tracked
from lacy.model import load_small_model


class EntityLike(Protocol):
    """What the evaluator reads of a person (`lacy.corpus.readers.Entity` has all of it)."""

    name: str
    title: str
    doc_id: str
    birth_year: int | None
    birth_place: str | None
    occupation: str | None


def bio_prompt(entity: EntityLike, style: str = "lead") -> str:
    """The biography prompt for one person.

    "lead" (default) is `"{name} ("`: our small models are base LMs pretrained on Wikipedia, whose
    leads almost always read "Name (8 February 1834 – 2 February 1907) was a Russian chemist ...", so an
    open parenthesis after the name makes them write life dates, then nationality and occupation - the
    attributes we check - in the first sentence. "instruct" is FActScore's "Tell me a bio of NAME."
    for instruction-tuned models. "name" is the name alone: synthetic biographies open with it
    ("Anna Keller was born on ...").
    """
    if style == "lead":
        return f"{entity.name} ("
    if style == "instruct":
        return f"Tell me a bio of {entity.name}.\n"
    if style == "name":
        return entity.name
    raise ValueError(f"bio_prompt: unknown style {style!r}; choose from {PROMPT_STYLES}")


@dataclass
class Generation:
    entity: EntityLike
    text: str
    """The whole biography, prompt included (claims naming the person are excluded anyway)."""
    call_rate: float | None = None
    calls: int | None = None
    decision_points: int | None = None
    """Calls and the decision points they were chosen among (a `CascadeResult`'s), when known."""
    spans: list[tuple[str, str]] | None = None
    """(text, source) pieces of the generation, when known: where the big model wrote."""
    small_tokens: int | None = None
    big_tokens: int | None = None
    """Tokens each model wrote (their own tokenizers'), when known."""


def biographies(entities: Sequence[EntityLike], outs: Sequence[Any], prompt_style: str = "lead") -> list[Generation]:
    """One biography per person from what was written for their prompt (`bio_prompt`): a text (prompt
    included or not) or an object with `.text` (and `.call_rate`, `.calls`, `.decision_points`,
    `.spans`, as a `Generated`). The biography is prompt + continuation for the lead and name styles, the
    continuation alone for instruct."""
    generations = []
    for entity, out in zip(entities, outs, strict=True):
        prompt = bio_prompt(entity, prompt_style)
        text = out.text if hasattr(out, "text") else str(out)
        # A lead prompt ("NAME (") is the start of the biography; an instruction is not part of it.
        if prompt_style == "instruct":
            text = text.removeprefix(prompt)
        elif not text.startswith(prompt):
            text = prompt + text
        generations.append(Generation(entity, text, getattr(out, "call_rate", None), getattr(out, "calls", None),
                                      getattr(out, "decision_points", None), getattr(out, "spans", None),
                                      getattr(out, "small_tokens", None), getattr(out, "big_tokens", None)))
    return generations


def export_generations(path: str | Path, system: str, generations: Sequence[Generation]) -> Path:
    """One JSON line per biography in FActScore's input format, `{"topic", "output"}` (its `--input_path`:
    FActScore itself can score them), plus ours: the system, the spans each model wrote ("prompt",
    "small", "big"), calls, decision points, call rate and tokens. Written atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for g in generations:
        spans = [{"text": text, "source": source} for text, source in (g.spans or [])]
        lines.append(json.dumps({"topic": g.entity.name, "output": g.text, "system": system, "spans": spans,
                                 "calls": g.calls, "decision_points": g.decision_points, "call_rate": g.call_rate,
                                 "small_tokens": g.small_tokens, "big_tokens": g.big_tokens}) + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Generators: who writes the text


@dataclass
class Generated:
    """What the evaluator reads of one generation (a `CascadeResult` or an HTTP answer)."""

    text: str
    spans: list[tuple[str, str]]
    calls: int = 0
    decision_points: int = 0
    call_rate: float = 0.0
    small_tokens: int = 0
    big_tokens: int = 0
    """Tokens each model wrote (the small model's steps that were not calls; the big model's own tokens)."""


@dataclass(frozen=True)
class Request:
    """One generation: which small model (None: the big model alone), which big side (None: the small
    model alone), and the call policy (a fixed threshold on the trigger's log-odds score: the cascade's
    `call_log_odds`)."""

    prompt: str
    model: str | None
    big: str | None
    trigger: str = "p_call"
    threshold: float | None = None
    max_tokens: int = 32
    topic: str | None = None
    unit: str | None = None
    """What one call writes (word, entity, tokens); None: the cascade config's."""


class Generator(Protocol):
    """Who writes the evaluation's texts: in this process (`LocalGenerator`, batched), on Ray Data's
    model actors or over HTTP to Serve (`jobs.experiment`). `generate_many` keeps the requests' order."""

    def generate_many(self, requests: Sequence[Request]) -> list[Generated]: ...


class LocalGenerator:
    """Every request decoded in this process on its compute thread (`lacy.core.compute`), as batches:
    requests of the small models decode together (`lacy.cascade.engine.generate_batch`: every small step
    one forward pass, every pending big-model call one big-model batch, calls held back until `eval.big_fill`
    of the people wait on one), `eval.batch_people` at a time; the big model alone writes as many texts a
    batch (make run's two big-alone rows: 2.05 min, 2.5 in batches of 16). Each text is what a cascade decoding
    that request alone writes, up to the float rounding of batched passes."""

    def __init__(self, cfg: LacyConfig, models: dict[str, str], big: BigModel | None = None) -> None:
        self.cfg, self.compute = cfg, compute_thread()
        self.small = {name: self.compute.call(load_small_model, path) for name, path in models.items()}
        self.big = build_big(cfg, device="cpu", retrieval=True) if big is None else big

    def generate(self, request: Request) -> Generated:
        return self.generate_many([request])[0]

    def generate_many(self, requests: Sequence[Request]) -> list[Generated]:
        if unknown := {r.model for r in requests if r.model is not None} - set(self.small):
            raise ValueError(f"no small model {sorted(unknown)} here; loaded: {sorted(self.small)}")
        alone = [i for i, r in enumerate(requests) if r.model is None]
        cascades = [i for i, r in enumerate(requests) if r.model is not None]
        outs: dict[int, Generated] = {}
        size = self.cfg.eval.batch_people
        chunks = [(cascades[i:i + size], self._cascade_batch) for i in range(0, len(cascades), size)]
        chunks += [(alone[i:i + size], self._big_batch) for i in range(0, len(alone), size)]
        for chunk, write in tracked(chunks, "decoding", total=len(chunks), unit="batch"):
            outs.update(zip(chunk, self.compute.call(write, [requests[i] for i in chunk]), strict=True))
        return [outs[i] for i in range(len(requests))]

    def _big_batch(self, requests: Sequence[Request]) -> list[Generated]:
        """The big model alone: `max_tokens` tokens after each prompt, as one batch."""
        calls = [BigCall(uuid.uuid4().hex, r.prompt, "tokens", r.max_tokens, r.big == "retrieval",
                         r.topic if r.big == "retrieval" else None) for r in requests]
        replies = self.big.continue_batch(calls)
        for call in calls:
            self.big.end_session(call.session)
        return [Generated(r.prompt + reply.result().text, [(r.prompt, "prompt"), (reply.text, "big")],
                          big_tokens=reply.generated) for r, reply in zip(requests, replies, strict=True)]

    def _cascade_batch(self, requests: Sequence[Request]) -> list[Generated]:
        """Cascades (a small model, with a big side or alone) decoded together."""
        decodings = []
        for r in requests:
            big = None if r.big is None else BigSession(self.big, retrieval=r.big == "retrieval")
            ccfg = self.cfg.cascade if r.unit is None else replace(self.cfg.cascade, big_unit=r.unit)
            cascade = Cascade(SmallLM(*self.small[r.model]), big, ccfg)
            decodings.append(cascade.start(r.prompt, call_log_odds=r.threshold, trigger=r.trigger,
                                           max_new_tokens=r.max_tokens, allow_calls=big is not None,
                                           topic=r.topic if r.big == "retrieval" else None))
        try:
            results = generate_batch(decodings, self.cfg.eval.big_fill)
        finally:
            for d in decodings:
                if d.cascade.big is not None:
                    d.cascade.big.close()
        return [Generated(x.text, [(s.text, s.source) for s in x.spans], x.calls, x.decision_points, x.call_rate,
                          x.small_tokens, x.big_tokens) for x in results]

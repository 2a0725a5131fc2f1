"""Batched decoding across request sessions, each with its own KV cache (what the Serve replicas batch).

`continue_batch`: greedy continuation for many big-model sessions at once; `BigSessions` holds those
sessions for a BigModel replica and isolates each call of a batch from the others' failures;
`BatchQueue` forms a replica's batches from the calls that arrive while the previous batch runs.
`FeedBatcher` + `feed_many`: concurrent small-model steps of many cascades as one forward pass (the
SmallModel deployment): continuous batching, where what arrives during one pass forms the next.

`continue_batch` in detail:
Each session is a `BigLM` whose KV cache holds its own text between calls. A batched call first brings
every session up to date on its text (only the new suffix is encoded, exactly as `continue_text`
does), then decodes all sessions together: their caches are left-padded to one length and stacked
[B, heads, L, d], each step feeds one token per session with an attention mask over the padding and
explicit positions (so rotary/learned position embeddings see each session's true positions), and at
the end every session takes back exactly its own slice of the cache. Results equal `continue_text`'s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import DynamicCache

from lacy.cascade.engine import BigLM, BigModelError, BigRequestError, CachedLM, _ends_unit
from lacy.core import storage
from lacy.core.compute import compute_thread
from lacy.model import count_parameters, load_big_model

if TYPE_CHECKING:
    from lacy.core.config import LacyConfig

log = logging.getLogger(__name__)


def _decide(lm: BigLM, out: str, generated: list[int], unit: str, max_tokens: int) -> tuple[int | None, str]:
    """The session's next token and its text so far, or None when its continuation is complete."""
    if len(generated) >= max_tokens or lm.room() <= 0:
        return None, out
    token = int(torch.argmax(lm.logits))
    if token == lm.tokenizer.eos_token_id:
        return None, out
    extended = lm.decode(generated + [token])
    if unit != "tokens" and _ends_unit(out, extended[len(out):], unit):
        return None, out
    return token, extended


@torch.inference_mode()
def continue_batch(lms: Sequence[BigLM], texts: Sequence[str], *, units: Sequence[str],
                   max_tokens: Sequence[int], contexts: Sequence[str] | None = None,
                   stats: dict[str, float] | None = None) -> list[str]:
    """`[lm.continue_text(text, unit=u, max_tokens=m, context=c) ...]`, decoded as one batch.

    All sessions must share one model (they are sessions of one deployment replica). `stats`, when
    given, accumulates the seconds of bringing the sessions up to date ("prefill_s", tokens fed:
    "prefill_tokens") and of the batched decoding ("decode_s", "decode_steps")."""
    n = len(lms)
    if not n:
        return []
    if len({id(lm.model) for lm in lms}) != 1:
        raise ValueError("continue_batch: all sessions must share one model")
    if len({id(lm) for lm in lms}) != n:
        raise ValueError("continue_batch: a session appears twice in one batch")
    for unit, m in zip(units, max_tokens, strict=True):
        if unit not in ("word", "entity", "tokens") or m <= 0:
            raise ValueError(f"bad unit/max_tokens: {unit!r}, {m}")
    contexts = contexts or [""] * n
    start, fed_before = time.perf_counter(), sum(lm.tokens_processed for lm in lms)
    sync_many(lms, [lm.encode(context + text) for lm, text, context in zip(lms, texts, contexts, strict=True)])
    if stats is not None:
        stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - start
        stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + sum(lm.tokens_processed for lm in lms) - fed_before
    start = time.perf_counter()

    outs, generated, tokens = [""] * n, [[] for _ in range(n)], [None] * n
    for i, lm in enumerate(lms):
        tokens[i], outs[i] = _decide(lm, outs[i], generated[i], units[i], max_tokens[i])
    if all(t is None for t in tokens):
        return outs

    model = lms[0].model
    device = model.device
    lengths = [len(lm.ids) for lm in lms]
    width = max(lengths)
    layers = len(lms[0].cache.layers)
    stacked = []
    for layer in range(layers):
        keys, values = [], []
        for lm, length in zip(lms, lengths, strict=True):
            k, v = lm.cache.layers[layer].keys, lm.cache.layers[layer].values
            pad = (0, 0, width - length, 0)  # left-pad the sequence dimension of [1, H, L, d]
            keys.append(torch.nn.functional.pad(k, pad))
            values.append(torch.nn.functional.pad(v, pad))
        stacked.append((torch.cat(keys), torch.cat(values)))
    cache = DynamicCache(ddp_cache_data=stacked)
    mask = torch.zeros(n, width, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, width - length:] = 1
    positions = torch.tensor(lengths, device=device)
    fed = [0] * n
    pad_id = lms[0].start_id

    while any(t is not None for t in tokens):
        if stats is not None:
            stats["decode_steps"] = stats.get("decode_steps", 0) + 1
        live = torch.tensor([t is not None for t in tokens], device=device)
        step = torch.tensor([[pad_id if t is None else t] for t in tokens], device=device)
        mask = torch.cat([mask, live.long()[:, None]], dim=1)
        out = model(input_ids=step, attention_mask=mask, position_ids=positions[:, None],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        for i, lm in enumerate(lms):
            if tokens[i] is None:
                continue
            generated[i].append(tokens[i])
            lm.tokens_generated += 1
            lm.tokens_processed += 1
            lm.logits = out.logits[i, -1].float()
            fed[i] += 1
            positions[i] += 1
            tokens[i], outs[i] = _decide(lm, outs[i], generated[i], units[i], max_tokens[i])

    if stats is not None:
        stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - start
    # Once a session stops it stays stopped, so its valid cache is its padded-away prefix plus the
    # first fed[i] appended columns; later columns are masked filler.
    for i, lm in enumerate(lms):
        lo, hi = width - lengths[i], width + fed[i]
        lm.cache = DynamicCache(ddp_cache_data=[
            (layer.keys[i:i + 1, :, lo:hi].contiguous(), layer.values[i:i + 1, :, lo:hi].contiguous())
            for layer in cache.layers])
        lm.ids = lm.ids + generated[i]
    return outs


# ----------------------------------------------------------------------------------------------
# Small-model steps of many sessions as one forward pass


def _stack(caches: Sequence[Any], kept: Sequence[int]) -> DynamicCache | None:
    """The first kept[i] cached positions of every session, left-padded to one length: [B, H, C, d]."""
    width = max(kept)
    if width == 0:
        return None
    ref = next(c for c, k in zip(caches, kept, strict=True) if k > 0)
    stacked = []
    for layer in range(len(ref.layers)):
        keys, values = [], []
        for cache, k in zip(caches, kept, strict=True):
            shape = list(ref.layers[layer].keys.shape)
            if k == 0:
                shape[2] = width
                keys.append(ref.layers[layer].keys.new_zeros(shape))
                values.append(ref.layers[layer].values.new_zeros(shape))
                continue
            pad = (0, 0, width - k, 0)
            keys.append(torch.nn.functional.pad(cache.layers[layer].keys[:, :, :k], pad))
            values.append(torch.nn.functional.pad(cache.layers[layer].values[:, :, :k], pad))
        stacked.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(ddp_cache_data=stacked)


@torch.inference_mode()
def feed_many(lms: Sequence[CachedLM], new_ids: Sequence[list[int]]) -> None:
    """`lm.forward(ids)` for every session, sessions of one model run as one forward pass.

    Every session of a pass feeds the same number of tokens, the longest suffix among them: a session
    with a shorter one feeds its last cached tokens again (cropped from its cache), so no padding sits
    between a session's cache and its input, and each session's valid cache ends up one contiguous
    slice. Caches are left-padded (masked) and positions are explicit, so results equal separate
    passes up to float rounding. A session with fewer tokens in all than the pass feeds runs alone."""
    if len(lms) != len(new_ids):
        raise ValueError(f"feed_many: {len(lms)} sessions but {len(new_ids)} id lists")
    groups: dict[int, list[int]] = {}
    for i, lm in enumerate(lms):
        groups.setdefault(id(lm.model), []).append(i)
    for members in groups.values():
        width = max(len(new_ids[i]) for i in members)
        batch = [i for i in members if len(lms[i].ids) + len(new_ids[i]) >= width]
        for i in members:
            if i not in batch or len(batch) == 1:
                lms[i].forward(new_ids[i])
        if len(batch) < 2:
            continue
        start = time.perf_counter()
        model = lms[batch[0]].model
        kept = [len(lms[i].ids) + len(new_ids[i]) - width for i in batch]
        cache = _stack([lms[i].cache for i in batch], kept)
        prefix = max(kept)
        device = model.device
        input_ids = torch.tensor([(lms[i].ids + new_ids[i])[-width:] for i in batch], device=device)
        mask = torch.zeros(len(batch), prefix + width, dtype=torch.long, device=device)
        for b, k in enumerate(kept):
            mask[b, prefix - k:] = 1
        positions = torch.tensor([[k + j for j in range(width)] for k in kept], device=device)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        seconds = time.perf_counter() - start
        for b, (i, k) in enumerate(zip(batch, kept, strict=True)):
            lm = lms[i]
            lm.cache = DynamicCache(ddp_cache_data=[
                (layer.keys[b:b + 1, :, prefix - k:].contiguous(),
                 layer.values[b:b + 1, :, prefix - k:].contiguous())
                for layer in out.past_key_values.layers])
            lm.logits = out.logits[b, -1].float()
            lm.ids = lm.ids + list(new_ids[i])
            lm.tokens_processed += width
            lm.seconds += seconds


def sync_many(lms: Sequence[CachedLM], ids: Sequence[list[int]]) -> None:
    """`lm.sync(ids)` for every session, what they still have to feed run as batched passes."""
    todo = [(lm, new) for lm, want in zip(lms, ids, strict=True) if (new := lm.prepare(want))]
    if todo:
        feed_many([lm for lm, _ in todo], [new for _, new in todo])


@dataclass
class _Feed:
    lm: CachedLM
    ids: list[int]
    before: int
    """How many ids the session had cached when it asked."""
    since: float = field(default_factory=time.monotonic)
    done: bool = False
    error: BaseException | None = None


class FeedBatcher:
    """Runs the forward passes of concurrently decoding sessions as batches (set `lm.feeder = batcher`).

    A decoding thread's `feed(lm, ids)` blocks until its logits are ready. One pass runs at a time and
    what arrives meanwhile forms the next; a batch goes as soon as every decoding session has
    submitted (so a lone stream never waits) or the oldest step has waited `max_wait_s`. Sessions say
    they are decoding with `with batcher.session():` and that they wait on something else (the big
    model) with `with batcher.paused():`. If a batch fails, its steps run one by one so only the
    failing session sees the error."""

    def __init__(self, max_batch: int = 32, max_wait_s: float = 0.002,
                 run_on: Callable[..., Any] | None = None) -> None:
        if max_batch <= 0 or max_wait_s < 0:
            raise ValueError(f"max_batch must be positive and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.run_on = run_on or (lambda fn, *args: fn(*args))
        """Runs each pass (`ComputeThread.call` in a server; default: in the feeding thread)."""
        self._cond = threading.Condition()
        self._pending: list[_Feed] = []
        self._busy = False
        self.active = 0
        """Sessions decoding now (not paused)."""
        self.batches = 0
        self.steps = 0
        """Passes run and steps fed (their ratio is the mean batch size)."""
        self.forward_s = 0.0
        self.wait_s = 0.0
        """Seconds in passes, and summed over steps from submitting to the start of their pass."""

    @contextmanager
    def session(self) -> Iterator[None]:
        with self._cond:
            self.active += 1
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self.active += 1

    def _ready(self) -> bool:
        return bool(self._pending) and not self._busy and (
            len(self._pending) >= max(self.active, 1) or len(self._pending) >= self.max_batch
            or time.monotonic() >= self._pending[0].since + self.max_wait_s)

    def feed(self, lm: CachedLM, ids: list[int]) -> None:
        item = _Feed(lm, list(ids), len(lm.ids))
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()
            while not item.done:
                if not self._ready():
                    wait = None if self._busy or not self._pending else \
                        max(0.0, self._pending[0].since + self.max_wait_s - time.monotonic())
                    self._cond.wait(wait)
                    continue
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                self._busy = True
                self._cond.release()
                start = time.monotonic()
                try:
                    self.run_on(self._run, batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self.batches += 1
                    self.steps += len(batch)
                    self.forward_s += time.monotonic() - start
                    self.wait_s += sum(start - fed.since for fed in batch)
                    for fed in batch:
                        fed.done = True
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error

    @staticmethod
    def _run(batch: list[_Feed]) -> None:
        try:
            feed_many([f.lm for f in batch], [f.ids for f in batch])
        except Exception:
            for fed in batch:  # each session not yet fed redoes its own step alone
                try:
                    if len(fed.lm.ids) == fed.before:  # feed_many updates a session whole or not at all
                        fed.lm.forward(fed.ids)
                except Exception as err:
                    fed.error = err


# ----------------------------------------------------------------------------------------------
# Big-model calls of many request sessions (what a BigModel replica runs)


class BigCall(NamedTuple):
    session: str
    text: str
    unit: str
    max_tokens: int
    retrieval: bool = False
    topic: str | None = None
    sent: float = 0.0
    """time.time() when the caller sent it (0: unknown), for the waiting time in `BigSessions.stats`."""


def device_for(gpus: float, what: str) -> str:
    """cuda when the deployment reserves GPUs for `what`, else cpu; a reservation without CUDA is an error."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"serve.{what}_gpus is {gpus} but this process sees no CUDA device")
    return "cuda"


class BigSessions:
    """The big model for many request sessions, each with its own KV cache (LRU, serve.big_sessions).

    `continue_many` decodes the calls of concurrent sessions as one batch (`continue_batch`); a call
    that fails (its own session, its retrieval, the batch) fails alone: the others are redone one by
    one and answer. Results are dicts: {text, processed, generated} or {error, status}.
    """

    def __init__(self, cfg: LacyConfig, device: str | None = None) -> None:
        self.cfg = cfg
        self.compute = compute_thread()  # loads and decodes on the process's one compute thread
        self.compute.set_threads(cfg.serve.torch_threads)  # else Ray's: 1 thread for a fractional big_cpus
        self.model, self.tokenizer = self.compute.call(load_big_model, cfg.big.path, cfg.big.dtype)
        self.compute.call(self.model.to, device or device_for(cfg.serve.big_gpus, "big"))
        self.torch_threads = self.compute.call(torch.get_num_threads)
        self.store = None
        if cfg.big.retrieval:
            from lacy.cascade.knowledge import SqlitePassageStore

            storage.pull(cfg, cfg.knowledge.db_path)  # a replica on another node than the run's driver
            self.store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)
        self.sessions: OrderedDict[tuple[str, bool], Any] = OrderedDict()
        self.lock = threading.Lock()  # end_session (any thread) against the batch on the compute thread
        self.stats: dict[str, float] = {"batches": 0, "calls": 0, "wait_s": 0.0, "arrival_s": 0.0}
        """Batches and calls so far, seconds the calls waited from `sent` to their batch's start (of
        which arrival_s: from `sent` to reaching the replica, see `arrived`), and
        continue_batch's prefill_s / prefill_tokens / decode_s / decode_steps (the bench profiles these)."""

    def _session(self, session: str, retrieval: bool) -> Any:
        key = (session, retrieval)
        if key not in self.sessions:
            lm: Any = BigLM(self.model, self.tokenizer)
            if retrieval:
                if self.store is None:
                    raise BigRequestError("retrieval was asked for but this deployment has no knowledge store")
                from lacy.cascade.knowledge import RetrievalBigLM

                lm = RetrievalBigLM.from_config(lm, self.store, self.cfg.knowledge)
            self.sessions[key] = lm
            while len(self.sessions) > self.cfg.serve.big_sessions:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def arrived(self, call: BigCall) -> None:
        """Count the time `call` took to reach this replica (the rest of its wait is the batch queue)."""
        if call.sent:
            self.stats["arrival_s"] += time.time() - call.sent

    def continue_many(self, calls: Sequence[BigCall]) -> list[dict]:
        return self.compute.call(self._continue_many, calls)

    def _continue_many(self, calls: Sequence[BigCall]) -> list[dict]:
        with self.lock:
            now = time.time()
            self.stats["batches"] += 1
            self.stats["calls"] += len(calls)
            self.stats["wait_s"] += sum(now - c.sent for c in calls if c.sent)
            results: list[dict | None] = [None] * len(calls)
            ready: list[tuple[int, Any, BigLM, str]] = []
            for i, call in enumerate(calls):
                try:
                    if call.unit not in ("word", "entity", "tokens") or call.max_tokens <= 0:
                        raise BigRequestError(f"bad unit/max_tokens {call.unit!r}/{call.max_tokens}")
                    lm = self._session(call.session, call.retrieval)
                    base, context = (lm.big, lm.context_for(call.text, "", call.topic)) if call.retrieval else (lm, "")
                    if any(base is b for _, _, b, _ in ready):
                        raise BigRequestError("one session called twice at once")
                    ready.append((i, lm, base, context))
                except Exception as err:
                    results[i] = _call_failure(err)
            before = [(lm.tokens_processed, lm.tokens_generated) for _, lm, _, _ in ready]
            try:
                outs: list[str | BaseException] = list(continue_batch(
                    [b for _, _, b, _ in ready], [calls[i].text for i, *_ in ready],
                    units=[calls[i].unit for i, *_ in ready], max_tokens=[calls[i].max_tokens for i, *_ in ready],
                    contexts=[c for *_, c in ready], stats=self.stats))
            except Exception:
                log.exception("a batch of %d big-model calls failed; running them one by one", len(ready))
                outs = []
                for i, _, base, context in ready:
                    base.reset()  # the failed batch may have left logits that do not match the cache
                    try:
                        outs.append(base.continue_text(calls[i].text, unit=calls[i].unit,
                                                       max_tokens=calls[i].max_tokens, context=context))
                    except Exception as err:
                        outs.append(err)
            for (i, lm, _, _), out, (processed, generated) in zip(ready, outs, before, strict=True):
                results[i] = _call_failure(out) if isinstance(out, BaseException) else {
                    "text": out, "processed": lm.tokens_processed - processed,
                    "generated": lm.tokens_generated - generated}
            return results  # type: ignore[return-value]  # every call has its result or its failure

    def end_session(self, session: str) -> None:
        with self.lock:
            for key in [k for k in self.sessions if k[0] == session]:
                del self.sessions[key]

    def info(self) -> dict:
        return {"parameters": count_parameters(self.model), "retrieval_available": self.store is not None,
                "sessions": len(self.sessions), "device": str(self.model.device),
                "torch_threads": self.torch_threads, "stats": dict(self.stats)}


class BatchQueue:
    """Async calls run as batches by `run` (a blocking function of a list, on `executor`), one batch
    at a time: the next batch takes every call that arrived while the previous one ran (up to
    `max_batch`), and only a call that finds the model idle waits `max_wait_s` for company.

    Ray Serve's `@serve.batch` (2.60) forms its next batch while the previous one still runs, so calls
    that arrive during a batch wait behind it in batches of one or two (measured: 1.6 calls per batch,
    636 ms waits, at 8 streams). Calls whose caller left before their batch starts are dropped."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch: int, max_wait_s: float,
                 executor: Executor | None = None) -> None:
        if max_batch <= 0 or max_wait_s < 0:
            raise ValueError(f"max_batch must be positive and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.executor = executor
        """Where `run` runs (None: the event loop's default executor)."""
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """`run`'s result for `item`, once its batch has run (on the calling event loop)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        idle = True
        while self._queue:  # bounded: ends once a batch finds nothing queued behind it
            if idle and len(self._queue) < self.max_batch and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            idle = False
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.run, [item for item, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
            except Exception as err:  # `run` isolates its items' own faults; this is the batch's
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)


def _call_failure(err: BaseException) -> dict:
    if isinstance(err, BigRequestError):
        return {"error": str(err), "status": 400}
    log.error("big-model call failed: %r", err)
    return {"error": "the big model failed on this call", "status": 500}


def raise_for_failure(out: dict) -> dict:
    """A BigSessions result, or its failure as the BigModelError the cascade reports."""
    if "error" in out:
        raise (BigRequestError if out.get("status") == 400 else BigModelError)(out["error"])
    return out

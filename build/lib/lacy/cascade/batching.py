"""Small-model steps of many sessions as one forward pass, each session with its own KV cache.

`feed_many`: new tokens for several sessions of one model as one batched forward (caches left-padded
and stacked, each session taking back its own slice); `sync_many`: bring many sessions up to their
texts that way. `FeedBatcher`: the continuous batching of concurrently decoding threads (a Serve
SmallModel replica): what arrives during one pass forms the next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from lacy.cascade.lm import CachedLM


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
    slice; sessions whose suffixes differ by more than a pass is worth go in different passes
    (`_passes`). Caches are left-padded (masked) and positions are explicit, so results equal separate
    passes up to float rounding. A session with fewer tokens in all than the pass feeds runs alone."""
    if len(lms) != len(new_ids):
        raise ValueError(f"feed_many: {len(lms)} sessions but {len(new_ids)} id lists")
    by_model: dict[int, list[int]] = {}
    for i, lm in enumerate(lms):
        by_model.setdefault(id(lm.model), []).append(i)
    for members in (g for model_members in by_model.values() for g in _passes(model_members, new_ids)):
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


PASS_COST_TOKENS = 64
"""What one more forward pass costs, in tokens fed: a pass reads every weight once, so on a CPU a pass of
a few tokens costs about as much as this many tokens more in a pass that runs anyway."""


def _passes(members: list[int], new_ids: Sequence[list[int]]) -> list[list[int]]:
    """Sessions grouped into passes: by the length of their suffix, neighbouring lengths merged while
    the tokens a merge re-feeds (every session of a pass feeds the longest suffix) cost less than one
    more pass."""
    by_width: dict[int, list[int]] = {}
    for i in members:
        by_width.setdefault(len(new_ids[i]), []).append(i)
    groups = [by_width[w] for w in sorted(by_width)]
    merged = [groups[0]]
    for group in groups[1:]:
        # merging the shorter group into this one re-feeds (width - its width) tokens per session
        extra = len(merged[-1]) * (len(new_ids[group[0]]) - len(new_ids[merged[-1][0]]))
        if extra < PASS_COST_TOKENS:
            merged[-1] = merged[-1] + group
        else:
            merged.append(group)
    return merged


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

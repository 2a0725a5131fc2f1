"""Small-model steps of many sessions as one forward pass, each session with its own KV cache.

`feed_many`: new tokens for several sessions of one model as one batched forward (caches left-padded
and stacked in one slab, each session taking back its own slice); `sync_many`: bring many sessions up to their
texts that way. `FeedBatcher`: the continuous batching of concurrently decoding threads (a Serve
SmallModel replica): what arrives during one pass forms the next. `SlabLayer` / `stack_caches` /
`take_row`: the batch's KV cache as a preallocated slab that steps write into in place (the big
model's batched decoding uses them too).
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
from transformers.cache_utils import DynamicLayer

from lacy.cascade.lm import CachedLM


class SlabLayer(DynamicLayer):
    """A cache layer whose positions live in a preallocated slab [B, H, capacity, d]: a step writes its
    keys/values in place, where `DynamicLayer` concatenates (a copy of the whole cache at every step,
    ≈10 % of a batched decode on a CPU). `keys`/`values` are views of the filled part; a full slab doubles."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.slab_keys, self.slab_values, self.length = keys, values, length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._view()

    def _view(self) -> None:
        self.keys = self.slab_keys[:, :, :self.length]
        self.values = self.slab_values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.slab_keys.shape[-2]:
            grow = (0, 0, 0, max(end, 2 * self.slab_keys.shape[-2]) - self.slab_keys.shape[-2])
            self.slab_keys = torch.nn.functional.pad(self.slab_keys, grow)
            self.slab_values = torch.nn.functional.pad(self.slab_values, grow)
        self.slab_keys[:, :, self.length:end] = key_states
        self.slab_values[:, :, self.length:end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers 5's convention, as DynamicLayer.crop
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.slab_keys = self.slab_keys.index_select(0, indices)
        self.slab_values = self.slab_values.index_select(0, indices)
        self._view()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        self.length = 0
        self._view()


def slab_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> DynamicCache:
    """A cache over the given per-layer slabs [B, H, capacity, d], of which the first `length` positions
    are filled (taken as they are, not copied)."""
    cache = DynamicCache()
    cache.layers = [SlabLayer(keys, values, length) for keys, values in layers]
    return cache


def stack_caches(caches: Sequence[Any], kept: Sequence[int], capacity: int) -> DynamicCache | None:
    """The first kept[i] cached positions of every session, left-padded with zeros to one length, in a slab
    with room for `capacity` positions in all (what the batch then feeds is written in place)."""
    width = max(kept)
    if width == 0:
        return None
    ref = next(c for c, k in zip(caches, kept, strict=True) if k > 0)
    slabs = []
    for layer in range(len(ref.layers)):
        shape = list(ref.layers[layer].keys.shape)
        shape[0], shape[2] = len(caches), max(capacity, width)
        keys, values = ref.layers[layer].keys.new_empty(shape), ref.layers[layer].values.new_empty(shape)
        for b, (cache, k) in enumerate(zip(caches, kept, strict=True)):
            keys[b, :, :width - k].zero_()  # padding is masked, but must be finite: 0 x NaN is NaN
            values[b, :, :width - k].zero_()
            if k:
                keys[b, :, width - k:width] = cache.layers[layer].keys[0, :, :k]
                values[b, :, width - k:width] = cache.layers[layer].values[0, :, :k]
        slabs.append((keys, values))
    return slab_cache(slabs, width)


def take_row(cache: DynamicCache, row: int, start: int, end: int | None = None) -> DynamicCache:
    """One session's own cache out of a batch's: row `row`, positions `start` to `end` (default: the last),
    copied."""
    end = cache.layers[0].keys.shape[-2] if end is None else end
    return slab_cache([(layer.keys[row:row + 1, :, start:end].clone(), layer.values[row:row + 1, :, start:end].clone())
                       for layer in cache.layers], end - start)


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
        prefix = max(kept)
        cache = stack_caches([lms[i].cache for i in batch], kept, prefix + width)
        device = model.device
        input_ids = torch.tensor([(lms[i].ids + new_ids[i])[-width:] for i in batch], device=device)
        mask = torch.zeros(len(batch), prefix + width, dtype=torch.long, device=device)
        for b, k in enumerate(kept):
            mask[b, prefix - k:] = 1
        positions = torch.tensor([[k + j for j in range(width)] for k in kept], device=device)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, **lms[batch[0]].pass_options)
        seconds = time.perf_counter() - start
        for b, (i, k) in enumerate(zip(batch, kept, strict=True)):
            lm = lms[i]
            lm.cache = take_row(out.past_key_values, b, prefix - k)
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

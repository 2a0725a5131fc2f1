"""When a call fires: thresholds on the trigger's log-odds score, running quantiles that hold a call rate,
and the offline calibration that maps a target rate to a fixed threshold.

Threshold: fixed — as a probability (`call_threshold`, compared as its log-odds) or directly as
log-odds (`call_log_odds`, what calibration returns) — or held at a requested call rate by a running
quantile of the scores seen at decision points (`RunningQuantile`, shared across cascades through
`Quantiles`); `calibrate` maps a rate to a fixed log-odds threshold offline and `closed_loop_threshold`
corrects it with calls on. A call fires when the score is strictly above the threshold.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Decoder(Protocol):
    """What calibration decodes with (`lacy.cascade.engine.Cascade`)."""

    def generate(self, prompt: str, **policy: Any) -> Any: ...


def log_odds(p: float) -> float:
    """log(p / (1 - p)): the score scale of every trigger; 0 -> -inf (always fires), 1 -> inf (never)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def probability(log_odds: float) -> float:
    """The inverse of `log_odds` (the logistic function), without overflow at any finite or infinite value."""
    return 0.5 * (1 + math.tanh(log_odds / 2))


CALL_POLICIES = ("call_threshold", "call_log_odds", "call_rate")
"""Request fields that each set the call policy; a request gives one at most."""


def several_policies(given: Sequence[str]) -> str:
    """The error message for a request that gives more than one of CALL_POLICIES."""
    return f"give one of call_threshold, call_log_odds or call_rate, not several (got {' and '.join(given)})"


class RunningQuantile:
    """Holds a call rate: decides "fire" when a value is above the running (1 - rate) quantile.

    `observe(p)` adds p to the last `window` values and returns p > quantile(values, 1 - rate)
    (numpy's linear interpolation). For the first `warmup` values the quantile is too noisy, so
    `initial` is the threshold instead (0: log-odds of probability 0.5). rate 0 never fires, rate 1
    always fires. Not thread-safe on its own: cascades that share one go through `Quantiles`, which
    locks.
    """

    def __init__(self, rate: float, warmup: int = 16, initial: float = 0.0, window: int = 4096) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        if warmup < 0 or window <= 0:
            raise ValueError(f"warmup must be >= 0 and window > 0, got {warmup}, {window}")
        self.rate, self.warmup, self.initial, self.window = rate, warmup, initial, window
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self.seen = 0

    def quantile(self, q: float) -> float:
        """The q-quantile of the values in the window, linearly interpolated (numpy's default)."""
        if not self._sorted:
            raise ValueError("no values observed yet")
        pos = q * (len(self._sorted) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(self._sorted) - 1)
        return self._sorted[lo] + (pos - lo) * (self._sorted[hi] - self._sorted[lo])

    def threshold(self) -> float:
        """The threshold the next decision uses (before its own value is added)."""
        if self.seen < self.warmup or not self._sorted:
            return self.initial
        return self.quantile(1.0 - self.rate)

    def observe(self, p: float) -> bool:
        self.seen += 1
        self._recent.append(p)
        bisect.insort(self._sorted, p)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        if self.rate <= 0.0:
            return False
        if self.rate >= 1.0:
            return True
        if self.seen <= self.warmup:
            return p > self.initial
        return p > self.quantile(1.0 - self.rate)


class Quantiles:
    """The running quantiles of every cascade given this object, one per (scope, rate); thread-safe.

    Scope: what a target rate is held over. A cascade observes under its trigger, so P(<CALL>) and
    confidence scores never mix; callers add more (Serve: the model name). The number of quantiles is
    bounded (`max_keys`, least recently used dropped, whose warm-up then starts again), so clients that
    send many distinct rates cannot grow memory.
    """

    def __init__(self, max_keys: int = 64, warmup: int = 16, initial: float = 0.0, window: int = 4096) -> None:
        if max_keys <= 0:
            raise ValueError(f"max_keys must be positive, got {max_keys}")
        self.max_keys, self.warmup, self.initial, self.window = max_keys, warmup, initial, window
        self._lock = threading.Lock()
        self._by_key: OrderedDict[tuple, RunningQuantile] = OrderedDict()

    def observe(self, rate: float, value: float, scope: Hashable = ()) -> bool:
        """`RunningQuantile.observe(value)` of the quantile for (scope, rate): fire or not."""
        key = (scope, rate)
        with self._lock:
            rq = self._by_key.get(key)
            if rq is None:
                rq = self._by_key[key] = RunningQuantile(rate, self.warmup, self.initial, self.window)
                while len(self._by_key) > self.max_keys:
                    self._by_key.popitem(last=False)
            self._by_key.move_to_end(key)
            return rq.observe(value)

    def get(self, rate: float, scope: Hashable = ()) -> RunningQuantile | None:
        """The quantile of (scope, rate), if held (for inspection; do not observe through it)."""
        with self._lock:
            return self._by_key.get((scope, rate))

    def __len__(self) -> int:
        return len(self._by_key)


def decision_scores(cascade: Decoder, prompts: list[str], *, max_new_tokens: int | None = None,
                    trigger: str | None = None) -> np.ndarray:
    """`trigger`'s score (None: the cascade's config) at every decision point of each prompt decoded
    with calls disabled: the open-loop distribution `calibrate` takes its quantiles from."""
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    scores: list[float] = []
    for prompt in prompts:
        scores += cascade.generate(prompt, allow_calls=False, max_new_tokens=max_new_tokens,
                                   trigger=trigger).call_scores
    if not scores:
        raise ValueError("no decision points while decoding the prompts; nothing to calibrate on")
    return np.asarray(scores, dtype=np.float64)


def calibrate(cascade: Decoder, prompts: list[str], target_rate: float, *,
              max_new_tokens: int | None = None, trigger: str | None = None) -> float:
    """The fixed log-odds threshold (`call_log_odds`) on `trigger`'s score (None: the cascade's config)
    whose call rate on `prompts` is `target_rate` with calls disabled (open loop).

    Returns the (1 - rate) quantile of `decision_scores`: a share `target_rate` of them lies strictly
    above it (up to ties). Calls change what the small model reads next, so the realised rate with
    calls on can differ a lot (a model that calls where it is confused calls again after the big
    model's words); `closed_loop_threshold` corrects for that.
    """
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {target_rate}")
    scores = decision_scores(cascade, prompts, max_new_tokens=max_new_tokens, trigger=trigger)
    return float(np.quantile(scores, 1.0 - target_rate))


@dataclass
class Calibration:
    threshold: float
    """On the trigger's log-odds score (a cascade's `call_log_odds`)."""
    realised_rate: float | None
    """Call rate with calls on at `threshold` (None: open loop only, never measured)."""
    rounds: int = 0
    """Closed-loop rounds run (each one decodes the calibration prompts with calls on)."""
    open_loop_rate: float | None = None
    """Realised rate at the open-loop threshold (the first round's), when measured."""


class ClosedLoop:
    """The search for the log-odds threshold whose call rate *with calls on* is closest to a target, one
    measurement at a time: `threshold` is the next one to measure (None once done), `observe(rate)`
    takes its realised rate, `result()` the best measured. Many searches (models, triggers, rates) step
    together, so each round of measurements can be decoded as one batch.

    Starts at the open-loop threshold (`calibrate`'s quantile of `scores`) and, until the target is
    bracketed, moves to the open-loop quantile at the level scaled by target / realised rate, or (when
    that cannot move it: after a call the scores can leave the open-loop range altogether) by a step of
    `step` log-odds, doubling; then interpolation of logit(rate) between the bracket's ends (the
    midpoint when that lands near an end). Stops after `rounds` measurements or within `tolerance`.
    rounds = 0 is the open-loop threshold, unmeasured."""

    def __init__(self, scores: np.ndarray, target_rate: float, rounds: int, tolerance: float = 0.02,
                 step: float = 1.0) -> None:
        if not 0.0 < target_rate <= 1.0:
            raise ValueError(f"target_rate must be in (0, 1], got {target_rate}")
        self.scores, self.target, self.rounds, self.tolerance, self.step = scores, target_rate, rounds, tolerance, step
        self.start = float(np.quantile(scores, 1.0 - target_rate))
        self.threshold: float | None = self.start if rounds > 0 else None
        self.measured, self.first = 0, None
        self.best: Calibration | None = None
        self.above: tuple[float, float] | None = None  # (x, rate) of the highest threshold still calling too often
        self.below: tuple[float, float] | None = None  # (x, rate) of the lowest threshold calling too rarely

    def observe(self, rate: float) -> None:
        """The realised rate at `threshold`; moves `threshold` on (None when the search is done)."""
        assert self.threshold is not None, "the search is done"
        x, target, eps = self.threshold, self.target, 1e-6
        self.measured += 1
        self.first = rate if self.first is None else self.first
        if self.best is None or abs(rate - target) < abs(self.best.realised_rate - target):
            self.best = Calibration(x, rate)
        if abs(rate - target) <= self.tolerance or self.measured >= self.rounds:
            self.threshold = None
            return
        if rate > target:
            self.above = (x, rate) if self.above is None or x > self.above[0] else self.above
        else:
            self.below = (x, rate) if self.below is None or x < self.below[0] else self.below
        if self.above is None or self.below is None:
            # Unbracketed: the open-loop quantile at a proportionally scaled level, when that moves the
            # threshold the right way; else a fixed step, doubling.
            level = float(np.mean(self.scores > x)) * target / max(rate, eps)
            guess = float(np.quantile(self.scores, 1.0 - min(level, 1.0)))
            if (guess > x) == (rate > target) and guess != x:
                x = guess
            else:
                x, self.step = x + (self.step if rate > target else -self.step), 2 * self.step
        else:
            logit = lambda r: log_odds(min(max(r, eps), 1 - eps))  # noqa: E731 - finite at rates 0 and 1
            (x1, r1), (x2, r2) = self.above, self.below
            y1, y2 = logit(r1), logit(r2)
            x = x1 + (logit(target) - y1) * (x2 - x1) / (y2 - y1) if y2 != y1 else (x1 + x2) / 2
            if not min(x1, x2) + 0.1 * abs(x2 - x1) < x < max(x1, x2) - 0.1 * abs(x2 - x1):
                x = (x1 + x2) / 2
        self.threshold = x

    def result(self) -> Calibration:
        if self.best is None:
            return Calibration(self.start, None, 0)
        return Calibration(self.best.threshold, self.best.realised_rate, self.measured, self.first)


def closed_loop_threshold(scores: np.ndarray, target_rate: float, realised: Callable[[float], float],
                          rounds: int, tolerance: float = 0.02, step: float = 1.0) -> Calibration:
    """`ClosedLoop` run to its end with `realised(threshold)` measuring each threshold's call rate."""
    search = ClosedLoop(scores, target_rate, rounds, tolerance, step)
    while search.threshold is not None:
        search.observe(realised(search.threshold))
    return search.result()

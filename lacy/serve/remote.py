"""The big model behind a Ray Serve deployment, seen from another replica; the deployment's batches.

`HandleBig` is the `lacy.cascade.big.BigModel` interface over a DeploymentHandle (what a SmallModel
replica calls); `BatchQueue` forms the BigModel replica's batches from the calls that arrive while the
previous batch runs. Neither imports Ray: the handle is anything with Serve's `.remote(...)` shape.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from lacy.cascade.big import BigCall, BigModelError, BigReply, BigSlow, BigUnavailable

log = logging.getLogger(__name__)


class HandleBig:
    """A `BigModel` over a handle to the BigModel deployment: `handle.continue_call.remote(call)` ->
    BigReply, `.end_session.remote(id)`, `.health.remote()`, each answering something with
    `result(timeout_s=)` and `cancel()`. A call waits at most `timeout_s` (503), or its caller's
    shorter `BigCall.wait_s` (`BigSlow`), in short polls, so a caller that stops waiting (`cancel`: its
    client left, or it takes a small-only answer and the big model went down) ends it at once.
    Exceptions in `overloaded` mean busy (the model is not marked down); any other means its replica
    did not answer: `on_unavailable` hears it at once (the engine marks the big model down, which ends
    other requests' waits), then the call is sent once more (503 if that fails too)."""

    def __init__(self, handle: Any, timeout_s: float, overloaded: tuple[type[BaseException], ...] = (),
                 poll_s: float = 0.2, on_unavailable: Callable[[str], None] | None = None) -> None:
        self.handle, self.timeout_s, self.overloaded, self.poll_s = handle, timeout_s, overloaded, poll_s
        self.on_unavailable = on_unavailable

    def continue_batch(self, calls: Sequence[BigCall], cancel: threading.Event | None = None) -> list[BigReply]:
        sent = [replace(call, sent=time.time()) for call in calls]
        responses = [self.handle.continue_call.remote(call) for call in sent]  # the replica batches them
        return [self._wait(call, response, cancel or threading.Event()) for call, response in zip(
            sent, responses, strict=True)]

    def _wait(self, call: BigCall, response: Any, cancel: threading.Event) -> BigReply:
        start = time.monotonic()
        slow = call.wait_s is not None and call.wait_s < self.timeout_s  # the caller's wait ends first
        deadline = start + (call.wait_s if slow else self.timeout_s)
        retried = False
        while True:  # bounded: the deadline, or the caller stopping
            if cancel.is_set() or time.monotonic() > deadline:
                response.cancel()
                if cancel.is_set():
                    return BigReply.failure(BigModelError("abandoned: the caller stopped waiting"))
                if slow:
                    return BigReply.failure(BigSlow(f"no big-model answer within serve.undelegated_wait_s "
                                                    f"({call.wait_s:g} s)"))
                return BigReply.failure(BigUnavailable(f"no answer within serve.big_timeout_s ({self.timeout_s:g} s)"))
            try:
                return response.result(timeout_s=self.poll_s)
            except TimeoutError:
                continue
            except self.overloaded:
                return BigReply.failure(BigModelError("the big model is overloaded"))
            except Exception as err:
                if not retried:
                    # A replica that just died may still be in the handle's routing table for a moment
                    # after its successor answers health probes; the call carries the whole text, so
                    # sending it once more (routed afresh) is safe.
                    log.warning("big-model call failed (%s); retrying once", type(err).__name__)
                    if self.on_unavailable is not None:
                        self.on_unavailable(f"a call failed ({type(err).__name__})")
                    retried, response = True, self.handle.continue_call.remote(call)
                    continue
                log.warning("big-model call failed again (%s)", type(err).__name__)
                return BigReply.failure(BigUnavailable("its replica did not answer"))

    def end_session(self, session: str) -> None:
        self.handle.end_session.remote(session)

    def health(self, timeout_s: float) -> dict:
        return self.handle.health.remote().result(timeout_s=timeout_s)


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

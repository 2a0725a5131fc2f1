"""BatchQueue (the BigModel replica's batching): what arrives while a batch runs forms the next batch,
whole; a batch's failure reaches its own calls only; callers that left are not run."""

import asyncio
import threading
import time

import pytest

from lacy.serve.remote import BatchQueue


class Recorder:
    """A `run` that records its batches and holds the first one until `release` is set."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list] = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            assert self.release.wait(10), "the test never released the first batch"
        if self.fail_on in items:
            raise RuntimeError("the batch failed")
        return [f"out-{item}" for item in items]


async def _staggered(queue: BatchQueue, recorder: Recorder, items: list, gap_s: float) -> list:
    first = asyncio.create_task(queue.submit("first"))
    await asyncio.sleep(0.05)  # the first batch is running (held)
    rest = []
    for item in items:
        rest.append(asyncio.create_task(queue.submit(item)))
        await asyncio.sleep(gap_s)  # more than max_wait_s apart: @serve.batch would batch each alone
    recorder.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_calls_arriving_during_a_batch_form_the_next_batch_whole():
    recorder = Recorder()
    queue = BatchQueue(recorder, max_batch=16, max_wait_s=0.005)
    out = asyncio.run(_staggered(queue, recorder, list(range(6)), gap_s=0.02))
    assert out == ["out-first", *[f"out-{i}" for i in range(6)]]
    assert recorder.batches == [["first"], list(range(6))]


def test_max_batch_splits_and_a_lone_call_waits_only_max_wait():
    recorder = Recorder()
    queue = BatchQueue(recorder, max_batch=4, max_wait_s=0.005)
    asyncio.run(_staggered(queue, recorder, list(range(6)), gap_s=0.0))
    assert recorder.batches == [["first"], [0, 1, 2, 3], [4, 5]]

    async def lone() -> float:
        start = time.monotonic()
        await queue.submit("alone")
        return time.monotonic() - start

    assert asyncio.run(lone()) < 1.0  # the worker ended with its queue; a new one starts for this call
    assert recorder.batches[-1] == ["alone"]


def test_a_failed_batch_fails_its_own_calls_only_and_the_queue_goes_on():
    recorder = Recorder(fail_on=2)
    queue = BatchQueue(recorder, max_batch=3, max_wait_s=0.0)
    out = asyncio.run(_staggered(queue, recorder, list(range(6)), gap_s=0.0))
    assert out[0] == "out-first"
    assert all(isinstance(o, RuntimeError) for o in out[1:4])  # the batch [0, 1, 2]
    assert out[4:] == ["out-3", "out-4", "out-5"]


def test_a_caller_that_left_is_not_run():
    recorder = Recorder()
    queue = BatchQueue(recorder, max_batch=16, max_wait_s=0.0)

    async def scenario() -> None:
        first = asyncio.create_task(queue.submit("first"))
        await asyncio.sleep(0.05)
        gone, kept = asyncio.create_task(queue.submit("gone")), asyncio.create_task(queue.submit("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        recorder.release.set()
        assert await first == "out-first" and await kept == "out-kept"
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(scenario())
    assert recorder.batches == [["first"], ["kept"]]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        BatchQueue(Recorder(), max_batch=0, max_wait_s=0.0)


def test_batches_run_on_the_given_executor():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as executor:
        ident = executor.submit(threading.get_ident).result()
        seen = []
        queue = BatchQueue(lambda items: seen.append(threading.get_ident()) or items, 4, 0.0, executor=executor)

        async def two() -> list:
            return await asyncio.gather(queue.submit(1), queue.submit(2))

        assert asyncio.run(two()) == [1, 2]
    assert seen and set(seen) == {ident}

"""Runs an ordered list of stages as asyncio tasks joined by bounded queues.

A stage is a small object with a ``name``, a blocking ``process(item) -> list``, a
``flush() -> list`` called once at the end of the stream and, optionally, ``control(command)``
for the ``Control`` commands that travel between the frames. Each stage runs on its own single
worker thread: the event loop stays free for I/O, the heavy numeric stages overlap each other,
and a stage's state is only ever touched by one thread. The end of the stream travels through
the same queues as the media (``END``), so stages never race a side channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterable, Iterator, Protocol

from stream.frames import Control, StageTimes

log = logging.getLogger(__name__)


def run_async(coroutine):
    """asyncio.run on uvloop when it is installed (lower scheduling latency), else the stock loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


class Stage(Protocol):
    name: str

    def process(self, item: Any) -> list[Any]: ...

    def flush(self) -> list[Any]: ...


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()


async def iterate_in_thread(items: Iterable[Any], executor: ThreadPoolExecutor) -> AsyncIterator[Any]:
    """Drive a blocking iterator (a decoder, say) from a worker thread."""
    loop = asyncio.get_running_loop()
    iterator: Iterator[Any] = iter(items)
    done = object()
    while (item := await loop.run_in_executor(executor, next, iterator, done)) is not done:
        yield item


async def _shut_down(executors: list[ThreadPoolExecutor], patience: float = 30.0) -> None:
    """Wait, without blocking the event loop, for the call each worker thread may still be in.

    A cancelled stage leaves its thread finishing the current call (a model window can take a
    second); ``shutdown(wait=True)`` here would freeze every other session on this loop meanwhile.
    Each stage has at most one call queued, so a no-op queued behind it finishes when the thread is
    idle. Once this returns, no thread touches a stage again and the stages can be closed.
    """
    loop = asyncio.get_running_loop()
    idle = [loop.run_in_executor(executor, _idle) for executor in executors]
    for executor in executors:
        executor.shutdown(wait=False)
    done, pending = await asyncio.wait(idle, timeout=patience)
    if pending:
        log.warning("%d pipeline threads still busy %.0f s after the stream ended", len(pending), patience)


def _idle() -> None:
    pass


class Pipeline:
    """source -> stages[0] -> ... -> stages[-1]; queues hold at most ``queue_size`` items each."""

    def __init__(self, stages: list[Stage], queue_size: int = 32):
        self.stages = stages
        self.queue_size = queue_size
        self.times = StageTimes()
        self.first_queue: asyncio.Queue | None = None  # a live source checks it to drop, not block
        self._queues: list[asyncio.Queue] = []

    async def run(self, source: AsyncIterator[Any] | Iterable[Any]) -> StageTimes:
        queues = [asyncio.Queue(self.queue_size) for _ in range(len(self.stages) + 1)]
        self.first_queue, self._queues = queues[0], queues
        executors = [ThreadPoolExecutor(1, thread_name_prefix=f"stage-{stage.name}")
                     for stage in self.stages]
        source_executor = ThreadPoolExecutor(1, thread_name_prefix="stage-source")
        tasks = [asyncio.create_task(self._feed(source, queues[0], source_executor))]
        tasks += [asyncio.create_task(self._work(stage, queues[i], queues[i + 1], executors[i]))
                  for i, stage in enumerate(self.stages)]
        tasks.append(asyncio.create_task(self._drain(queues[-1])))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await _shut_down(executors + [source_executor])
        return self.times

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in each stage's inbox, by stage name (empty before ``run``)."""
        return {stage.name: queue.qsize() for stage, queue in zip(self.stages, self._queues)}

    async def _feed(self, source, outbox: asyncio.Queue, executor: ThreadPoolExecutor) -> None:
        # A blocking iterator is a decoder: its time is work. An async one is a live source: its
        # time is waiting for the world, so it is not counted.
        live = hasattr(source, "__aiter__")
        items = source if live else iterate_in_thread(source, executor)
        started = time.perf_counter()
        async for item in items:
            if not live:
                self.times.add("decode", time.perf_counter() - started)
            await outbox.put(item)
            started = time.perf_counter()
        await outbox.put(END)

    async def _work(self, stage: Stage, inbox: asyncio.Queue, outbox: asyncio.Queue,
                    executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await inbox.get()
            if isinstance(item, Control):
                handler = getattr(stage, "control", None)
                if handler is not None:
                    await loop.run_in_executor(executor, handler, item)
                await outbox.put(item)
                continue
            call = (stage.flush,) if item is END else (stage.process, item)
            started = time.perf_counter()
            results = await loop.run_in_executor(executor, *call)
            self.times.add(stage.name, time.perf_counter() - started, len(results))
            now = time.monotonic()
            for result in results:
                if hasattr(result, "stamp"):
                    result.stamp(stage.name, now)
                await outbox.put(result)
            if item is END:
                await outbox.put(END)
                return

    @staticmethod
    async def _drain(inbox: asyncio.Queue) -> None:
        while await inbox.get() is not END:
            pass

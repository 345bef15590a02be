"""One model worker per device: every session's model calls, batched across sessions.

Without it each session's model stage calls the shared model from its own thread, one window at a
time: on a GPU most of the card sits idle and sessions contend blindly. With it, a session's
model stage hands each call (encode the new faces, denoise a window, decode the new frames) to the
worker and waits; the worker's one thread owns the model and runs the jobs of many sessions as
one call:

- Jobs batch with jobs of the same kind and shape only: encodes and decodes are per frame, so any
  of them concatenate; denoise windows stack only at the same length, because the U-Net's
  GroupNorms and temporal attention span the window's frames (padding would change every frame).
  Within a length, windows that carry different numbers of known frames stack, each with its own
  mask (``LipSyncModel.denoise_windows``).
- Earliest deadline first: the next batch is the most urgent job and the most urgent of those
  that batch with it, up to ``max_batch``. A deadline is the capture time of the oldest frame the
  job is for, plus its session's latency budget.
- A batch waits at most ``fill_wait`` seconds after its most urgent job arrived for others to join.
- The worker never waits for a session: a job is queued only once complete, and its result is
  left for its session to collect. A stalled session costs the others nothing; a closed one has
  its queued jobs dropped and its jobs in the batch in flight failed at once (its thread is free;
  the batch runs on for the others).

Per-session state (the latent ring buffer, clocks) stays in the session's stages.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

MAX_BATCH = 8
FILL_WAIT = 0.004  # s: a few ms of waiting buys a fuller batch; more would be latency for all


class WorkerClosed(RuntimeError):
    """The worker, or this session's access to it, has closed: the job will not run."""


@dataclass(eq=False)
class _Job:
    kind: str
    shape: tuple  # with ``kind``: which jobs batch together
    inputs: tuple
    deadline: float
    client: "WorkerClient"
    arrived: float
    order: int  # ties on the deadline go first-come
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Called with the worker's lock held; the first outcome stands (a closed session's
        jobs are finished early, before their batch ends)."""
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class ModelWorker:
    """Owns ``model`` (a ``LipSyncModel``) and runs the jobs its clients submit, batched."""

    def __init__(self, model, max_batch: int = MAX_BATCH, fill_wait: float = FILL_WAIT,
                 unet: Callable | None = None):
        """``unet``: what denoise batches call instead of ``model.unet``, e.g. a
        ``models.cuda_graphs.GraphedUNet``; this worker's thread is then its only caller."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model = model
        self._runners = {**_RUNNERS, "denoise": functools.partial(_denoise, unet=unet)}
        self.resolution = model.resolution
        mask = getattr(model, "mask", None)
        self._device = mask.device if mask is not None else torch.device("cpu")
        self._cuda = self._device.type == "cuda"
        self.max_batch = max_batch
        self.fill_wait = fill_wait
        self._pending: list[_Job] = []
        self._running: list[_Job] = []  # the batch in flight
        self._cond = threading.Condition()
        self._closed = False
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # windows per U-Net call
        self.jobs_done = 0
        self.busy_seconds = 0.0
        self._thread.start()

    def client(self, name: str = "") -> "WorkerClient":
        return WorkerClient(self, name)

    def close(self) -> None:
        """Stop the worker: queued jobs fail with WorkerClosed; a batch in flight finishes."""
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.finish(error=WorkerClosed("the model worker has closed"))
            self._pending = []
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def queued(self) -> int:
        """Jobs waiting for a batch (not counting the batch in flight)."""
        with self._cond:
            return len(self._pending)

    def mean_batch_size(self) -> float:
        sizes = dict(self.batch_sizes)  # one copy: the worker thread adds to it meanwhile
        calls = sum(sizes.values())
        return sum(size * count for size, count in sizes.items()) / calls if calls else 0.0

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "jobs_done": self.jobs_done,
                "busy_seconds": round(self.busy_seconds, 3),
                "denoise_batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}

    # -- clients' side (any thread) ------------------------------------------------------------

    def run_job(self, client: "WorkerClient", kind: str, shape: tuple, inputs: tuple) -> Any:
        """Queue a job and wait for its result (raised: its error, or WorkerClosed)."""
        job = _Job(kind, shape, inputs, client.deadline, client, time.monotonic(), next(self._order))
        with self._cond:
            if self._closed or client.closed:
                raise WorkerClosed("the model worker has closed" if self._closed
                                   else f"session {client.name!r} has closed")
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _drop(self, client: "WorkerClient") -> None:
        """A closed client's jobs, queued or in the batch in flight, fail now: its thread is free
        at once. A batch in flight still runs to its end for the others."""
        with self._cond:
            for job in self._pending + self._running:
                if job.client is client:
                    job.finish(error=WorkerClosed(f"session {client.name!r} has closed"))
            self._pending = [job for job in self._pending if job.client is not client]

    # -- the worker thread -----------------------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        """The most urgent job and the most urgent of those that batch with it; None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                urgent = min(self._pending, key=lambda job: (job.deadline, job.order))
                group = sorted((job for job in self._pending
                                if job.kind == urgent.kind and job.shape == urgent.shape),
                               key=lambda job: (job.deadline, job.order))[: self.max_batch]
                fill_until = urgent.arrived + self.fill_wait
                now = time.monotonic()
                if len(group) < self.max_batch and now < fill_until:
                    self._cond.wait(fill_until - now)  # woken early by a new job: look again
                    continue
                taken = set(map(id, group))
                self._pending = [job for job in self._pending if id(job) not in taken]
                self._running = group
                return group

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                results = self._runners[batch[0].kind](self.model, [job.inputs for job in batch])
                if self._cuda:  # a batch is done when the card is, not when its kernels are queued
                    torch.cuda.synchronize(self._device)
                errors = [None] * len(batch)
            except Exception as exc:  # one bad batch fails its jobs, not the worker
                log.exception("model worker: a %s batch of %d failed", batch[0].kind, len(batch))
                results, errors = [None] * len(batch), [exc] * len(batch)
            self.busy_seconds += time.perf_counter() - started
            if batch[0].kind == "denoise":
                self.batch_sizes[len(batch)] += 1
            self.jobs_done += len(batch)
            with self._cond:
                for job, result, error in zip(batch, results, errors):
                    job.finish(result, error)
                self._running = []


def _encode(model, inputs: list[tuple]) -> list[torch.Tensor]:
    faces = [faces for (faces,) in inputs]
    return list(model.encode_condition(torch.cat(faces)).split([len(f) for f in faces]))


def _denoise(model, inputs: list[tuple], unet: Callable | None = None) -> list[torch.Tensor]:
    conditions = torch.stack([condition for condition, _, _ in inputs])
    audio = torch.stack([audio for _, audio, _ in inputs])
    carried = [0 if known is None else len(known) for _, _, known in inputs]
    known = None
    if any(carried):
        known = torch.zeros((*conditions.shape[:2], 4, *conditions.shape[-2:]), dtype=conditions.dtype,
                            device=conditions.device)
        for window, (_, _, latents) in enumerate(inputs):
            if latents is not None and len(latents):
                known[window, : len(latents)] = latents.to(known)
    return list(model.denoise_windows(conditions, audio, known, carried, unet=unet))


def _decode(model, inputs: list[tuple]) -> list[torch.Tensor]:
    latents = torch.cat([latents for latents, _ in inputs])
    faces = torch.cat([faces for _, faces in inputs])
    return list(model.decode(latents, faces).split([len(f) for _, f in inputs]))


_RUNNERS: dict[str, Callable[[Any, list[tuple]], list]] = {"encode": _encode, "denoise": _denoise,
                                                           "decode": _decode}


class WorkerClient:
    """One session's way to the worker, with the ``FaceGenerator`` methods: each call queues a job
    and blocks the calling thread (the session's model stage) until its batch has run.

    ``deadline`` (``time.monotonic()`` seconds) orders this session's next jobs among everyone's;
    the session's model stage sets it before each window. ``close()`` may come from any thread.
    """

    def __init__(self, worker: ModelWorker, name: str = ""):
        self.worker = worker
        self.name = name
        self.resolution = worker.resolution
        self.deadline = float("inf")
        self.closed = False

    def _job(self, kind: str, shape: tuple, *inputs) -> Any:
        if self.closed:
            raise WorkerClosed(f"session {self.name!r} has closed")
        return self.worker.run_job(self, kind, shape, inputs)

    def encode_condition(self, faces: torch.Tensor) -> torch.Tensor:
        return self._job("encode", tuple(faces.shape[1:]), faces)

    def denoise(self, condition: torch.Tensor, audio: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        return self._job("denoise", (*condition.shape, *audio.shape), condition, audio, known)

    def decode(self, latents: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        return self._job("decode", (*latents.shape[1:], *faces.shape[1:]), latents, faces)

    def close(self) -> None:
        """Leave the worker: queued jobs are dropped (their callers get WorkerClosed), a batch in
        flight is finished without this session's results."""
        self.closed = True
        self.worker._drop(self)

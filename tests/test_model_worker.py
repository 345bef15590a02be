"""The shared model worker (stream/model_worker.py): batched calls give what one session's calls
give, sessions do not leak into each other, the most urgent job goes first, and a stalled or closing
session costs the others nothing. The tiny config's real U-Net and VAE, seeded weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stream.config import load_config
from stream.model_worker import ModelWorker, WorkerClosed
from stream.pipeline import LipSync

# Batched and single calls run the same kernels on differently shaped arrays; BLAS blocking can
# move the last bits. Outputs are of order 1.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model():
    return LipSync.from_config(load_config("tiny")).generator


def window(model, frames: int, carried: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    latent = model.resolution // 8
    condition = torch.randn((frames, 9, latent, latent), generator=generator)
    audio = torch.randn((frames, 50, 384), generator=generator)
    known = torch.randn((carried, 4, latent, latent), generator=generator) if carried else None
    return condition, audio, known


def in_threads(calls) -> list:
    """Run each call on its own thread at once; their results (or exceptions) in order."""
    results: list = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


class Gated:
    """The real model behind a gate: each batch waits for the test to open it, and is recorded."""

    def __init__(self, model):
        self.model = model
        self.resolution = model.resolution
        self.gate = threading.Event()
        self.batches: list[tuple[str, int]] = []

    def encode_condition(self, faces):
        self.batches.append(("encode", len(faces)))
        self.gate.wait(10)
        return self.model.encode_condition(faces)

    def denoise_windows(self, conditions, audio, known, carried, unet=None):
        self.batches.append(("denoise", len(conditions)))
        self.gate.wait(10)
        return self.model.denoise_windows(conditions, audio, known, carried, unet=unet)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_batched_windows_equal_one_session_each_with_different_carried_prefixes_and_lengths(model):
    """Three 16-frame windows carrying 0, 12 and 8 known frames go through the U-Net as one batch; an
    8-frame window (a stream's start) submitted with them runs in its own. Each result equals the
    window denoised alone, within TOLERANCE."""
    windows = [window(model, 16, 0, 1), window(model, 16, 12, 2), window(model, 16, 8, 3), window(model, 8, 0, 4)]
    alone = [model.denoise(*w) for w in windows]
    worker = ModelWorker(model, max_batch=3, fill_wait=1.0)  # the three 16-frame windows fill a batch
    try:
        clients = [worker.client(f"s{i}") for i in range(len(windows))]
        batched = in_threads([lambda c=c, w=w: c.denoise(*w) for c, w in zip(clients, windows)])
        assert worker.batch_sizes == {3: 1, 1: 1}, worker.batch_sizes
    finally:
        worker.close()
    for one, together, (condition, _, known) in zip(alone, batched, windows):
        assert isinstance(together, torch.Tensor), together
        assert together.shape == (len(condition), 4, *condition.shape[-2:])
        torch.testing.assert_close(together, one, **TOLERANCE)
        if known is not None:  # the carried frames come back as they went in
            torch.testing.assert_close(together[: len(known)], known, **TOLERANCE)
        assert one.abs().mean() > 0.1


def test_batched_encodes_and_decodes_equal_one_session_each(model):
    generator = torch.Generator().manual_seed(7)
    faces = [torch.rand((n, 3, model.resolution, model.resolution), generator=generator) * 2 - 1 for n in (4, 16, 1)]
    worker = ModelWorker(model, max_batch=3, fill_wait=1.0)
    try:
        clients = [worker.client() for _ in faces]
        conditions = in_threads([lambda c=c, f=f: c.encode_condition(f) for c, f in zip(clients, faces)])
        latents = [condition[:, 5:9] for condition in conditions]  # the faces' own latents
        decoded = in_threads([lambda c=c, z=z, f=f: c.decode(z, f) for c, z, f in zip(clients, latents, faces)])
    finally:
        worker.close()
    for f, condition, pixels in zip(faces, conditions, decoded):
        torch.testing.assert_close(condition, model.encode_condition(f), **TOLERANCE)
        torch.testing.assert_close(pixels, model.decode(condition[:, 5:9], f), **TOLERANCE)


def test_one_sessions_audio_does_not_reach_another_in_the_same_batch(model):
    mine, theirs = window(model, 16, 4, 11), window(model, 16, 4, 12)
    louder = (theirs[0], theirs[1] * 3 + 1, theirs[2])
    worker = ModelWorker(model, max_batch=2, fill_wait=1.0)
    try:
        first = in_threads([lambda c=worker.client(): c.denoise(*mine), lambda c=worker.client(): c.denoise(*theirs)])
        second = in_threads([lambda c=worker.client(): c.denoise(*mine), lambda c=worker.client(): c.denoise(*louder)])
        assert worker.batch_sizes == {2: 2}
    finally:
        worker.close()
    torch.testing.assert_close(second[0], first[0], **TOLERANCE)
    assert (second[1] - first[1]).abs().mean() > 1e-2  # their change did change their own frames


def test_the_most_urgent_job_runs_first(model):
    """While a batch runs, three jobs of the same shape queue with deadlines 3, 1, 2 (in that order of
    arrival); one at a time (max_batch 1), they run 1, 2, 3."""
    gated = Gated(model)
    worker = ModelWorker(gated, max_batch=1, fill_wait=0.0)
    faces = {d: torch.full((d, 3, model.resolution, model.resolution), 0.1 * d) for d in (1, 2, 3, 4)}
    try:
        blocker = worker.client()
        threads = [threading.Thread(target=blocker.encode_condition, args=(faces[4],))]
        threads[0].start()
        wait_until(lambda: gated.batches)
        for deadline in (3, 1, 2):
            client = worker.client()
            client.deadline = deadline
            threads.append(threading.Thread(target=client.encode_condition, args=(faces[deadline],)))
            threads[-1].start()
            wait_until(lambda: worker.queued() == len(threads) - 1)
        gated.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        gated.gate.set()
        worker.close()
    # A batch of d faces identifies the job with deadline d.
    assert gated.batches == [("encode", 4), ("encode", 1), ("encode", 2), ("encode", 3)]


def test_a_stalled_session_does_not_hold_up_the_others(model):
    """Three sessions submit a window every 60 ms; one stops for 1.5 s mid-stream. The others'
    waits stay within two batches (the one running when they arrive and their own) all along:
    the worker never waits for a session."""
    windows = [window(model, 16, 12, 20 + i) for i in range(3)]
    worker = ModelWorker(model, max_batch=3, fill_wait=0.004)
    waits: dict[int, list[float]] = {0: [], 1: [], 2: []}
    stop = time.monotonic() + 3.0

    def session(i: int) -> None:
        client = worker.client(str(i))
        while time.monotonic() < stop:
            if i == 0 and stop - 2.0 < time.monotonic() < stop - 0.5:
                time.sleep(1.5)  # stalled: nothing submitted
            started = time.monotonic()
            client.deadline = started + 0.4
            client.denoise(*windows[i])
            waits[i].append(time.monotonic() - started)
            time.sleep(max(0.0, 0.06 - (time.monotonic() - started)))

    try:
        in_threads([lambda i=i: session(i) for i in range(3)])
        longest_batch = worker.busy_seconds / sum(worker.batch_sizes.values())
        longest_batch = max(longest_batch, max(min(w) for w in waits.values()))
    finally:
        worker.close()
    assert len(waits[0]) < len(waits[1])  # session 0 did stall
    for i in (1, 2):
        # Two batches, plus slack for a busy 2-core machine; waiting on the stalled session would be 1.5 s.
        assert max(waits[i]) < 2 * longest_batch + 0.3, (i, max(waits[i]), longest_batch)


def test_closing_a_session_mid_batch_frees_it_and_the_others_get_their_results(model):
    gated = Gated(model)
    worker = ModelWorker(gated, max_batch=3, fill_wait=1.0)
    windows = [window(model, 16, 8, 30 + i) for i in range(3)]
    clients = [worker.client(str(i)) for i in range(3)]
    results: list = [None] * 3
    try:
        def run(i):
            try:
                results[i] = clients[i].denoise(*windows[i])
            except WorkerClosed as exc:
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: gated.batches == [("denoise", 3)])  # the batch is in flight, held at the gate
        closed_at = time.monotonic()
        clients[1].close()
        threads[1].join(timeout=5)
        freed_after = time.monotonic() - closed_at
        assert isinstance(results[1], WorkerClosed) and freed_after < 1.0, (results[1], freed_after)
        with pytest.raises(WorkerClosed):
            clients[1].denoise(*windows[1])
        gated.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        gated.gate.set()
        worker.close()
    for i in (0, 2):
        torch.testing.assert_close(results[i], model.denoise(*windows[i]), **TOLERANCE)


def test_denoise_batches_call_the_unet_the_worker_is_given(model):
    """``ModelWorker(unet=...)`` (how CUDA graphs come in): every denoising step of a batch calls
    it, on the worker's thread, and the result is what the model's own U-Net gives."""
    calls: list[tuple[str, int]] = []

    def unet(sample, t, audio, deep_cache=None):
        calls.append((threading.current_thread().name, len(sample)))
        return model.unet(sample, t, audio, deep_cache=deep_cache)

    windows = [window(model, 16, 12, 21), window(model, 16, 0, 22)]
    worker = ModelWorker(model, max_batch=2, fill_wait=1.0, unet=unet)
    try:
        batched = in_threads([lambda c=worker.client(), w=w: c.denoise(*w) for w in windows])
    finally:
        worker.close()
    steps, videos = model.sampler.steps, 2 * (2 if model.sampler.guidance_scale > 1 else 1)
    assert calls == [("model-worker", videos)] * steps
    for w, together in zip(windows, batched):
        torch.testing.assert_close(together, model.denoise(*w), **TOLERANCE)

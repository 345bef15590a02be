"""The model stage: a window of aligned faces + audio chunks in, regenerated faces out.

It owns the latent ring buffer. Each frame's VAE condition is encoded once, when the frame is new
(a prepared avatar's frames bring theirs, encoded before the session: stream/avatar_prep.py);
its clean latents are kept after its window and handed to the next window as ``known`` context
(``LipSyncModel.denoise`` inpaints the new frames in time around them). Only new frames are
decoded. Entries leave the buffer when their frame drops out of the window.

Two policies decide which frames skip the model, both counted:
- silence: a frame whose ``speech`` weight is 0 keeps its original face;
- lateness: when the newest frame of a window is already older than ``late_after`` seconds, the
  whole window passes through (judged from its clock tick), so a slow model never makes the stream fall further behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from models.lipsync import FaceGenerator
from stream.frames import Control, FaceFrame, GeneratedFrame, Window
from stream.model_worker import WorkerClient, WorkerClosed

LATENCY_BUDGET = 0.4  # s from capture: the default deadline's slack when many sessions share a worker


def faces_to_tensor(faces: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 crops -> (F, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1


def tensor_to_faces(faces: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    pixels = ((faces.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class _Latents:
    condition: torch.Tensor  # (9, h, w)
    clean: torch.Tensor | None = None  # (4, h, w) once denoised


class Generation:
    name = "model"

    def __init__(self, model: FaceGenerator, late_after: float | None = None, record: bool = False,
                 budget: float = LATENCY_BUDGET):
        """``budget``: seconds from capture by which this session wants its frames; with a shared
        model worker (stream/model_worker.py) it orders this session's windows among everyone's."""
        self.model = model
        self.late_after = late_after
        self.budget = budget
        # For the seam benchmark: every generated crop, and the first new frame of each window.
        self.recorded: dict[int, np.ndarray] | None = {} if record else None
        self.boundaries: set[int] = set()
        self.frames_generated = 0
        self.frames_late = 0
        self.frames_silent = 0
        self._ring: dict[int, _Latents] = {}

    def _is_late(self, window: Window) -> bool:
        newest = window.frames[-1].frame.trace.due_at
        return (self.late_after is not None and newest is not None
                and time.monotonic() - newest > self.late_after)

    def process(self, window: Window) -> list[GeneratedFrame]:
        active = [f for f in window.frames if f.face is not None and f.speech > 0]
        new = {f.frame.index for f in window.new_frames}
        self.frames_silent += sum(1 for f in window.new_frames if f.face is not None and f.speech == 0)
        mouths: dict[int, np.ndarray] = {}
        if any(f.frame.index in new for f in active):
            if self._is_late(window):
                self.frames_late += sum(1 for f in active if f.frame.index in new)
            else:
                try:
                    mouths = self._generate(active, new)
                except WorkerClosed:  # the session is closing: what is left passes through
                    mouths = {}
        self._forget_before(window.frames[0].frame.index)
        return [GeneratedFrame(f, self._blend(f, mouths.get(f.frame.index))) for f in window.new_frames]

    def _deadline(self, active: list[FaceFrame], new: set[int]) -> float:
        """When the oldest new frame is due: its capture (its tick for a file) plus the budget."""
        times = [f.frame.trace.captured_at if f.frame.trace.captured_at is not None else f.frame.trace.due_at
                 for f in active if f.frame.index in new]
        known = [t for t in times if t is not None]
        return (min(known) if known else time.monotonic()) + self.budget

    def _generate(self, active: list[FaceFrame], new: set[int]) -> dict[int, np.ndarray]:
        if isinstance(self.model, WorkerClient):
            self.model.deadline = self._deadline(active, new)
        uncached = [f for f in active if f.frame.index not in self._ring]
        to_encode = [f for f in uncached if f.condition is None]  # a prepared avatar brings its own
        encoded = iter(self.model.encode_condition(faces_to_tensor([f.face.image for f in to_encode]))
                       if to_encode else ())
        for f in uncached:
            self._ring[f.frame.index] = _Latents(f.condition if f.condition is not None else next(encoded))
        entries = [self._ring[f.frame.index] for f in active]
        known_count = 0
        while known_count < len(entries) and entries[known_count].clean is not None \
                and active[known_count].frame.index not in new:
            known_count += 1
        known = torch.stack([e.clean for e in entries[:known_count]]) if known_count else None
        audio = torch.from_numpy(np.stack([f.audio for f in active]))
        clean = self.model.denoise(torch.stack([e.condition for e in entries]), audio, known)
        for entry, latents in zip(entries, clean):
            entry.clean = latents
        emitted = [i for i, f in enumerate(active) if f.frame.index in new]
        faces = faces_to_tensor([active[i].face.image for i in emitted])
        decoded = tensor_to_faces(self.model.decode(clean[emitted], faces))
        self.frames_generated += len(emitted)
        mouths = {active[i].frame.index: face for i, face in zip(emitted, decoded)}
        if self.recorded is not None:
            self.recorded.update(mouths)
            self.boundaries.add(min(new))
        return mouths

    @staticmethod
    def _blend(frame: FaceFrame, mouth: np.ndarray | None) -> np.ndarray | None:
        if mouth is None or frame.speech >= 1:
            return mouth
        original = frame.face.image.astype(np.float32)
        return np.rint(original + frame.speech * (mouth.astype(np.float32) - original)).astype(np.uint8)

    def release(self) -> None:
        """Any thread, as the session closes: stop waiting on a shared model worker, so that this
        stage's thread is free at once rather than after the batches queued before it."""
        if isinstance(self.model, WorkerClient):
            self.model.close()

    def control(self, command: Control) -> None:
        if command.kind in ("interrupt", "avatar"):  # no latents carried into what follows
            self._ring.clear()
        elif command.kind == "options":
            self.late_after = command.value.window_late_after
            self.budget = self.late_after or LATENCY_BUDGET

    def _forget_before(self, index: int) -> None:
        for stale in [i for i in self._ring if i < index]:
            del self._ring[stale]

    def flush(self) -> list[GeneratedFrame]:
        self._ring.clear()
        return []

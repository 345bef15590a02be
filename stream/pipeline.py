"""The lip-sync pipeline, declared in one place.

    decode -> face -> audio -> windows -> model -> paste -> sink

Every mode (file, live, WebRTC) runs this same sequence; modes differ only in their source,
their audio stage and their sink.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable

import torch

from models.cuda_graphs import GraphedUNet
from models.factory import build_models
from models.lipsync import BypassModel, FaceGenerator, LipSyncModel
from models.precision import select_device, select_dtype
from models.whisper_encoder import WhisperEncoder
from stream.audio_conditioning import AttachAudio
from stream.compositing import PasteBack
from stream.face_tracking import FaceTracking
from stream.generation import LATENCY_BUDGET, Generation
from stream.model_worker import FILL_WAIT, MAX_BATCH, ModelWorker
from stream.mouth_mask import mouth_mask
from stream.runner import Pipeline, Stage
from stream.windows import Windowing


@dataclass
class Summary:
    config: str
    device: str
    frames: int
    frames_without_face: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def stages_ms_per_frame(self) -> dict[str, float]:
        return {stage: 1000 * seconds / max(self.frames, 1) for stage, seconds in self.stage_seconds.items()}

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "device": self.device, "frames": self.frames,
                "frames_without_face": self.frames_without_face, "seconds": round(self.seconds, 3),
                "fps": round(self.fps, 2),
                "stages_ms_per_frame": {k: round(v, 2) for k, v in self.stages_ms_per_frame().items()}}


class LipSync:
    """The models and settings one job or session needs, built once from a config."""

    def __init__(self, config: dict, generator: FaceGenerator, audio_encoder: WhisperEncoder,
                 device: torch.device):
        self.config = config
        self.generator = generator
        self.audio_encoder = audio_encoder
        self.device = device
        self.worker: ModelWorker | None = None

    def share_model(self, max_batch: int = MAX_BATCH, fill_wait: float = FILL_WAIT,
                    cuda_graphs: bool = False) -> ModelWorker:
        """From now on, sessions built from this run their model calls on one worker that batches
        them across sessions (stream/model_worker.py) instead of each on its own thread.
        ``cuda_graphs``: the worker replays the U-Net from CUDA graphs (models/cuda_graphs.py)."""
        if not isinstance(self.generator, LipSyncModel):
            raise ValueError("only the lip-sync model can be shared by a worker (not the bypass)")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        if self.worker is not None:
            self.worker.close()
        unet = GraphedUNet(self.generator.unet) if cuda_graphs else None
        self.worker = ModelWorker(self.generator, max_batch, fill_wait, unet=unet)
        return self.worker

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    @classmethod
    def from_config(cls, config: dict, device: str = "auto", precision: str = "auto",
                    bypass: bool = False, checkpoints: str | None = None) -> "LipSync":
        torch_device = select_device(device)
        mask = torch.from_numpy(mouth_mask(config["resolution"]))
        models = build_models(config, mask, torch_device, select_dtype(torch_device, precision),
                              checkpoints)
        generator = BypassModel(config["resolution"]) if bypass else models.generator
        return cls(config, generator, models.audio_encoder, torch_device)

    @staticmethod
    def find(stages: list[Stage], kind: type | tuple[type, ...]) -> Any:
        """The stage of that class (or of one of those) in a pipeline built by ``stages``."""
        return next(stage for stage in stages if isinstance(stage, kind))

    def stages(self, audio: Stage, sink: Stage, stride: int | None = None,
               late_after: float | None = None, record: bool = False,
               face: Stage | None = None) -> list[Stage]:
        """``face``: the face stage, FaceTracking (every frame's face found) unless one is given
        (a prepared avatar's faces, stream/avatar_prep.py)."""
        return [
            face if face is not None else FaceTracking(self.config),
            audio,
            Windowing(self.config["window"], stride),
            Generation(self.worker.client() if self.worker is not None else self.generator, late_after, record,
                       budget=late_after or LATENCY_BUDGET),
            PasteBack(),
            sink,
        ]

    async def run_file(self, frames: Iterable | AsyncIterator, waveform_16k, n_frames: int,
                       sink: Stage) -> Summary:
        """Offline job: the whole audio is known up front; the video streams through."""
        stages = self.stages(AttachAudio(self.audio_encoder, waveform_16k, n_frames), sink)
        started = time.perf_counter()
        times = await Pipeline(stages).run(frames)
        return Summary(self.config["name"], str(self.device), times.items.get(PasteBack.name, 0),
                       self.find(stages, FaceTracking).frames_without_face, time.perf_counter() - started,
                       dict(times.seconds))

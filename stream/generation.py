"""The model stage: a window of aligned faces + audio chunks in, regenerated faces out."""

from __future__ import annotations

import numpy as np
import torch

from models.lipsync import FaceGenerator
from stream.frames import GeneratedFrame, Window


def faces_to_tensor(faces: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 crops -> (F, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1


def tensor_to_faces(faces: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    pixels = ((faces.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


class Generation:
    """Runs the model on the frames of a window that have a face; the others pass through."""

    name = "model"

    def __init__(self, model: FaceGenerator):
        self.model = model

    def process(self, window: Window) -> list[GeneratedFrame]:
        with_face = window.faces
        mouths: dict[int, np.ndarray] = {}
        if with_face:
            faces = faces_to_tensor([f.face.image for f in with_face])
            audio = torch.from_numpy(np.stack([f.audio for f in with_face]))
            generated = tensor_to_faces(self.model.generate(faces, audio))
            mouths = {f.frame.index: face for f, face in zip(with_face, generated)}
        return [GeneratedFrame(f, mouths.get(f.frame.index)) for f in window.frames]

    def flush(self) -> list[GeneratedFrame]:
        return []

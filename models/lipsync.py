"""The lip-sync generator: aligned faces + per-frame audio features -> faces with a new mouth.

This is LatentSync's per-window procedure (notes section 1, item 7): encode the masked face and
the reference face, denoise latents conditioned on both and on the audio, decode, and keep the
model's pixels only inside the mouth mask.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.sampler import DDIMSampler
from models.vae import FaceVAE


class FaceGenerator(Protocol):
    """What the pipeline needs from a model: (F, 3, H, W) faces in [-1, 1] + (F, 50, C) audio -> faces."""

    resolution: int

    def generate(self, faces: torch.Tensor, audio: torch.Tensor) -> torch.Tensor: ...


class LipSyncModel(nn.Module):
    def __init__(self, unet: nn.Module, vae: FaceVAE, sampler: DDIMSampler, mask: torch.Tensor,
                 seed: int = 1247):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.sampler = sampler
        self.register_buffer("mask", mask.reshape(1, 1, *mask.shape[-2:]).float(), persistent=False)
        self.resolution = int(mask.shape[-1])
        self.seed = seed

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _noise(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        # One noise frame shared by every frame of every window (upstream): with eta=0 DDIM this
        # keeps windows consistent with each other.
        generator = torch.Generator().manual_seed(self.seed)
        channels, _, height, width = latent_shape
        noise = torch.randn((1, channels, 1, height, width), generator=generator)
        return noise.to(self.mask.device, self.dtype)

    @torch.no_grad()
    def generate(self, faces: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        faces = faces.to(self.mask.device, self.dtype)
        mask = self.mask.to(self.dtype)
        latents = self.vae.encode(torch.cat([faces * mask, faces]))
        masked_latents, reference_latents = latents.chunk(2)
        latent_mask = F.interpolate(mask, size=latents.shape[-2:], mode="nearest")

        frames = faces.shape[0]
        # (F, C, h, w) -> (1, C, F, h, w): the U-Net sees the window as one video.
        as_video = lambda x: x.permute(1, 0, 2, 3).unsqueeze(0)  # noqa: E731
        condition = torch.cat([as_video(latent_mask.expand(frames, -1, -1, -1)),
                               as_video(masked_latents), as_video(reference_latents)], dim=1)
        noise = self._noise(tuple(as_video(masked_latents).shape[1:])).expand(-1, -1, frames, -1, -1)
        audio = audio.to(self.mask.device, self.dtype).unsqueeze(0)

        result = self.sampler.sample(self.unet, noise, condition, audio)
        decoded = self.vae.decode(result[0].permute(1, 0, 2, 3))
        return decoded * (1 - mask) + faces * mask


class BypassModel:
    """Returns the reference faces unchanged: proves crop, warp and paste-back geometry end to end."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def generate(self, faces: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return faces

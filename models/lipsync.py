"""The lip-sync generator: aligned faces + per-frame audio features -> faces with a new mouth.

This is LatentSync's per-window procedure (notes section 1, item 7): encode the masked face and
the reference face, denoise latents conditioned on both and on the audio, decode, and keep the
model's pixels only inside the mouth mask.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.sampler import DDIMSampler
from models.unet import DeepCache
from models.vae import FaceVAE


class FaceGenerator(Protocol):
    """What the pipeline needs from a model, in the three steps a stream caches between."""

    resolution: int

    def encode_condition(self, faces: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, condition: torch.Tensor, audio: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor, faces: torch.Tensor) -> torch.Tensor: ...


class LipSyncModel(nn.Module):
    def __init__(self, unet: nn.Module, vae: FaceVAE, sampler: DDIMSampler, mask: torch.Tensor,
                 seed: int = 1247, deep_cache_interval: int = 1):
        """``deep_cache_interval``: with N > 1, only every Nth denoising step runs the whole U-Net;
        the steps between reuse its deep features (``models.unet.DeepCache``). 1: every step whole."""
        super().__init__()
        if deep_cache_interval < 1:
            raise ValueError(f"deep_cache_interval must be at least 1, not {deep_cache_interval}")
        self.deep_cache_interval = deep_cache_interval
        self.unet = unet
        self.vae = vae
        self.sampler = sampler
        self.register_buffer("mask", mask.reshape(1, 1, *mask.shape[-2:]).float(), persistent=False)
        self.resolution = int(mask.shape[-1])
        self.seed = seed
        self._noise_by_shape: dict[tuple, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _noise(self, channels: int, height: int, width: int) -> torch.Tensor:
        """One noise frame (1, C, 1, h, w) shared by every frame of every window (upstream): with
        eta=0 DDIM this keeps windows consistent with each other. Made once per shape and device."""
        key = (channels, height, width, self.mask.device, self.dtype)
        noise = self._noise_by_shape.get(key)
        if noise is None:
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((1, channels, 1, height, width), generator=generator)
            # Threads may race to make it; they make the same tensor, and the dict keeps one.
            noise = self._noise_by_shape.setdefault(key, noise.to(self.mask.device, self.dtype))
        return noise

    @torch.no_grad()
    def encode_condition(self, faces: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) faces in [-1, 1] -> (F, 9, h, w): [latent mask, masked-face latents, face latents].

        Per frame and independent of the window, so a stream encodes each frame once.
        """
        faces = faces.to(self.mask.device, self.dtype)
        mask = self.mask.to(self.dtype)
        masked_latents, reference_latents = self.vae.encode(torch.cat([faces * mask, faces])).chunk(2)
        latent_mask = F.interpolate(mask, size=masked_latents.shape[-2:], mode="nearest")
        return torch.cat([latent_mask.expand(len(faces), -1, -1, -1), masked_latents, reference_latents], 1)

    @torch.no_grad()
    def denoise(self, condition: torch.Tensor, audio: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        """Clean latents (F, 4, h, w) for a window, from (F, 9, h, w) conditions and (F, 50, C) audio.

        ``known`` (K, 4, h, w) are the clean latents of the window's first K frames, carried from the
        previous window. At every step they replace those frames' latents, re-noised to the current
        timestep with the same noise: the window is inpainted in time, so its new frames continue
        what was already shown instead of starting over (which is what makes seams).
        """
        carried = 0 if known is None else len(known)
        padded = None
        if carried:
            padded = torch.zeros((len(condition), *known.shape[1:]), dtype=known.dtype, device=known.device)
            padded[:carried] = known
        return self.denoise_windows(condition[None], audio[None], None if padded is None else padded[None],
                                    [carried])[0]

    @torch.no_grad()
    def denoise_windows(self, conditions: torch.Tensor, audio: torch.Tensor, known: torch.Tensor | None,
                        carried: list[int], unet: Callable | None = None) -> torch.Tensor:
        """``denoise`` for B windows of F frames at once: (B, F, 9, h, w) conditions, (B, F, 50, C)
        audio, (B, F, 4, h, w) known latents of which window b's first ``carried[b]`` frames count
        (the rest is ignored; ``known`` may be None when nothing is carried) -> (B, F, 4, h, w).

        Windows of one batch share the timesteps and the noise; what differs per window is its
        carried prefix, applied through a per-window frame mask. ``unet``: what to call instead of
        ``self.unet`` (the same model another way, e.g. ``models.cuda_graphs.GraphedUNet``).
        """
        video = lambda x: x.permute(0, 2, 1, 3, 4)  # noqa: E731  (B, F, C, h, w) <-> (B, C, F, h, w)
        batch, frames, _, height, width = conditions.shape
        noise = self._noise(4, height, width).expand(batch, -1, frames, -1, -1)
        renoise, restore = (self._carried(video(known.to(noise)), carried, noise) if any(carried)
                            else (None, lambda latents: latents))
        audio = audio.to(self.mask.device, self.dtype)
        result = self.sampler.sample(self._denoiser(unet or self.unet), noise, video(conditions.to(noise)), audio,
                                     renoise)
        return video(restore(result))

    def _carried(self, known: torch.Tensor, carried: list[int], noise: torch.Tensor):
        """For (B, 4, F, h, w) ``known`` latents of which window b carries its first ``carried[b]``
        frames: (re-noise them before each step, put them back clean at the end)."""
        frames = known.shape[2]
        positions = torch.arange(frames, device=noise.device)
        mask = positions[None, :] < torch.tensor(carried, device=noise.device)[:, None]  # (B, F)
        mask = mask[:, None, :, None, None]

        def renoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, self.sampler.add_noise(known, noise, t), latents)

        return renoise, lambda latents: torch.where(mask, known, latents)

    def _denoiser(self, unet: Callable):
        """The U-Net as one denoising loop calls it: whole, or with deep features reused between
        every ``deep_cache_interval``-th step."""
        if self.deep_cache_interval == 1:
            return unet
        cache, steps = DeepCache(), iter(range(1 << 30))

        def denoise(sample: torch.Tensor, t: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
            cache.reuse = next(steps) % self.deep_cache_interval != 0
            return unet(sample, t, audio, deep_cache=cache)

        return denoise

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """Clean latents + the faces they belong to -> faces whose masked region is the model's."""
        faces = faces.to(self.mask.device, self.dtype)
        mask = self.mask.to(self.dtype)
        return self.vae.decode(latents) * (1 - mask) + faces * mask

    def generate(self, faces: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """One independent window, as upstream: (F, 3, H, W) faces + (F, 50, C) audio -> faces."""
        return self.decode(self.denoise(self.encode_condition(faces), audio), faces)


class BypassModel:
    """The identity: every step hands the faces through, so the output is the reference faces.

    Proves crop, warp and paste-back geometry end to end, with the real stages around it.
    """

    def __init__(self, resolution: int):
        self.resolution = resolution

    def encode_condition(self, faces: torch.Tensor) -> torch.Tensor:
        return faces

    def denoise(self, condition: torch.Tensor, audio: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        return condition

    def decode(self, latents: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        return faces

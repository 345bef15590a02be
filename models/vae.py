"""The image autoencoder: SD's AutoencoderKL (as LatentSync) or the tiny TAESD-style AutoencoderTiny.

Both come from diffusers; this wrapper gives them one face: pixels in [-1, 1] <-> scaled latents.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

KINDS = {"kl": AutoencoderKL, "tiny": AutoencoderTiny}


class FaceVAE(nn.Module):
    def __init__(self, autoencoder: AutoencoderKL | AutoencoderTiny, scaling_factor: float,
                 shift_factor: float = 0.0):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    @classmethod
    def from_config(cls, config: dict) -> "FaceVAE":
        kind = config.get("kind", "kl")
        if kind not in KINDS:
            raise ValueError(f"unknown VAE kind {kind!r}; expected one of {sorted(KINDS)}")
        autoencoder = KINDS[kind](**config.get("config", {}))
        return cls(autoencoder, config.get("scaling_factor", autoencoder.config.scaling_factor),
                   config.get("shift_factor", 0.0))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents.

        The KL posterior's mode is used rather than a sample (upstream samples): a stream wants the
        same face to give the same latent in every window.
        """
        if isinstance(self.autoencoder, AutoencoderTiny):
            latents = self.autoencoder.encode(images).latents
        else:
            latents = self.autoencoder.encode(images).latent_dist.mode()
        return (latents - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.scaling_factor + self.shift_factor).sample.clamp(-1, 1)

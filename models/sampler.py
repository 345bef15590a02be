"""Few-step DDIM denoising of a window of face latents, with audio classifier-free guidance.

The scheduler is diffusers' DDIMScheduler configured from the model config. Upstream uses
"leading" spacing with 20 steps; with 1-4 steps that never starts near pure noise (4 leading
steps begin at t=751), so our default is "trailing" spacing, which begins at t=999.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler

SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset",
                  "clip_sample", "set_alpha_to_one", "timestep_spacing")

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def make_scheduler(config: dict) -> DDIMScheduler:
    return DDIMScheduler(prediction_type="epsilon",
                         **{key: config[key] for key in SCHEDULER_KEYS if key in config})


class DDIMSampler:
    """Runs ``steps`` DDIM steps; guidance uses zero audio as the unconditional branch (upstream).

    One sampler serves every session's thread at once, so it is read-only once built: the
    timesteps are fixed here (``set_timesteps`` rewrites the scheduler's state) and re-noising
    reads the noise schedule without caching anything on the scheduler (diffusers' ``add_noise``
    moves its table to the latents' device in place).
    """

    def __init__(self, config: dict):
        self.scheduler = make_scheduler(config)
        self.steps = int(config.get("steps", 4))
        self.guidance_scale = float(config.get("guidance_scale", 1.0))
        self.scheduler.set_timesteps(self.steps)
        self.timesteps = self.scheduler.timesteps.clone()
        self._alphas_cumprod = self.scheduler.alphas_cumprod.clone()
        self._silence_by_shape: dict[tuple, torch.Tensor] = {}

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``clean`` latents noised to timestep ``t`` (the forward process), with the given noise."""
        alpha = float(self._alphas_cumprod[int(t)])
        return alpha ** 0.5 * clean + (1 - alpha) ** 0.5 * noise

    def _silence(self, audio: torch.Tensor) -> torch.Tensor:
        """Zero audio like ``audio``: guidance's unconditional branch, made once per shape."""
        key = (tuple(audio.shape), audio.device, audio.dtype)
        silence = self._silence_by_shape.get(key)
        if silence is None:
            silence = self._silence_by_shape.setdefault(key, torch.zeros_like(audio))
        return silence

    def predict_noise(self, denoiser: Denoiser, latents: torch.Tensor, condition: torch.Tensor,
                      audio: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε for (B, 4, F, h, w) latents, given (B, 9, F, h, w) image conditions and (B, F, 50, C) audio."""
        sample = torch.cat([latents, condition], dim=1)
        if self.guidance_scale <= 1.0:
            return denoiser(sample, t, audio)
        both = denoiser(torch.cat([sample, sample]), t, torch.cat([self._silence(audio), audio]))
        unconditional, conditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def sample(self, denoiser: Denoiser, noise: torch.Tensor, condition: torch.Tensor,
               audio: torch.Tensor, before_step: Callable | None = None) -> torch.Tensor:
        """The DDIM loop; ``before_step(latents, t)`` may rewrite the latents before each step."""
        latents = noise * self.scheduler.init_noise_sigma
        for t in self.timesteps:
            if before_step is not None:
                latents = before_step(latents, t)
            eps = self.predict_noise(denoiser, latents, condition, audio, t)
            latents = self.scheduler.step(eps, t, latents, eta=0.0).prev_sample
        return latents

"""Builds the generator and the audio encoder that a config describes.

``weights.source: seeded`` (the tiny config) fills every parameter from a seed; ``hub`` loads the
official files, from ``--checkpoints DIR`` or the hub cache (see models/weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoints import load_unet_checkpoint
from models.lipsync import LipSyncModel
from models.sampler import DDIMSampler
from models.seeding import seeded_init_
from models.unet import UNet3DConditionModel
from models.vae import KINDS, FaceVAE
from models.weights import WeightFiles, WeightsUnavailable, from_directory, from_hub
from models.whisper_encoder import WhisperDims, WhisperEncoder, load_openai_checkpoint, seeded_encoder

__all__ = ["Models", "WeightsUnavailable", "build_models"]


@dataclass
class Models:
    generator: LipSyncModel
    audio_encoder: WhisperEncoder


def _seeded(config: dict) -> tuple[torch.nn.Module, FaceVAE, WhisperEncoder]:
    seed = int(config.get("seed", 0))
    unet = seeded_init_(UNet3DConditionModel.from_config(config["unet"]), seed)
    torch.manual_seed(seed)  # the VAE keeps diffusers' own init, made reproducible
    vae = FaceVAE.from_config(config["vae"])
    return unet, vae, seeded_encoder(WhisperDims(**config["whisper"]), seed=0)


def _loaded(config: dict, files: WeightFiles) -> tuple[torch.nn.Module, FaceVAE, WhisperEncoder]:
    with torch.device("meta"):
        unet = UNet3DConditionModel.from_config(config["unet"])
    load_unet_checkpoint(unet, files.unet)  # assigns the file's tensors: no second full-size copy
    vae_config = config["vae"]
    autoencoder = KINDS[vae_config.get("kind", "kl")].from_pretrained(str(files.vae))
    vae = FaceVAE(autoencoder, vae_config.get("scaling_factor", autoencoder.config.scaling_factor),
                  vae_config.get("shift_factor", 0.0))
    return unet, vae, load_openai_checkpoint(files.whisper)


def build_models(config: dict, mask: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 checkpoints: str | Path | None = None) -> Models:
    source = config.get("weights", {}).get("source", "seeded")
    if source == "seeded":
        unet, vae, audio_encoder = _seeded(config)
    elif source == "hub":
        files = from_directory(config, checkpoints) if checkpoints else from_hub(config)
        unet, vae, audio_encoder = _loaded(config, files)
    else:
        raise ValueError(f"config {config['name']!r}: unknown weights source {source!r} (seeded or hub)")
    generator = LipSyncModel(unet, vae, DDIMSampler(config["sampler"]), mask, seed=int(config.get("seed", 0)),
                             deep_cache_interval=int(config["sampler"].get("deep_cache_interval", 1)))
    return Models(generator.to(device, dtype).eval(), audio_encoder.to(device).eval())

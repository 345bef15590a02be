"""Builds the generator and the audio encoder that a config describes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.lipsync import LipSyncModel
from models.sampler import DDIMSampler
from models.seeding import seeded_init_
from models.unet import UNet3DConditionModel
from models.vae import FaceVAE
from models.whisper_encoder import WhisperDims, WhisperEncoder, seeded_encoder


class WeightsUnavailable(RuntimeError):
    """The config names real weights that are not on this machine."""


@dataclass
class Models:
    generator: LipSyncModel
    audio_encoder: WhisperEncoder


def build_models(config: dict, mask: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Models:
    source = config.get("weights", {}).get("source", "seeded")
    if source != "seeded":
        raise WeightsUnavailable(
            f"config {config['name']!r} needs the official LatentSync weights, which are not on this "
            f"machine; use --config tiny here")
    seed = int(config.get("seed", 0))
    unet = seeded_init_(UNet3DConditionModel.from_config(config["unet"]), seed)
    torch.manual_seed(seed)
    vae = FaceVAE.from_config(config["vae"])
    audio_encoder = seeded_encoder(WhisperDims(**config["whisper"]), seed=0)
    generator = LipSyncModel(unet, vae, DDIMSampler(config["sampler"]), mask, seed=seed)
    return Models(generator.to(device, dtype).eval(), audio_encoder.to(device).eval())

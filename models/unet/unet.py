"""LatentSync's audio-conditioned video U-Net (``latentsync/models/unet.py:UNet3DConditionModel``).

Input: 13 latent channels per frame (4 noisy, 1 mask, 4 masked face, 4 reference face) for a window
of F frames, a diffusion timestep and per-frame Whisper features. Output: the predicted noise,
(B, 4, F, H, W). Convolutions and spatial attention work frame by frame, each frame cross-attends to
its own audio tokens, and the motion modules mix the frames of the window.

The constructor takes upstream's model section (``configs/*.yaml`` key ``unet``) key for key, and the
state-dict names are upstream's exactly, so LatentSync checkpoints load without any renaming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from models.unet.blocks import DownBlock, LayerSpec, MidBlock, UpBlock
from models.unet.resnet import FrameConv2d

# Upstream's model-section keys, with upstream's defaults.
CONFIG_DEFAULTS: dict[str, Any] = {
    "sample_size": None,  # informational: any latent size divisible by the downsampling works
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,  # the number of heads (upstream's naming), per level or for all levels
    "add_audio_layer": False,
    "use_motion_module": False,
    "motion_module_resolutions": (1, 2, 4, 8),
    "motion_module_mid_block": False,
    "motion_module_decoder_only": False,
    "motion_module_type": None,
    "motion_module_kwargs": {},
}

# Upstream keys for variants LatentSync never uses: accepted at these values only.
FIXED_OPTIONS: dict[str, Any] = {
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "use_inflated_groupnorm": False,
    "resnet_time_scale_shift": "default",
}

# Block type name -> whether the level has spatial (audio) attention.
DOWN_BLOCK_TYPES = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
UP_BLOCK_TYPES = {"CrossAttnUpBlock3D": True, "UpBlock3D": False}
MID_BLOCK_TYPES = ("UNetMidBlock3DCrossAttn",)


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Upstream defaults filled in, every key and value checked; raises ValueError on anything unsupported."""
    unknown = sorted(set(config) - set(CONFIG_DEFAULTS) - set(FIXED_OPTIONS))
    if unknown:
        raise ValueError(f"unknown U-Net config keys: {unknown}")
    for key, value in config.items():
        if key in FIXED_OPTIONS and value != FIXED_OPTIONS[key]:
            raise ValueError(f"U-Net option {key}={value!r} is not supported (only {FIXED_OPTIONS[key]!r})")
    resolved = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if k in CONFIG_DEFAULTS}}

    levels = len(resolved["block_out_channels"])
    for key, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        types = list(resolved[key])
        bad = [name for name in types if name not in known]
        if bad:
            raise ValueError(f"unknown {key} {bad}: expected some of {sorted(known)}")
        if len(types) != levels:
            raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {levels}")
    if resolved["mid_block_type"] not in MID_BLOCK_TYPES:
        raise ValueError(f"unknown mid_block_type {resolved['mid_block_type']!r}: expected {MID_BLOCK_TYPES[0]!r}")
    if resolved["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"act_fn {resolved['act_fn']!r} is not supported (only 'silu')")
    if resolved["use_motion_module"] and resolved["motion_module_type"] != "Vanilla":
        raise ValueError(f"unknown motion_module_type {resolved['motion_module_type']!r}: expected 'Vanilla'")

    heads = resolved["attention_head_dim"]
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    if len(heads) != levels:
        raise ValueError(f"attention_head_dim has {len(heads)} entries but block_out_channels has {levels}")
    for channels, level_heads in zip(resolved["block_out_channels"], heads):
        if channels % level_heads:
            raise ValueError(f"{channels} channels do not split into {level_heads} attention heads")
    resolved["attention_head_dim"] = heads
    return resolved


class UNet3DConditionModel(nn.Module):
    """``UNet3DConditionModel(**config)`` or ``.from_config(config)``, with upstream's model section."""

    def __init__(self, **config: Any):
        super().__init__()
        self.config = resolve_config(config)
        c = self.config
        channels = list(c["block_out_channels"])
        heads = c["attention_head_dim"]
        levels = len(channels)
        temb_channels = channels[0] * 4

        def spec(level: int, motion: bool) -> LayerSpec:
            return LayerSpec(temb_channels=temb_channels, groups=c["norm_num_groups"], eps=c["norm_eps"],
                             heads=heads[level], audio_dim=c["cross_attention_dim"] if c["add_audio_layer"] else None,
                             motion_module_kwargs=dict(c["motion_module_kwargs"]) if motion else None)

        def has_motion(level_from_top: int) -> bool:
            # Levels are named by their downsampling factor (1, 2, 4, 8 from the top). Upstream's up
            # path hard-codes 2**(3 - index), which is the same thing for its 4-level configs.
            return c["use_motion_module"] and 2**level_from_top in c["motion_module_resolutions"]

        self.conv_in = FrameConv2d(c["in_channels"], channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], c["flip_sin_to_cos"], c["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]
        for level, block_type in enumerate(c["down_block_types"]):
            is_last = level == levels - 1
            block = DownBlock(channels[max(level - 1, 0)], channels[level], c["layers_per_block"],
                              spec(level, has_motion(level) and not c["motion_module_decoder_only"]),
                              attention=DOWN_BLOCK_TYPES[block_type],
                              downsample_padding=None if is_last else c["downsample_padding"])
            self.down_blocks.append(block)
            skip_channels += [channels[level]] * (c["layers_per_block"] + (0 if is_last else 1))

        # Up blocks are registered before the mid block, as upstream's are, so that state_dict() and
        # named_parameters() list tensors in the checkpoint's order.
        self.up_blocks = nn.ModuleList()
        previous = channels[-1]
        for index, block_type in enumerate(c["up_block_types"]):
            level = levels - 1 - index
            consumed = c["layers_per_block"] + 1
            block_skips = skip_channels[-consumed:][::-1]
            del skip_channels[-consumed:]
            self.up_blocks.append(UpBlock(previous, channels[level], block_skips,
                                          spec(level, has_motion(level)), attention=UP_BLOCK_TYPES[block_type],
                                          upsample=level > 0))
            previous = channels[level]

        mid_motion = c["use_motion_module"] and c["motion_module_mid_block"]
        self.mid_block = MidBlock(channels[-1], spec(levels - 1, mid_motion), c["mid_block_scale_factor"])
        self.conv_norm_out = nn.GroupNorm(c["norm_num_groups"], channels[0], eps=c["norm_eps"])
        self.conv_out = FrameConv2d(channels[0], c["out_channels"], kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet3DConditionModel:
        """Like the constructor, but ignores diffusers' metadata keys (``_class_name``, ...)."""
        return cls(**{key: value for key, value in config.items() if not key.startswith("_")})

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor | None = None,
                deep_cache: "DeepCache | None" = None) -> torch.Tensor:
        """Predicted noise (B, out_channels, F, H, W) for a (B, in_channels, F, H, W) sample.

        ``timestep``: a number, or a 0-d or (B,) tensor. ``encoder_hidden_states``: audio tokens per
        frame, (B, F, tokens, C) or flattened (B*F, tokens, C); ``None`` skips audio cross-attention.
        ``deep_cache``: see ``DeepCache``.
        """
        batch, _, frames, _, _ = sample.shape
        audio = _audio_per_frame(encoder_hidden_states, batch, frames)
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0

        timesteps = _timesteps_per_video(timestep, batch, sample.device)
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))

        video = self.conv_in(sample)
        if deep_cache is not None and deep_cache.reuse and deep_cache.features is not None:
            _, first_skips = self.down_blocks[0].layers(video, temb, audio)
            video = self.up_blocks[-1](deep_cache.features, [*first_skips[::-1], video], temb, audio, None)
            return self.conv_out(F.silu(self.conv_norm_out(video)))
        skips = [video]
        for down in self.down_blocks:
            video, block_skips = down(video, temb, audio)
            skips += block_skips

        video = self.mid_block(video, temb, audio)

        for up in self.up_blocks:
            consumed = len(up.resnets)
            block_skips = skips[-consumed:][::-1]
            del skips[-consumed:]
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None
            if deep_cache is not None and up is self.up_blocks[-1]:
                deep_cache.features = video
            video = up(video, block_skips, temb, audio, upsample_size)

        return self.conv_out(F.silu(self.conv_norm_out(video)))


class DeepCache:
    """DeepCache-style reuse of the deep features between denoising steps (Ma et al., 2023).

    On a full step the U-Net keeps what enters its last up block (everything computed below the
    first level); on a step with ``reuse`` set it runs only the first level's layers, for fresh
    skips, and that last up block on the kept features. Adjacent steps change the deep features
    little, and the first level is where the detail is. One per denoising loop: the kept tensor
    belongs to that loop's batch.
    """

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None
        self.reuse = False


def _timesteps_per_video(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(timestep, torch.Tensor) or (timestep.dim() == 0 and timestep.device != device):
        # A number (the sampler's timesteps live on the CPU) becomes a fill on the device: copying
        # a CPU tensor there would make the host wait for the card at every step.
        number = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        return torch.full((batch,), number, device=device)
    timesteps = timestep.to(device).reshape(-1)
    if timesteps.numel() not in (1, batch):
        raise ValueError(f"got {timesteps.numel()} timesteps for a batch of {batch}")
    return timesteps.expand(batch)


def _audio_per_frame(audio: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor | None:
    """(B, F, tokens, C) or (B*F, tokens, C) -> (B*F, tokens, C), the layout of the per-frame attention."""
    if audio is None:
        return None
    if audio.dim() == 4 and tuple(audio.shape[:2]) == (batch, frames):
        return audio.flatten(0, 1)
    if audio.dim() == 3 and audio.shape[0] == batch * frames:
        return audio
    raise ValueError(f"audio of shape {tuple(audio.shape)} does not fit {batch} video(s) of {frames} frames: "
                     f"expected ({batch}, {frames}, tokens, C) or ({batch * frames}, tokens, C)")

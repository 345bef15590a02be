"""Convolutional pieces of the U-Net: the per-frame convolution, the resnet block, and resampling.

All of them take and return videos, (B, C, F, H, W). Convolutions never look across frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.unet.frames import batch_to_frames, frames_to_batch


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to every frame of a video (upstream: ``InflatedConv3d``)."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(super().forward(frames_to_batch(video)), video.shape[2])


class ResnetBlock3D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the time embedding, twice, with a residual connection.

    The GroupNorms run on the whole 5-D video, so their statistics span all frames of the window
    (upstream's default, ``use_inflated_groupnorm=False``); the convolutions are per frame.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = FrameConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (FrameConv2d(in_channels, out_channels, kernel_size=1)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def forward(self, video: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(video)))
        hidden = hidden + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        hidden = self.conv2(F.silu(self.norm2(hidden)))
        shortcut = self.conv_shortcut(video) if self.conv_shortcut is not None else video
        return (shortcut + hidden) / self.output_scale_factor


class Downsample3D(nn.Module):
    """Halves height and width with a stride-2 convolution; frames are untouched."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.conv(video)


class Upsample3D(nn.Module):
    """Nearest-neighbour upsampling of height and width to ``size``, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # An explicit size (the skip connection's) rather than a factor of 2, so that odd latent
        # sizes, which the stride-2 downsampling rounds up, come back to the right shape.
        frames = video.shape[2]
        video = F.interpolate(video, size=(frames, *size), mode="nearest")
        return self.conv(video)

"""The two layouts a video tensor takes inside the U-Net.

Between blocks a window is one 5-D video, (B, C, F, H, W). Everything that works on single images
(2-D convolutions, the spatial transformer, per-frame GroupNorm) sees it as a batch of frames,
(B*F, C, H, W). These two functions are the only place that conversion is written.
"""

from __future__ import annotations

import torch


def frames_to_batch(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), frame-major within each video."""
    batch, channels, frames, height, width = video.shape
    return video.transpose(1, 2).reshape(batch * frames, channels, height, width)


def batch_to_frames(images: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W); the inverse of ``frames_to_batch``."""
    batch_frames, channels, height, width = images.shape
    return images.reshape(batch_frames // frames, frames, channels, height, width).transpose(1, 2)

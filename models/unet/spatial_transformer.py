"""Per-frame spatial attention with audio cross-attention (upstream: ``Transformer3DModel``).

Each frame's H*W latent pixels attend to each other (``attn1``) and then to that frame's own audio
tokens (``attn2``): the audio is (B*F, tokens, C), one row of tokens per frame, so a frame never
sees another frame's audio. Nothing here mixes frames; the motion modules do that.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from models.unet.frames import batch_to_frames, frames_to_batch


class AudioTransformerBlock(nn.Module):
    """LayerNorm -> self-attention, LayerNorm -> audio cross-attention, LayerNorm -> GEGLU FF.

    Upstream's ``BasicTransformerBlock`` with ``add_audio_layer``. Without ``audio_dim`` there is no
    cross-attention at all (no ``norm2``/``attn2``), as in upstream's audio-free configs.
    """

    def __init__(self, dim: int, heads: int, audio_dim: int | None):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim)
        if audio_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=head_dim)
        else:
            self.norm2 = self.attn2 = None
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        tokens = self.attn1(self.norm1(tokens)) + tokens
        # No audio means no cross-attention, which is not the same as zero audio: attn2's output
        # bias still acts on zero audio (the CFG unconditional branch uses zeros, not None).
        if self.attn2 is not None and audio is not None:
            tokens = self.attn2(self.norm2(tokens), encoder_hidden_states=audio) + tokens
        return self.ff(self.norm3(tokens)) + tokens


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv -> transformer block over each frame's pixels -> 1x1 conv, + residual."""

    def __init__(self, channels: int, heads: int, groups: int, audio_dim: int | None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([AudioTransformerBlock(channels, heads, audio_dim)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, video: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """(B, C, F, H, W) video and (B*F, tokens, audio_dim) audio or None -> (B, C, F, H, W)."""
        frames = video.shape[2]
        images = frames_to_batch(video)
        batch_frames, channels, height, width = images.shape

        hidden = self.proj_in(self.norm(images))
        tokens = hidden.permute(0, 2, 3, 1).reshape(batch_frames, height * width, channels)
        for block in self.transformer_blocks:
            tokens = block(tokens, audio)
        hidden = tokens.reshape(batch_frames, height, width, channels).permute(0, 3, 1, 2)

        return batch_to_frames(self.proj_out(hidden) + images, frames)

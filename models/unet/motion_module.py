"""Temporal attention: the only layers that mix the frames of a window (AnimateDiff's motion module).

Every latent pixel position becomes a sequence of F frames; self-attention runs along that sequence,
with a fixed sinusoidal position table added first. The window length is therefore part of what the
model sees: running 8 frames is not the first half of a 16-frame run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from models.unet.frames import frames_to_batch


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The (1, max_len, dim) sin/cos table of "Attention Is All You Need", as upstream builds it."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, max_len, dim)
    table[0, :, 0::2] = torch.sin(position * div_term)
    table[0, :, 1::2] = torch.cos(position * div_term)
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the position table to (N, F, C) sequences.

    The table is a persistent buffer because upstream's checkpoints carry it (``pos_encoder.pe``),
    but it is deterministic: ``fresh_table()`` rebuilds it for checkpoints that leave it out.
    """

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.register_buffer("pe", sinusoidal_table(max_len, dim))

    def fresh_table(self) -> torch.Tensor:
        return sinusoidal_table(self.max_len, self.dim)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        frames = sequences.shape[1]
        if frames > self.max_len:
            raise ValueError(f"a window of {frames} frames is longer than the temporal position table "
                             f"({self.max_len} frames)")
        return sequences + self.pe[:, :frames]


class TemporalSelfAttention(Attention):
    """Self-attention over frames, with the position table added to its (normalised) input."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_len: int | None):
        super().__init__(query_dim=dim, heads=heads, dim_head=head_dim)
        self.pos_encoder = SinusoidalPositionalEncoding(dim, max_len) if max_len is not None else None

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        if self.pos_encoder is not None:
            sequences = self.pos_encoder(sequences)
        return super().forward(sequences)


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal self-attention layers (each with a residual), then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, num_attention_layers: int, max_len: int | None):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalSelfAttention(dim, heads, head_dim, max_len) for _ in range(num_attention_layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attention_layers)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            sequences = attention(norm(sequences)) + sequences
        return self.ff(self.ff_norm(sequences)) + sequences


class TemporalTransformer(nn.Module):
    """Per-frame GroupNorm -> linear in -> temporal transformer blocks -> linear out, + residual."""

    def __init__(self, channels: int, heads: int, head_dim: int, num_blocks: int, num_attention_layers: int,
                 max_len: int | None):
        super().__init__()
        inner_dim = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(inner_dim, heads, head_dim, num_attention_layers, max_len)
             for _ in range(num_blocks)])
        self.proj_out = nn.Linear(inner_dim, channels)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = video.shape
        hidden = self.proj_in(self.norm(frames_to_batch(video)).permute(0, 2, 3, 1))  # (B*F, H, W, D)
        # One sequence of F frames per (video, pixel) pair; everything below is per token or per sequence.
        sequences = hidden.reshape(batch, frames, height * width, -1).transpose(1, 2).flatten(0, 1)
        for block in self.transformer_blocks:
            sequences = block(sequences)
        hidden = self.proj_out(sequences).reshape(batch, height, width, frames, channels)
        return hidden.permute(0, 4, 3, 1, 2) + video


class VanillaTemporalModule(nn.Module):
    """Upstream's ``motion_module_type: Vanilla``; its keyword arguments are ``motion_module_kwargs``.

    ``zero_initialize`` and ``cross_frame_attention_mode`` only matter for training from scratch
    (weights always come from a checkpoint here), so they are accepted and have no effect.
    """

    def __init__(self, in_channels: int, num_attention_heads: int = 8, num_transformer_block: int = 2,
                 attention_block_types: Sequence[str] = ("Temporal_Self", "Temporal_Self"),
                 temporal_position_encoding: bool = False, temporal_position_encoding_max_len: int = 24,
                 temporal_attention_dim_div: int = 1, zero_initialize: bool = True,
                 cross_frame_attention_mode: None = None):
        super().__init__()
        unsupported = [kind for kind in attention_block_types if kind != "Temporal_Self"]
        if unsupported:
            raise ValueError(f"motion module attention_block_types {unsupported} are not supported "
                             "(only 'Temporal_Self')")
        head_dim = in_channels // num_attention_heads // temporal_attention_dim_div
        self.temporal_transformer = TemporalTransformer(
            in_channels, num_attention_heads, head_dim, num_transformer_block, len(attention_block_types),
            temporal_position_encoding_max_len if temporal_position_encoding else None)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(video)

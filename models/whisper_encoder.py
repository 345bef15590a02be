"""Whisper's audio encoder, returning every layer the way LatentSync consumes it.

LatentSync conditions its UNet on the input of Whisper's first transformer block and on the
output of every block, all taken before ``ln_post``: five (1500, 384) maps per 30 s window for
Whisper tiny. Faster-whisper's CTranslate2 engine returns only the last layer, so this is a small
PyTorch encoder of our own.

Parameter names follow OpenAI's ``AudioEncoder`` (``conv1``, ``blocks.N.attn.query`` ...):
OpenAI's ``tiny.pt`` loads into it unchanged, and the state dict, buffer included, is the one
the parity fixtures hash. ``ln_post`` is never applied, but it stays so that checkpoints load
strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.seeding import seeded_init_

#: Mel frames per encoder window (30 s at 100 frames/s); the encoder halves this to 1500 rows.
SEGMENT_FRAMES = 3000


@dataclass(frozen=True)
class WhisperDims:
    """The audio half of OpenAI's ``ModelDimensions`` (tiny: 80, 1500, 384, 6, 4)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int

    @classmethod
    def from_dict(cls, dims: dict) -> WhisperDims:
        """Pick the audio dims out of a checkpoint's full dims (which also hold the text side)."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in dims]
        if missing:
            raise ValueError(f"Whisper dims lack {missing}; got {sorted(dims)}")
        return cls(**{name: int(dims[name]) for name in names})


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed positional table, computed in float32 exactly as OpenAI does.

    Computed the same way so the values match a checkpoint's stored table to float32 rounding
    (vectorised exp/sin differ in the last bits between CPUs).
    """
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(half))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, so a half-precision encoder keeps OpenAI's numerics."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.n_head, -1).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).flatten(2))


class _ResidualBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = _SelfAttention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Log-mel (B, n_mels, 2·T) -> all layers (B, n_audio_layer + 1, T, n_audio_state)."""

    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(
            _ResidualBlock(dims.n_audio_state, dims.n_audio_head) for _ in range(dims.n_audio_layer)
        )
        self.ln_post = _LayerNorm(dims.n_audio_state)

    def forward(self, mel: Tensor, position: int = 0) -> Tensor:
        """Stack [block-0 input, block-1 output, ...], all before ``ln_post``, on dim 1.

        A window shorter than 2·n_audio_ctx mel frames uses rows ``position...`` of the positional
        table: a streaming window can take the positions its rows would have had offline.
        LatentSync itself always pads to the full 3000 frames (see ``encode_features``).
        """
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        if position + x.shape[1] > self.dims.n_audio_ctx:
            raise ValueError(f"mel frames {2 * position}..{2 * position + mel.shape[-1]} exceed the "
                             f"encoder's {2 * self.dims.n_audio_ctx}")
        x = x + self.positional_embedding[position : position + x.shape[1]]
        layers = [x]
        for block in self.blocks:
            x = block(x)
            layers.append(x)
        return torch.stack(layers, dim=1)

    @torch.no_grad()  # not inference_mode: callers may edit the result in place
    def encode_features(self, mel: Tensor | np.ndarray) -> Tensor:
        """LatentSync's offline features: log-mel (n_mels, T) -> (T // 2, n_layers + 1, n_state) at 50 Hz.

        The mel is cut into 3000-frame segments; each is zero-padded to 3000 frames, encoded
        alone, and only the rows that cover real audio (half its real frame count, rounded down)
        are kept. The final partial segment is therefore encoded next to zero padding, which is
        what upstream does and what makes its features jump at every 30 s boundary.
        """
        param = self.conv1.weight
        mel = torch.as_tensor(mel).to(device=param.device, dtype=param.dtype)
        if mel.ndim != 2 or mel.shape[0] != self.dims.n_mels:
            raise ValueError(f"expected a ({self.dims.n_mels}, T) log-mel, got {tuple(mel.shape)}")
        pieces = []
        for start in range(0, mel.shape[1], SEGMENT_FRAMES):
            segment = mel[:, start : start + SEGMENT_FRAMES]
            padded = F.pad(segment, (0, SEGMENT_FRAMES - segment.shape[1]))
            layers = self(padded[None])[0]  # (n_layers + 1, 1500, n_state)
            pieces.append(layers[:, : segment.shape[1] // 2].transpose(0, 1))
        if not pieces:
            return mel.new_zeros(0, self.dims.n_audio_layer + 1, self.dims.n_audio_state)
        return torch.cat(pieces)


def _built_without_rng(dims: WhisperDims) -> WhisperEncoder:
    """Build an encoder whose weights are about to be overwritten, leaving the global torch RNG
    where the caller left it (the default init would otherwise consume it)."""
    with torch.random.fork_rng(devices=[]):
        return WhisperEncoder(dims)


def seeded_encoder(dims: WhisperDims, seed: int = 0) -> WhisperEncoder:
    """An encoder with the fixtures' seeded weights (checked by value against upstream's stored features).

    Every parameter is overwritten, so the default init (and the ``torch.manual_seed(0)`` the
    upstream recipe calls before it) does not matter.
    """
    encoder = _built_without_rng(dims)
    seeded_init_(encoder, seed)
    return encoder.eval()


def load_openai_checkpoint(path: str | Path) -> WhisperEncoder:
    """Load the encoder half of an OpenAI Whisper checkpoint (``tiny.pt``) as float32.

    The file is ``{"dims": {...}, "model_state_dict": {...}}`` with encoder keys prefixed
    ``encoder.``; OpenAI ships it in float16, and copying into our float32 parameters upcasts.
    Decoder keys are ignored. Anything else fails loudly, naming the file.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an OpenAI Whisper checkpoint: expected 'dims' and 'model_state_dict', got {found}")

    encoder = _built_without_rng(WhisperDims.from_dict(checkpoint["dims"]))
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in checkpoint["model_state_dict"].items() if k.startswith(prefix)}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: encoder weights do not fit dims {encoder.dims}: {error}") from error
    return encoder.eval()

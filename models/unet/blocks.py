"""The U-Net's levels: down blocks, the mid block and up blocks.

A level is ``layers`` repetitions of [resnet -> spatial transformer (if the level has attention)
-> motion module (if the level has one)], then a resampler. Upstream has a class per combination
(``CrossAttnDownBlock3D``/``DownBlock3D``, ``CrossAttnUpBlock3D``/``UpBlock3D``); here one class per
direction takes ``attention`` as a flag. Submodules are registered in upstream's order (attentions,
resnets, motion_modules, resampler) so that ``state_dict()`` lists names in the checkpoint's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.unet.motion_module import VanillaTemporalModule
from models.unet.resnet import Downsample3D, ResnetBlock3D, Upsample3D
from models.unet.spatial_transformer import SpatialTransformer


@dataclass(frozen=True)
class LayerSpec:
    """What every layer of a level shares."""

    temb_channels: int
    groups: int
    eps: float
    heads: int
    audio_dim: int | None
    motion_module_kwargs: dict | None  # None: the level has no motion modules


def _attentions(spec: LayerSpec, channels: int, count: int) -> nn.ModuleList:
    return nn.ModuleList([SpatialTransformer(channels, spec.heads, spec.groups, spec.audio_dim) for _ in range(count)])


def _motion_modules(spec: LayerSpec, channels: int, count: int) -> nn.ModuleList | None:
    if spec.motion_module_kwargs is None:
        return None
    return nn.ModuleList([VanillaTemporalModule(channels, **spec.motion_module_kwargs) for _ in range(count)])


class _Level(nn.Module):
    """The layer loop shared by down and up blocks."""

    attentions: nn.ModuleList | None
    resnets: nn.ModuleList
    motion_modules: nn.ModuleList | None

    def _layer(self, index: int, video: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        video = self.resnets[index](video, temb)
        if self.attentions is not None:
            video = self.attentions[index](video, audio)
        if self.motion_modules is not None:
            video = self.motion_modules[index](video)
        return video


class DownBlock(_Level):
    """One encoder level. Returns its output and the skip tensors the matching up block consumes."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, spec: LayerSpec, attention: bool,
                 downsample_padding: int | None):
        super().__init__()
        self.attentions = _attentions(spec, out_channels, layers) if attention else None
        self.resnets = nn.ModuleList([
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, spec.temb_channels, spec.groups,
                          spec.eps)
            for i in range(layers)])
        self.motion_modules = _motion_modules(spec, out_channels, layers)
        self.downsamplers = (nn.ModuleList([Downsample3D(out_channels, downsample_padding)])
                             if downsample_padding is not None else None)

    def forward(self, video: torch.Tensor, temb: torch.Tensor,
                audio: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        video, skips = self.layers(video, temb, audio)
        if self.downsamplers is not None:
            video = self.downsamplers[0](video)
            skips.append(video)
        return video, skips


    def layers(self, video: torch.Tensor, temb: torch.Tensor,
               audio: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The level's layers without its downsampler: its output at full size, and their skips."""
        skips = []
        for index in range(len(self.resnets)):
            video = self._layer(index, video, temb, audio)
            skips.append(video)
        return video, skips


class UpBlock(_Level):
    """One decoder level: each layer first concatenates the next skip tensor along channels.

    ``skip_channels`` lists the channels of the skips this block consumes, in the order it uses them.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], spec: LayerSpec,
                 attention: bool, upsample: bool):
        super().__init__()
        layers = len(skip_channels)
        self.attentions = _attentions(spec, out_channels, layers) if attention else None
        self.resnets = nn.ModuleList([
            ResnetBlock3D((in_channels if i == 0 else out_channels) + skip, out_channels, spec.temb_channels,
                          spec.groups, spec.eps)
            for i, skip in enumerate(skip_channels)])
        self.motion_modules = _motion_modules(spec, out_channels, layers)
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if upsample else None

    def forward(self, video: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                audio: torch.Tensor | None, upsample_size: tuple[int, int] | None) -> torch.Tensor:
        for index, skip in enumerate(skips):
            video = self._layer(index, torch.cat([video, skip], dim=1), temb, audio)
        if self.upsamplers is not None:
            video = self.upsamplers[0](video, upsample_size)
        return video


class MidBlock(nn.Module):
    """resnet -> spatial transformer -> (motion module) -> resnet, at the lowest resolution."""

    def __init__(self, channels: int, spec: LayerSpec, output_scale_factor: float):
        super().__init__()
        self.attentions = _attentions(spec, channels, 1)
        self.resnets = nn.ModuleList([
            ResnetBlock3D(channels, channels, spec.temb_channels, spec.groups, spec.eps, output_scale_factor)
            for _ in range(2)])
        self.motion_modules = _motion_modules(spec, channels, 1)

    def forward(self, video: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        video = self.resnets[0](video, temb)
        video = self.attentions[0](video, audio)
        if self.motion_modules is not None:
            video = self.motion_modules[0](video)
        return self.resnets[1](video, temb)

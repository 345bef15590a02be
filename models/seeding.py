"""Reproducible, non-degenerate random weights, for runs and tests without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn


def seeded_init_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter, in ``named_parameters()`` order, from one generator.

    This is the recipe behind the parity fixtures: matrices and conv kernels get
    ``randn / sqrt(fan_in)`` (fan_in = ``p[0].numel()``), 1-D weights ``1 + 0.1 randn`` and biases
    ``0.05 randn``. It also matters for seeded runs: upstream zero-initialises conv_in, conv_out
    and each motion module's output projection, so a freshly built U-Net predicts exactly zero.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if parameter.ndim >= 2:
                values /= parameter[0].numel() ** 0.5
            elif name.endswith("weight"):
                values = 1 + 0.1 * values
            else:
                values *= 0.05
            parameter.copy_(values)
    return module

"""Which device and dtype to run on: bf16/fp16 on CUDA, fp32 on CPU, unless the user says otherwise."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def select_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """fp32 on CPU, where half precision is slower and less accurate; on CUDA, bf16 where the card
    supports it (Ampere and newer: no fp16 overflow in the VAE), else fp16."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown precision {requested!r}; expected auto or one of {sorted(DTYPES)}")
        return DTYPES[requested]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

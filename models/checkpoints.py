"""Loading and saving U-Net weights: LatentSync's ``.pt`` format and ``.safetensors``.

LatentSync ships ``latentsync_unet.pt``, written as ``torch.save({"state_dict": ...})`` (upstream reads
it with ``weights_only=True``). Upstream then loads it with ``strict=False``, which would hide a
renamed or missing layer; here loading is strict by default and a mismatch is one readable error.

The one tolerated gap is the motion modules' ``pos_encoder.pe`` tables: they are fixed sinusoids
that the model rebuilds itself, so a checkpoint without them is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.unet.motion_module import SinusoidalPositionalEncoding

SHOWN_PER_LIST = 8


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors are not the model's: see the message for which and how."""


@dataclass(frozen=True)
class LoadReport:
    """What a load did. ``missing``/``unexpected``/``mismatched`` are empty after a strict load."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (name, checkpoint, model)
    rebuilt: tuple[str, ...] = ()  # position tables the file lacks, rebuilt by the model

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = []
        if self.missing:
            lines.append(_listing("missing from the checkpoint", list(self.missing)))
        if self.unexpected:
            lines.append(_listing("not in the model", list(self.unexpected)))
        if self.mismatched:
            lines.append(_listing("with a different shape", [
                f"{name}: checkpoint {list(stored)} vs model {list(expected)}"
                for name, stored, expected in self.mismatched]))
        if self.rebuilt:
            lines.append(f"  {len(self.rebuilt)} position tables (pos_encoder.pe) rebuilt, not read")
        return "\n".join(lines) if lines else "all tensors loaded"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a torch ``.pt``/``.ckpt`` file (wrapped or not)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        # mmap keeps a 5 GB fp32 checkpoint out of RAM until each tensor is copied into the model.
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for files it cannot read
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if isinstance(stored, dict) and "state_dict" in stored:
        stored = stored["state_dict"]
    if not isinstance(stored, dict) or not all(isinstance(v, torch.Tensor) for v in stored.values()):
        raise ValueError(f"{path} holds no state dict: expected a dict of tensors, or one under 'state_dict'")
    return stored


def load_unet_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load ``path`` into ``model``, casting every tensor to the dtype of the model's own.

    Strict (the default): every model tensor must be in the file with its shape, and nothing else,
    except the rebuildable position tables; otherwise ``CheckpointMismatchError`` and the model is
    untouched. Not strict: loads what fits and reports the rest. A model built on the meta device is
    given the checkpoint's tensors directly, so a full-size model never exists twice in memory.
    """
    stored = read_state_dict(path)
    expected = model.state_dict()

    rebuilt = []
    for name in expected.keys() - stored.keys():
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, SinusoidalPositionalEncoding) and name.endswith(".pe"):
            stored[name] = owner.fresh_table()
            rebuilt.append(name)

    mismatched = tuple((name, tuple(stored[name].shape), tuple(tensor.shape))
                       for name, tensor in expected.items()
                       if name in stored and stored[name].shape != tensor.shape)
    report = LoadReport(missing=tuple(name for name in expected if name not in stored),
                        unexpected=tuple(name for name in stored if name not in expected),
                        mismatched=mismatched, rebuilt=tuple(sorted(rebuilt)))
    if strict and not report.complete:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the model:\n{report.describe()}")

    skip = {name for name, _, _ in mismatched}
    loadable = {name: stored[name].to(expected[name].dtype)
                for name in expected if name in stored and name not in skip}
    on_meta = any(tensor.is_meta for tensor in expected.values())
    model.load_state_dict(loadable, strict=False, assign=on_meta)
    return report


def save_unet_checkpoint(model: nn.Module, path: str | Path) -> None:
    """``.safetensors`` by suffix, otherwise LatentSync's ``{"state_dict": ...}`` torch format."""
    path = Path(path)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)


def _listing(what: str, items: list[str]) -> str:
    noun = "tensor" if len(items) == 1 else "tensors"
    shown = [f"    {item}" for item in items[:SHOWN_PER_LIST]]
    if len(items) > SHOWN_PER_LIST:
        shown.append(f"    ... and {len(items) - SHOWN_PER_LIST} more")
    return "\n".join([f"  {len(items)} {noun} {what}:", *shown])

"""The seam metric: how much more the mouth jumps across window boundaries than inside windows.

ratio = mean |crop[i] - crop[i-1]| over frames i that start a window's new frames
        / the same mean over all other consecutive pairs.
1.0 means boundaries are invisible in the numbers; upstream's independent windows score above it.
"""

from __future__ import annotations

import numpy as np


def seam_ratio(mouths: dict[int, np.ndarray], boundaries: set[int], region: np.ndarray) -> float | None:
    """``mouths``: frame index -> generated face crop; ``boundaries``: first new frame of each
    window; ``region``: (H, W) bool, the pixels the model draws (the mouth mask's 0 area)."""
    across, inside = [], []
    for index in sorted(mouths):
        if index - 1 not in mouths:
            continue
        difference = mouths[index].astype(np.float32) - mouths[index - 1].astype(np.float32)
        step = float(np.abs(difference[region]).mean())
        (across if index in boundaries else inside).append(step)
    if not across or not inside:
        return None
    return float(np.mean(across) / np.mean(inside))

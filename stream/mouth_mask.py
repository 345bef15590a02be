"""LatentSync's fixed mouth mask: 1 = keep the reference face, 0 = the region the model regenerates.

The mask is LatentSync's ``latentsync/utils/mask.png`` (the lower face below the eyes, with a strip
left for the nose), stored once in ``stream/assets``. Other resolutions are made the way upstream's
``load_fixed_mask`` makes them: a cv2 Lanczos-4 resize of the 0/255 image, then / 255. At 512 that gives
soft edges, and the latent mask is then not strictly binary either.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

MASK_PNG = Path(__file__).parent / "assets" / "mouth_mask.png"


@lru_cache(maxsize=None)
def _mask_u8(resolution: int) -> np.ndarray:
    image = cv2.imread(str(MASK_PNG), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(MASK_PNG)
    if image.shape != (resolution, resolution):
        image = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    image.flags.writeable = False
    return image


def mouth_mask(resolution: int) -> np.ndarray:
    """(resolution, resolution) float32 in [0, 1]; a fresh array the caller may modify."""
    return _mask_u8(resolution).astype(np.float32) / 255


def latent_mask(resolution: int, latent_size: int) -> np.ndarray:
    """The mask at latent size, (latent_size, latent_size) float32, as the pipeline feeds the UNet.

    Upstream uses ``F.interpolate(mask, size)`` with its default nearest mode, which picks source index
    ``floor(i * resolution / latent_size)``.
    """
    index = np.floor(np.arange(latent_size) * (resolution / latent_size)).astype(np.intp)
    return mouth_mask(resolution)[np.ix_(index, index)]

"""LatentSync's audio-conditioned 3-D U-Net; see ``models/unet/unet.py``."""

from models.unet.unet import DeepCache, UNet3DConditionModel

__all__ = ["DeepCache", "UNet3DConditionModel"]

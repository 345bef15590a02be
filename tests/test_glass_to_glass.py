"""The glass-to-glass probe's pieces, without a server (bench/glass_to_glass.py).

The frame stamp goes through aiortc's own video encoders and decoders at their lowest bitrate,
twice (the sender's encode, then the server's); the audio markers through aiortc's Opus encoder
and decoder twice, on real speech; the figures come from a recording whose times are known.
"""

from __future__ import annotations

import socket
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.codecs import depayload, get_decoder, get_encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from bench.glass_to_glass import (FPS, INDEX_BITS, CHECK_BITS, MARKER_FRAME, PACKET, SAMPLES_PER_FRAME, STAMP_BLOCK,
                                  STAMP_COLUMNS, Clip, FaceRegions, ReceivedFrame, Recording, draw_stamp,
                                  find_markers, first_showings, insert_markers, is_generated, marker_frames, read_stamp,
                                  speech_track, stamp_size, summarise)
from bench.make_clip import make_clip
from transport.sender_clock import SenderReport
from stream.frames import VideoFrame
from run_stream import main as run_stream
from transport.files import ping_pong

SIZE = (374, 398)
# libopus (as aiortc runs it: 48 kHz) delays its output by its 6.5 ms lookahead at every encode.
OPUS_LOOKAHEAD = 312


@pytest.fixture(scope="module")
def clip_path(media, tmp_path_factory) -> Path:
    return make_clip(media / "speaker_wide.mp4", tmp_path_factory.mktemp("g2g") / "clip.mp4", *SIZE)


@pytest.fixture(scope="module")
def clip(clip_path) -> Clip:
    return Clip.load(clip_path, 40)


def luma(yuv: np.ndarray) -> np.ndarray:
    return yuv[: yuv.shape[0] * 2 // 3]


class CodecLink:
    """aiortc's encoder -> RTP payloads -> depayload -> aiortc's decoder, at the codec's lowest bitrate."""

    def __init__(self, mime: str) -> None:
        self.codec = RTCRtpCodecParameters(mimeType=mime, clockRate=90_000, payloadType=96)
        self.encoder, self.decoder = get_encoder(self.codec), get_decoder(self.codec)
        self.encoder.target_bitrate = 0  # clamped to the codec's minimum (VP8 250 kbps, H.264 500 kbps)

    def __call__(self, yuv: np.ndarray, index: int) -> list[np.ndarray]:
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts, frame.time_base = index * 3600, Fraction(1, 90_000)
        payloads, timestamp = self.encoder.encode(frame)
        data = b"".join(depayload(self.codec, payload) for payload in payloads)
        return [p.to_ndarray(format="yuv420p") for p in self.decoder.decode(JitterFrame(data, timestamp))]


@pytest.mark.parametrize("mime", ["video/VP8", "video/H264"])
def test_the_stamp_survives_two_encodes_at_the_lowest_bitrate(clip, mime):
    sender, server = CodecLink(mime), CodecLink(mime)
    indices = [(k * 2731) % (1 << INDEX_BITS) for k in range(len(clip.yuv))]  # every bit flips often
    read = []
    for k, index in enumerate(indices):
        yuv = clip.yuv[k].copy()
        draw_stamp(yuv, index)
        for once in sender(yuv, k):
            read += [read_stamp(luma(twice)) for twice in server(once, k)]
    assert read == indices


def test_a_damaged_or_missing_stamp_is_rejected(clip):
    yuv = clip.yuv[0].copy()
    draw_stamp(yuv, 1234)
    stamped = luma(yuv)
    assert read_stamp(stamped) == 1234
    for bit in range(INDEX_BITS + CHECK_BITS):  # CRC-8 catches every single-bit error
        row, column = divmod(bit, STAMP_COLUMNS)
        damaged = stamped.copy()
        block = damaged[row * STAMP_BLOCK : (row + 1) * STAMP_BLOCK, column * STAMP_BLOCK : (column + 1) * STAMP_BLOCK]
        block[:] = 255 - block
        assert read_stamp(damaged) is None, bit
    unclear = stamped.copy()
    unclear[:STAMP_BLOCK, STAMP_BLOCK : 2 * STAMP_BLOCK] = 128
    assert read_stamp(unclear) is None
    assert read_stamp(luma(clip.yuv[0])) is None, "an unstamped picture reads as no index"


def test_the_stamp_leaves_the_face_alone(clip):
    few = Clip(clip.yuv[:8])
    regions = FaceRegions.of(few)
    width, height = stamp_size()
    stamp = np.zeros(luma(few.yuv[0]).shape, bool)
    stamp[:height, :width] = True
    for lower, control in zip(regions.lower, regions.control):
        assert lower is not None and len(lower) > 500, "a face was found, with a lower half of some size"
        assert not stamp.reshape(-1)[lower].any() and not stamp.reshape(-1)[control].any()
        assert not np.isin(lower, control).any()
    # The rule: a picture identical to the one sent is not generated; one with a new lower face is.
    sent = luma(few.yuv[3])
    assert regions.differences(sent, few, 3) == (0.0, 0.0) and not is_generated(0.0, 0.0)
    changed = sent.copy().reshape(-1)
    changed[regions.lower[3]] = 255 - changed[regions.lower[3]]
    assert is_generated(*regions.differences(changed.reshape(sent.shape), few, 3))


def opus_round_trip(samples: np.ndarray) -> np.ndarray:
    """Mono float at 48 kHz through aiortc's Opus encoder and decoder, 20 ms packets."""
    from aiortc.codecs.opus import OpusDecoder, OpusEncoder

    encoder, decoder = OpusEncoder(), OpusDecoder()
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    out = []
    for n in range(len(pcm) // PACKET):
        frame = av.AudioFrame.from_ndarray(pcm[n * PACKET : (n + 1) * PACKET].reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, n * PACKET, Fraction(1, 48_000)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            for decoded in decoder.decode(JitterFrame(payload, timestamp)):
                out.append(decoded.to_ndarray().reshape(-1, 2).mean(axis=1) / 32768)
    return np.concatenate(out)


def test_markers_are_found_at_their_sample_after_two_opus_encodes(media):
    speech = speech_track(media / "speech_16k.wav", 8.0)
    assert np.abs(speech).max() > 0.1
    frames = marker_frames(8 * FPS)
    marked = speech.copy()
    insert_markers(marked, frames)
    heard = find_markers(opus_round_trip(opus_round_trip(marked)))
    expected = [f * SAMPLES_PER_FRAME + 2 * OPUS_LOOKAHEAD for f in frames]
    assert len(heard) == len(frames)
    for (start, score), want in zip(heard, expected):
        assert abs(start - want) <= 24, (start, want)  # 0.5 ms
        assert score > 0.9
    assert find_markers(opus_round_trip(speech), threshold=0.3) == [], "speech alone is never a marker"


def test_the_clip_loops_like_the_file_path():
    pictures = [VideoFrame(i, i / FPS, np.full((2, 2, 3), i, np.uint8)) for i in range(5)]
    expected = [int(f.image[0, 0, 0]) for f in ping_pong(iter(pictures), 23, FPS)]
    five = Clip([None] * 5)
    assert [five.picture_of(k) for k in range(23)] == expected


def test_figures_from_a_recording_with_known_times(media):
    """Frames back 800 ms after they left, audio 30 ms behind them; aiortc's holds on top. The
    server's reports put the audio 20 ms behind the pictures (their RTP time against its wall clock)."""
    measured = 3 * FPS
    sent = [100.0 + k / FPS for k in range(measured)]
    recording = Recording(measured, SIZE, sent=sent, audio_prefetch=4)
    for k in range(measured):
        differences = (30.0, 3.0) if k % 2 else (2.5, 3.0)
        recording.frames.append(ReceivedFrame(k, sent[k] + 0.84, sent[k] + 0.8, 1000 + 3600 * k, differences))
    recording.frames.append(ReceivedFrame(None, sent[-1] + 0.9, None, None, None))
    recording.reports = {"video": [(100.5, SenderReport(5000.0, 1000))],
                         "audio": [(100.5, SenderReport(5000.02, (1 << 32) - 480))]}
    audio = speech_track(media / "speech_16k.wav", 4.0)
    insert_markers(audio, marker_frames(measured))
    recording.marker_sent = {f: sent[f] for f in marker_frames(measured)}
    for n in range(len(audio) // PACKET):
        arrived = 100.0 + n * PACKET / 48_000 + 0.83
        recording.audio.append(audio[n * PACKET : (n + 1) * PACKET])
        recording.audio_arrived.append(arrived)
        recording.audio_received.append(arrived + 0.08)
        recording.audio_rtp.append(((1 << 32) - 480 + n * PACKET) % (1 << 32))  # wraps: modulo 2^32

    result = summarise(recording)
    assert result["latency_ms"] == {"p50": 800.0, "p95": 800.0, "max": 800.0}
    assert result["latency_at_recv_ms"]["p50"] == 840.0
    assert result["ttff_ms"] == 800.0
    assert result["av_offset_ms"] == {"p50": 30.0, "max_abs": 30.0}
    assert result["av_offset_at_recv_ms"]["p50"] == -10.0, "audio hold taken out, the video's left in"
    assert result["av_offset_presented_ms"]["p50"] == pytest.approx(20.0, abs=0.5)
    assert result["audio_latency_ms"]["p50"] == 830.0
    assert result["markers"]["matched"] == result["markers"]["heard"] == 3
    assert result["model_fraction"] == pytest.approx(37 / 75, abs=1e-3)
    assert result["stamps_rejected"] == 1 and result["frames_received"] == measured
    assert result["receiver_hold_ms"] == {"video_p50": 40.0, "audio_p50": 80.0, "audio_prefetch_packets": 4}

    # Packets lost on the way back: one just before the first marker's chirp (it stays where it
    # was), and the first of the second's (spliced to the one before, it would be found 20 ms early:
    # it is left out).
    chirp_packets = [round(MARKER_FRAME * 48_000 / FPS + 48_000 * m) // PACKET for m in (0, 1)]
    for lost in sorted([chirp_packets[0] - 1, chirp_packets[1]], reverse=True):
        for packets in (recording.audio, recording.audio_arrived, recording.audio_received, recording.audio_rtp):
            del packets[lost]
    lossy = summarise(recording)
    assert lossy["markers"]["heard"] == 2 and lossy["av_offsets_ms"] == {str(MARKER_FRAME): 30.0,
                                                                        str(MARKER_FRAME + 2 * FPS): 30.0}
    assert lossy["av_offset_presented_ms"]["max_abs"] == pytest.approx(20.0, abs=0.5)


def test_a_picture_is_timed_only_where_its_first_showing_came_back():
    def frame(stamp, rtp):
        return ReceivedFrame(stamp, 0.0, None if rtp is None else rtp / 90_000, rtp, None)
    # Picture 5 first showed in the frame at 3600 * 5, lost on the way back; its repeat came back.
    frames = [frame(k, 3600 * k) for k in range(5)] + [frame(5, 3600 * 6), frame(6, 3600 * 7)]
    frames += [frame(7, 3600 * 8), frame(7, 3600 * 9)]  # shown twice, the first came back
    first = first_showings(frames, [f.arrived for f in frames])
    assert sorted(first) == [1, 2, 3, 4, 6, 7], "0: nothing before it; 5: its first showing was lost"
    assert first[7][2] == 3600 * 8
    assert first_showings([frame(5, None)], [1.0]) == {5: (1.0, 0.0, None)}, "no RTP times: first arrival"


def test_no_server_is_one_line_and_status_2(clip_path, capsys):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    status = run_stream(["bench", "--webrtc", "--video", str(clip_path), "--seconds", "3",
                         "--url", f"http://127.0.0.1:{port}"])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error == f"error: no lipstream server answering GET http://127.0.0.1:{port}/sessions"
    assert run_stream(["bench", "--webrtc", "--seconds", "1"]) == 2
    assert "--seconds: from 2 to" in capsys.readouterr().err

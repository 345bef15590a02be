"""Prepared avatars: the same faces and latents as live tracking, none of its work per frame, cached on
disk by content and config, and rebuilt when the file cannot be trusted."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from conftest import MEDIA
from media_helpers import tiny_lipsync
from stream.alignment_points import MAPPINGS
from stream.avatar_prep import AvatarCache, AvatarFaces, PreparedAvatar, avatar_key, loop_frames, prepare_avatar
from stream.face_alignment import FaceAligner
from stream.face_landmarks import FaceLandmarker
from stream.generation import faces_to_tensor
from stream.landmark_smoothing import PointSmoother
from stream.pipeline import LipSync
from stream.runner import run_async
from stream.session_options import AudioFormat
from stream.sessions import SessionManager
from transport.avatar_files import load_avatar_file
from transport.files import read_audio

FPS = 25
# Crops are uint8 warps of the same points: equal up to one level of rounding; affines in pixels.
CROP_TOLERANCE = 1
AFFINE_TOLERANCE = 1e-6
LATENT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    """0.5 s of speaker_wide.mp4 at 640 px, as an upload becomes, with the face covered in 3 frames."""
    frames = [frame.copy() for frame in load_avatar_file(MEDIA / "speaker_wide.mp4", FPS, seconds=0.48).frames]
    for frame in frames[5:8]:  # her head under a patch of her own coat: a real picture without a face
        frame[150:330, 110:270] = frame[420:600, 110:270]
    return frames


@pytest.fixture(scope="module")
def portrait() -> list[np.ndarray]:
    return load_avatar_file(MEDIA / "portrait.png", FPS).frames


@pytest.fixture(scope="module")
def speech_pcm() -> bytes:
    """speech_16k.wav as a program sends it: 16 kHz mono s16le."""
    speech_16k, _ = read_audio(MEDIA / "speech_16k.wav")
    return (np.clip(speech_16k, -1, 1) * 32767).astype("<i2").tobytes()


class Calls:
    """Counts face detections and VAE encodes, wherever they are made from."""

    def __init__(self, monkeypatch, lipsync: LipSync):
        self.landmarks = self.encoded = 0
        find, encode = FaceLandmarker.alignment_points, lipsync.generator.encode_condition

        def counted_find(landmarker, rgb):
            self.landmarks += 1
            return find(landmarker, rgb)

        def counted_encode(faces):
            self.encoded += len(faces)
            return encode(faces)

        monkeypatch.setattr(FaceLandmarker, "alignment_points", counted_find)
        monkeypatch.setattr(lipsync.generator, "encode_condition", counted_encode)

    @property
    def total(self) -> int:
        return self.landmarks + self.encoded


def test_prepared_faces_and_latents_are_what_live_tracking_makes(clip, tmp_path):
    lipsync = tiny_lipsync()
    prepared = prepare_avatar(clip, lipsync)
    played = loop_frames(clip)
    assert len(prepared) == len(played) == 2 * len(clip) - 2
    assert all(prepared[i] is played[i] for i in range(len(played)))
    # Live tracking, written out: one landmarker, smoother and aligner following the frames as played
    # (the clip's faceless runs are shorter than FORGET_AFTER_MISSES, so nothing is reset).
    live = []
    aligner = FaceAligner(lipsync.config["resolution"])
    smoother = PointSmoother(lipsync.config["fps"])
    with FaceLandmarker(mapping=MAPPINGS[lipsync.config["face"]["landmarks"]]) as landmarker:
        for image in played:
            points = landmarker.alignment_points(image)
            live.append(None if points is None else aligner.align(image, smoother(points)))
    without = [i for i, face in enumerate(live) if face is None]
    assert without == [i for i, face in enumerate(prepared.faces) if face is None]
    assert set(without) >= {5, 6, 7} and len(without) < len(played) // 2 and prepared.frames_without_face == len(without)
    pairs = [(a, b) for a, b in zip(prepared.faces, live) if b is not None]
    assert max(np.abs(a.image.astype(np.int16) - b.image).max() for a, b in pairs) <= CROP_TOLERANCE
    assert all(np.allclose(a.affine, b.affine, rtol=0, atol=AFFINE_TOLERANCE) and a.crop_size == b.crop_size
               for a, b in pairs)
    assert np.std([b.image.astype(np.float32).mean() for _, b in pairs]) > 0  # real, varied crops
    # The model stage encodes a stride of new faces at a time; the prepared ones were encoded by window.
    live_faces = [b.image for _, b in pairs]
    live_latents = torch.cat([lipsync.generator.encode_condition(faces_to_tensor(live_faces[i : i + 4]))
                              for i in range(0, len(live_faces), 4)])
    prepared_latents = torch.stack([c for c in prepared.conditions if c is not None])
    # (the VAE latents, channels 1-8 after the mask, differ from frame to frame: real faces)
    assert prepared_latents.shape == live_latents.shape and prepared_latents[:, 5:].std(0).mean() > 1e-3
    torch.testing.assert_close(prepared_latents, live_latents, rtol=0, atol=LATENT_TOLERANCE)
    # What comes back from the disk is what went in (a copy: float rounding at most).
    AvatarCache(tmp_path).prepare(clip, lipsync)
    loaded = AvatarCache(tmp_path)
    again = loaded.prepare(clip, lipsync)
    assert loaded.loaded == 1 and loaded.prepared == 0
    for a, b, ca, cb in zip(prepared.faces, again.faces, prepared.conditions, again.conditions):
        assert (a is None) == (b is None) == (ca is None) == (cb is None)
        if a is not None:
            assert np.array_equal(a.image, b.image) and a.crop_size == b.crop_size  # uint8, ints
            np.testing.assert_allclose(a.affine, b.affine, rtol=0, atol=1e-9)
            torch.testing.assert_close(ca, cb, rtol=0, atol=1e-6)


class Collect:
    """A broadcast sink that keeps the frames a program session sends."""

    def __init__(self):
        self.frames = []

    def offer(self, at, output) -> None:
        self.frames.append(output.frame)

    def end(self) -> None:
        pass


async def _program(manager: SessionManager, avatar, pcm: bytes, seconds: float, switch_to=None) -> tuple:
    """A program session fed ``seconds`` of speech twice as fast as real time; its frames and stats."""
    session = manager.create("program", avatar=avatar, audio_format=AudioFormat(16_000, 1))
    sink = Collect()
    session.broadcast.subscribe(sink)
    await session.start()
    step = 3200  # 100 ms
    for start in range(0, int(seconds * 16_000) * 2, step):
        session.write_audio(pcm[start : start + step])
        await asyncio.sleep(0.05)
    if switch_to is not None:
        session.switch_avatar(switch_to, "next")
    await asyncio.sleep(seconds / 2 + 1.0)
    stats = session.stats()
    await session.close()
    return sink.frames, stats, session.faces


def test_a_prepared_session_never_tracks_or_encodes_per_frame(monkeypatch, clip, portrait, speech_pcm, tmp_path):
    lipsync = tiny_lipsync()
    cache = AvatarCache(tmp_path)
    prepared_portrait = cache.prepare(portrait, lipsync)
    cache.prepare(clip, lipsync)
    calls = Calls(monkeypatch, lipsync)

    # Without a cache, an avatar is tracked and encoded like a camera: the counters see it.
    frames, stats, faces = run_async(_program(SessionManager(lipsync), portrait, speech_pcm, 1.0))
    assert calls.landmarks >= len(frames) > 10 and calls.encoded > 0, (calls.landmarks, calls.encoded)

    # Prepared: given one (as the server gives its store's), or plain frames through the cache, and
    # switched to another mid-stream (plain frames: found in the cache, prepared off the loop).
    calls.landmarks = calls.encoded = 0
    manager = SessionManager(lipsync, avatar_cache=cache)
    for avatar in (prepared_portrait, portrait):
        frames, stats, faces = run_async(_program(manager, avatar, speech_pcm, 2.0, switch_to=clip))
        assert isinstance(faces, AvatarFaces) and isinstance(faces.avatar, PreparedAvatar)
        assert stats["frames_generated"] > 10 and stats["frames_out"] > 50 and len(frames) > 50, stats
        assert calls.total == 0, (calls.landmarks, calls.encoded)
        shapes = [frame.image.shape[:2] for frame in frames]
        assert shapes[0] == (640, 640) and shapes[-1] == (640, 360)  # the clip came in-band
        assert faces.frames_without_face >= stats["frames_without_face"] > 0  # the covered frames, counted
    assert cache.prepared == 2 and cache.reused >= 3


def test_the_cache_file_is_reused_and_rebuilt_when_it_cannot_be_trusted(monkeypatch, clip, portrait, tmp_path):
    lipsync = tiny_lipsync()
    calls = Calls(monkeypatch, lipsync)
    first = AvatarCache(tmp_path)
    made = first.prepare(portrait, lipsync)
    path = first.path(made.key)
    assert path.is_file() and calls.landmarks == 1 and calls.encoded == 1 and first.prepared == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

    def prepare_again() -> tuple[AvatarCache, PreparedAvatar, int]:
        before = calls.total
        cache = AvatarCache(tmp_path)  # a new process: nothing in memory
        return cache, cache.prepare(portrait, lipsync), calls.total - before

    cache, loaded, work = prepare_again()
    assert work == 0 and cache.loaded == 1
    torch.testing.assert_close(loaded.conditions[0], made.conditions[0], rtol=0, atol=1e-6)

    good = path.read_bytes()
    damaged = {
        "garbage": np.random.default_rng(3).integers(0, 256, len(good), dtype=np.uint8).tobytes(),
        "truncated": good[: len(good) // 2],
        "flipped payload": good[:-600] + bytes(b ^ 0x5A for b in good[-600:]),  # header intact
    }
    damaged["another avatar's file"] = first.path(first.prepare(clip, lipsync).key).read_bytes()
    for what, data in damaged.items():
        path.write_bytes(data)
        cache, rebuilt, work = prepare_again()
        assert work == 2 and cache.prepared == 1 and cache.loaded == 0, what
        torch.testing.assert_close(rebuilt.conditions[0], made.conditions[0], rtol=0, atol=1e-6, msg=what)
        assert np.array_equal(rebuilt.faces[0].image, made.faces[0].image), what
        cache, reloaded, work = prepare_again()
        assert work == 0 and cache.loaded == 1, f"{what}: the rebuilt file is used again"

    # The in-memory copy answers a second prepare in the same process without reading the disk.
    path.unlink()
    assert cache.prepare(portrait, lipsync) is reloaded and cache.reused == 1 and not path.exists()


def test_the_key_follows_the_frames_and_the_config(clip):
    lipsync = tiny_lipsync()
    key = avatar_key(clip, lipsync)
    assert avatar_key([frame.copy() for frame in clip], lipsync) == key  # content, not identity
    touched = [frame.copy() for frame in clip]
    touched[3][100, 100, 0] ^= 1
    assert avatar_key(touched, lipsync) != key
    assert avatar_key(clip[:-1], lipsync) != key

    def variant(**changes) -> LipSync:
        return LipSync({**lipsync.config, **changes}, lipsync.generator, lipsync.audio_encoder, lipsync.device)

    assert avatar_key(clip, variant()) == key
    assert avatar_key(clip, variant(name="tiny-copy")) != key
    assert avatar_key(clip, variant(resolution=96)) != key
    other_vae = copy.deepcopy(lipsync.generator)
    with torch.no_grad():
        next(other_vae.vae.autoencoder.encoder.parameters()).add_(1e-3)
    assert avatar_key(clip, LipSync(lipsync.config, other_vae, lipsync.audio_encoder, lipsync.device)) != key
    decoder_only = copy.deepcopy(lipsync.generator)
    with torch.no_grad():  # the decoder plays no part in the condition latents
        next(decoder_only.vae.autoencoder.decoder.parameters()).add_(1e-3)
    assert avatar_key(clip, LipSync(lipsync.config, decoder_only, lipsync.audio_encoder, lipsync.device)) == key


def test_the_server_prepares_each_avatar_once(monkeypatch, tmp_path):
    from stream import commands
    from transport.server import LipstreamServer, ServeSettings

    lipsync = tiny_lipsync()
    settings = ServeSettings(avatar=str(MEDIA / "portrait.png"), avatar_cache=str(tmp_path))
    server = LipstreamServer(lipsync, settings)
    default = server.avatars.default
    assert default.prepared is not None and server.avatar_cache.prepared == 1 and len(list(tmp_path.iterdir())) == 1
    calls = Calls(monkeypatch, lipsync)

    async def run():
        session = await commands.create_program_session(server.manager, server.avatars, {"avatar": "default"})
        await asyncio.sleep(0.5)
        await session.close()
        return session.faces

    faces = run_async(run())
    assert isinstance(faces, AvatarFaces) and faces.avatar is default.prepared and calls.total == 0
    restarted = LipstreamServer(lipsync, settings)
    assert restarted.avatar_cache.loaded == 1 and restarted.avatar_cache.prepared == 0
    assert calls.encoded == 0 and calls.landmarks == 1  # only the loader's check that it shows a face

"""RTMP bench: a stamped clip published live into nginx, relayed by ``run_stream.py rtmp`` to another
stream on the same server, and read back, everything on one clock (CLOCK_MONOTONIC is the same in
every process on the machine).

    python run_stream.py bench --rtmp [--config tiny] [--seconds 20] [--size 360x640] [--json out.json]
    python -m bench.rtmp publish URL [--seconds S] [--size WxH] [--first-index K] [--log FILE]
    python -m bench.rtmp read URL --out PREFIX [--seconds S]

- ``Nginx``: Debian's nginx with libnginx-mod-rtmp on 127.0.0.1, its config, pid and logs in a
  temp folder (``Nginx.unavailable()`` says why it cannot run).
- ``publish``: the talking-head clip (../shared/media/speaker_wide.mp4 scaled, forward-backward)
  with its own speech, each picture stamped with its index and a chirp at the start of frame 12 of
  every second (bench/glass_to_glass.py's stamp and markers), encoded like OBS does (x264
  zerolatency, 2 s keyframes, AAC 48 kHz) and sent in real time. The moment each frame leaves is
  logged.
- ``read``: pulls a stream and logs each picture's timestamp, stamp, size and the moment it was
  decoded, and the audio placed by its timestamps; it counts disconnects (and reopens).
- ``summarise``: latency (read back minus sent, per stamp, first time seen), frames against
  frames published over the same span, the largest gap in the timestamps, and the A/V offset in
  the stream read back (a chirp's timestamp minus that of the first picture stamped with its
  frame, or of one of the next two less their frame times when it was skipped; positive: audio
  late).

The bench reads the input stream and the relayed one at the same time: the first is the RTMP
leg alone (publisher -> nginx -> reader), the second adds lipstream (pull, lip-sync, push).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from bench.glass_to_glass import (FPS, MARKER_FRAME, Clip, ProbeError, default_clip, draw_stamp, find_markers,
                                  insert_markers, read_stamp, speech_track)

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
AUDIO_RATE = 48_000
SAMPLES_PER_FRAME = AUDIO_RATE // FPS
DEFAULT_SIZE = (360, 640)
MARKER_STAND_IN = 2  # frames after a skipped marker picture that may stand in for it
CONTIGUOUS = 0.003  # seconds: audio blocks closer than this to the end of the one before follow it
MODULE_DIRS = (Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules"))


class BenchError(RuntimeError):
    """The bench cannot run or measure: one line for the user."""


# -- nginx ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nginx:
    """An RTMP relay on 127.0.0.1:``port`` (application ``live``), in its own temp folder."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="lipstream-nginx-"))
        self.process: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)

    @staticmethod
    def module() -> Path | None:
        return next((d / "ngx_rtmp_module.so" for d in MODULE_DIRS if (d / "ngx_rtmp_module.so").exists()), None)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why nginx with RTMP cannot run here (None: it can)."""
        if cls.binary() is None:
            return "nginx is not installed (apt-get install nginx libnginx-mod-rtmp)"
        if cls.module() is None:
            return ("nginx's RTMP module (ngx_rtmp_module.so) is not in "
                    f"{' or '.join(map(str, MODULE_DIRS))} (apt-get install libnginx-mod-rtmp)")
        return None

    def url(self, key: str, app: str = "live") -> str:
        return f"rtmp://127.0.0.1:{self.port}/{app}/{key}"

    def start(self, timeout: float = 10.0) -> "Nginx":
        reason = self.unavailable()
        if reason:
            raise BenchError(reason)
        config = self.folder / "nginx.conf"
        config.write_text(
            f"load_module {self.module()};\n"
            "daemon off;\n"
            "worker_processes 1;\n"
            f"pid {self.folder / 'nginx.pid'};\n"
            f"error_log {self.folder / 'error.log'} info;\n"
            "events { worker_connections 64; }\n"
            f"rtmp {{ server {{ listen 127.0.0.1:{self.port}; application live {{ live on; record off; }} }} }}\n")
        self.process = subprocess.Popen(
            [self.binary(), "-c", str(config), "-p", str(self.folder), "-e", str(self.folder / "error.log")],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "stderr.log", "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"nginx exited at once: {(self.folder / 'stderr.log').read_text()[-300:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"nginx did not listen on 127.0.0.1:{self.port} within {timeout:g} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown: every connection is closed
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- the publisher --------------------------------------------------------------------------


def publish(url: str, seconds: float, size: tuple[int, int] = DEFAULT_SIZE, first_index: int = 0,
            log: Path | None = None, stop: threading.Event | None = None, realtime: bool = True) -> int:
    """Send ``seconds`` of the stamped clip and its marked speech to ``url`` in real time (or as
    fast as it encodes, ``realtime=False``: to make a file).

    Frame k carries stamp ``first_index + k`` (so a restarted publisher goes on numbering); its
    send time is appended to ``log`` as "index monotonic" as soon as it is muxed. Returns frames sent.
    """
    try:
        clip = Clip.load(default_clip(size), round(seconds * FPS))
        speech = speech_track(MEDIA / "speaker_wide.mp4", 10.0)
    except ProbeError as exc:
        raise BenchError(str(exc)) from None
    frames = round(seconds * FPS)
    audio = np.resize(np.roll(speech, -((first_index * SAMPLES_PER_FRAME) % len(speech))), frames * SAMPLES_PER_FRAME)
    insert_markers(audio, [k for k in range(frames) if (first_index + k) % FPS == MARKER_FRAME])
    out = av.open(url, "w", format="flv" if "://" in url else None,
                  container_options={"flvflags": "no_duration_filesize"} if "://" in url else None)
    video = out.add_stream("libx264", rate=FPS)
    video.width, video.height = clip.size
    video.pix_fmt = "yuv420p"
    video.bit_rate = 1_500_000
    video.options = {"preset": "ultrafast", "tune": "zerolatency",
                     "x264-params": "keyint=50:min-keyint=50:scenecut=0"}
    sound = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
    record = open(log, "a", buffering=1) if log else None
    start = time.monotonic()
    sent = 0
    try:
        for k in range(frames):
            if stop is not None and stop.is_set():
                break
            if realtime:
                time.sleep(max(0.0, start + k / FPS - time.monotonic()))
            index = first_index + k
            yuv = clip.yuv[clip.picture_of(index)].copy()
            draw_stamp(yuv, index)
            picture = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            picture.pts, picture.time_base = k, Fraction(1, FPS)
            for packet in video.encode(picture):
                out.mux(packet)
            block = audio[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME]
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.stack([block, block])), format="fltp",
                                               layout="stereo")
            chunk.sample_rate, chunk.pts = AUDIO_RATE, k * SAMPLES_PER_FRAME
            for packet in sound.encode(chunk):
                out.mux(packet)
            if record:
                record.write(f"{index} {time.monotonic():.6f}\n")
            sent += 1
        for stream in (video, sound):
            for packet in stream.encode(None):
                out.mux(packet)
    finally:
        with contextlib.suppress(av.error.FFmpegError, OSError):
            out.close()
        if record:
            record.close()
    return sent


def read_sent(log: Path) -> dict[int, float]:
    """index -> monotonic send time, from one or more publishers' logs (the first time an index was sent)."""
    sent: dict[int, float] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sent.setdefault(int(parts[0]), float(parts[1]))
    return sent


# -- the reader -----------------------------------------------------------------------------


@dataclass
class Reading:
    """What came back: per picture (pts s, decoded at monotonic, stamp or -1, width, height); audio mono."""

    frames: list[tuple[float, float, int, int, int]]
    audio: np.ndarray
    audio_start: float | None  # pts of audio[0]
    disconnects: int
    opened_at: float | None

    def save(self, prefix: Path) -> None:
        np.save(f"{prefix}.npy", self.audio.astype(np.float32))
        Path(f"{prefix}.json").write_text(json.dumps({
            "frames": self.frames, "audio_start": self.audio_start, "disconnects": self.disconnects,
            "opened_at": self.opened_at}))

    @classmethod
    def load(cls, prefix: Path) -> "Reading":
        data = json.loads(Path(f"{prefix}.json").read_text())
        return cls([tuple(f) for f in data["frames"]], np.load(f"{prefix}.npy"), data["audio_start"],
                   data["disconnects"], data["opened_at"])


def read(url: str, seconds: float, stop: threading.Event | None = None, open_timeout: float = 30.0) -> Reading:
    """Read ``url`` for ``seconds`` after its first picture (or until ``stop``), reopening it when it drops."""
    stop = stop or threading.Event()
    frames: list[tuple[float, float, int, int, int]] = []
    blocks: list[tuple[float, np.ndarray]] = []
    disconnects = 0
    opened_at = None
    deadline = time.monotonic() + open_timeout
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            # nobuffer: what arrived while the stream was probed is dropped, not handed over late in a burst.
            options = {"rw_timeout": "3000000", "fflags": "nobuffer"} if "://" in url else {}
            container = av.open(url, options=options, timeout=(10, 3))
        except (av.error.FFmpegError, OSError):
            time.sleep(0.2)
            continue
        opened_at = opened_at or time.monotonic()
        video = container.streams.video[0] if container.streams.video else None
        if video is not None:
            video.thread_type = "SLICE"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        try:
            for frame in container.decode(*container.streams):
                now = time.monotonic()
                if isinstance(frame, av.VideoFrame):
                    luma = frame.to_ndarray(format="gray")
                    stamp = read_stamp(luma)
                    frames.append((float(frame.pts * frame.time_base), now, -1 if stamp is None else stamp,
                                   frame.width, frame.height))
                    if len(frames) == 1:
                        deadline = now + seconds
                elif frame.pts is not None:
                    at = float(frame.pts * frame.time_base)
                    frame.pts = None
                    blocks += [(at, f.to_ndarray().reshape(-1)) for f in resampler.resample(frame)]
                if stop.is_set() or (frames and now > deadline):
                    break
            else:
                if "://" not in url:
                    break  # a file: read once
                disconnects += 1  # the stream ended under us
        except (av.error.FFmpegError, OSError):
            disconnects += 1
        finally:
            container.close()
        if (frames and time.monotonic() > deadline) or "://" not in url:
            break
    audio, audio_start = _place(blocks)
    return Reading(frames, audio, audio_start, disconnects, opened_at)


def _place(blocks: list[tuple[float, np.ndarray]]) -> tuple[np.ndarray, float | None]:
    """Audio blocks laid out by their timestamps (the stream's, whatever its gaps), from the first one.

    FLV stamps in whole milliseconds: a block within a few of where the one before ended follows
    it sample for sample (else the chirps, cut and overlapped by rounding, would not be found)."""
    if not blocks:
        return np.zeros(0, np.float32), None
    start = blocks[0][0]
    places, follows = [], 0
    for at, block in blocks:
        place = round((at - start) * AUDIO_RATE)
        place = follows if abs(place - follows) <= CONTIGUOUS * AUDIO_RATE else max(0, place)
        places.append(place)
        follows = place + len(block)
    out = np.zeros(max(p + len(b) for p, (_, b) in zip(places, blocks)), np.float32)
    for place, (_, block) in zip(places, blocks):
        out[place : place + len(block)] = block
    return out, start


# -- the figures ----------------------------------------------------------------------------


def _percentiles(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p95": None, "max": None}
    ms = np.asarray(values_s) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(ms.max()), 1)}


def av_offsets(reading: Reading) -> list[float]:
    """Seconds from each marker picture to its chirp in the stream read back (positive: audio late).

    A marker picture the stream skipped (a live session takes the newest picture at each tick) is
    placed from the next one shown, up to MARKER_STAND_IN frames after it, one frame time apart.
    """
    if reading.audio_start is None:
        return []
    heard = [reading.audio_start + start / AUDIO_RATE for start, _ in find_markers(reading.audio)]
    shown: dict[int, tuple[int, float]] = {}  # marker frame -> (frames after it, where it would be)
    for pts, _, stamp, _, _ in reading.frames:
        if stamp < 0:
            continue
        after = (stamp - MARKER_FRAME) % FPS
        marker = stamp - after
        if after <= MARKER_STAND_IN and after < shown.get(marker, (FPS, 0.0))[0]:
            shown[marker] = (after, pts - after / FPS)
    offsets = []
    for _, pts in shown.values():
        near = [at - pts for at in heard if abs(at - pts) < 0.5]
        if near:
            offsets.append(min(near, key=abs))
    return offsets


def _first_seen(reading: Reading) -> dict[int, float]:
    """stamp -> when a picture with it was first read back."""
    first_seen: dict[int, float] = {}
    for _, at, stamp, _, _ in reading.frames:
        if stamp >= 0:
            first_seen.setdefault(stamp, at)
    return first_seen


def summarise(reading: Reading, sent: dict[int, float]) -> dict:
    stamped = [(pts, at, stamp) for pts, at, stamp, _, _ in reading.frames if stamp >= 0]
    first_seen = _first_seen(reading)
    latency = [at - sent[stamp] for stamp, at in first_seen.items() if stamp in sent]
    pts = [f[0] for f in reading.frames]
    gaps = np.diff(pts) if len(pts) > 1 else np.zeros(0)
    offsets = av_offsets(reading)
    span = None
    if stamped:
        lo, hi = min(s for _, _, s in stamped), max(s for _, _, s in stamped)
        # From the first showing of the first stamp to the first showing of the last: the stream may
        # go on showing the last picture after its source stopped.
        first = next(i for i, f in enumerate(reading.frames) if f[2] == lo)
        last = next(i for i, f in enumerate(reading.frames) if f[2] == hi)
        span = {"published": hi - lo + 1, "read": last - first + 1, "stamps_seen": len(first_seen)}
    return {
        "frames": len(reading.frames),
        "sizes": sorted({f"{w}x{h}" for *_, w, h in reading.frames}),
        "span": span,
        "frame_ratio": round(span["read"] / span["published"], 3) if span else None,
        "latency_ms": _percentiles(latency),
        "largest_gap_ms": round(1000 * float(gaps.max()), 1) if len(gaps) else None,
        "audio_seconds": round(len(reading.audio) / AUDIO_RATE, 2),
        "audio_rms": round(float(np.sqrt(np.mean(reading.audio ** 2))), 4) if len(reading.audio) else 0.0,
        "markers": len(offsets),
        "av_offset_ms": _percentiles([abs(o) for o in offsets]) | (
            {"median": round(1000 * float(np.median(offsets)), 1)} if offsets else {"median": None}),
        "disconnects": reading.disconnects,
    }


# -- the bench ------------------------------------------------------------------------------


def _machine() -> dict:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "load_1min": round(os.getloadavg()[0], 2)}


def _python(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _interrupt(process: subprocess.Popen, wait: float = 20.0) -> None:
    for send, timeout in ((lambda: process.send_signal(signal.SIGINT), wait), (process.kill, 5)):
        if process.poll() is not None:
            return
        send()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)


def measure(config: str = "tiny", seconds: float = 20.0, size: tuple[int, int] = DEFAULT_SIZE,
            relay_args: tuple[str, ...] = ()) -> dict:
    """Publish for ``seconds``, relay with ``run_stream.py rtmp``, read both streams back, summarise."""
    if not 5 <= seconds <= 600:
        raise BenchError("--seconds: from 5 to 600")
    default_clip(size)  # made (and cached) before anything is timed
    folder = Path(tempfile.mkdtemp(prefix="lipstream-bench-rtmp-"))
    machine = _machine()
    with Nginx() as nginx:
        relay = _python("run_stream.py", "rtmp", "--in", nginx.url("in"), "--out", nginx.url("out"),
                        "--config", config, "--preset", "ultrafast", "--bitrate", "1500", "--timeout", "60",
                        "--json", str(folder / "relay.json"), *relay_args, log=folder / "relay.log")
        readers = [_python("-m", "bench.rtmp", "read", nginx.url(key), "--out", str(folder / key),
                           "--seconds", str(seconds + 30), log=folder / f"read-{key}.log") for key in ("in", "out")]
        try:
            time.sleep(2.0)
            publisher = _python("-m", "bench.rtmp", "publish", nginx.url("in"), "--seconds", str(seconds),
                                "--size", f"{size[0]}x{size[1]}", "--log", str(folder / "sent.log"),
                                log=folder / "publish.log")
            publisher.wait(seconds + 60)
            time.sleep(4.0)  # what is in flight comes out
        finally:
            for process in (*readers, relay):  # the readers first: the end of the relay is no disconnect
                _interrupt(process)
        if not (folder / "relay.json").exists():
            raise BenchError(f"the relay did not finish: {(folder / 'relay.log').read_text()[-500:]}")
        sent = read_sent(folder / "sent.log")
        readings = {key: Reading.load(folder / key) for key in ("in", "out")}
        legs = {key: summarise(reading, sent) for key, reading in readings.items()}
    session = json.loads((folder / "relay.json").read_text())
    seen_in, seen_out = (_first_seen(readings[key]) for key in ("in", "out"))
    added = [seen_out[stamp] - at for stamp, at in seen_in.items() if stamp in seen_out]
    return {"config": config, "seconds": seconds, "size": list(size), "published": len(sent),
            "rtmp_only": legs["in"], "through_lipstream": legs["out"],
            "added_by_lipstream_ms": _percentiles(added),
            "session": {k: session.get(k) for k in ("latency_ms", "frames_out", "frames_generated", "fps",
                                                    "dropped_frames", "clock_slips", "ttff_ms", "output")},
            "machine": {**machine, "load_1min_after": round(os.getloadavg()[0], 2)}, "logs": str(folder)}


def measure_cli(args) -> dict:
    """``run_stream.py bench --rtmp``: its arguments to ``measure``."""
    width, _, height = (args.size if args.size != "374x398" else "360x640").partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise BenchError(f"--size {args.size!r}: expected WIDTHxHEIGHT")
    relay_args = (*(("--stride", str(args.stride)) if args.stride != 4 else ()), *(("--no-vad",) if args.no_vad else ()),
                  *(f"--{k}={v}" for k, v, d in (("device", args.device, "auto"), ("precision", args.precision, "auto"),
                                                  ("vae", args.vae, "kl")) if v != d))
    return measure(args.config, args.seconds or 20.0, (int(width) // 2 * 2, int(height) // 2 * 2), relay_args)


def print_table(result: dict) -> None:
    machine = result["machine"]
    print(f"RTMP bench, {result['config']}, {result['size'][0]}x{result['size'][1]}, {result['seconds']:g} s "
          f"({result['published']} frames published) on {machine['cpu']}, {machine['cores_usable']} cores, "
          f"load {machine['load_1min']} -> {machine['load_1min_after']}")
    print(f"  {'':<22}{'latency p50':>12}{'p95':>8}{'A/V |offset| p50':>18}{'p95':>8}{'median':>8}"
          f"{'frames/published':>18}{'largest gap':>13}")
    for label, key in (("publisher->nginx->us", "rtmp_only"), ("... through lipstream", "through_lipstream")):
        leg = result[key]
        lat, off = leg["latency_ms"], leg["av_offset_ms"]
        print(f"  {label:<22}{_ms(lat['p50']):>12}{_ms(lat['p95']):>8}{_ms(off['p50']):>18}{_ms(off['p95']):>8}"
              f"{_ms(off['median']):>8}{leg['frame_ratio'] or 0:>18.3f}{_ms(leg['largest_gap_ms']):>13}")
    added, session = result["added_by_lipstream_ms"], result["session"]
    print(f"  added by lipstream (read back from the output minus from the input, per frame): "
          f"p50 {_ms(added['p50'])} p95 {_ms(added['p95'])} ms")
    print(f"  the session: {session['frames_out']} frames out, {session['frames_generated']} generated, "
          f"{session['dropped_frames']} dropped, {session['clock_slips']} clock slips; its own latency p50 "
          f"{_ms((session['latency_ms'] or {}).get('p50'))} ms (capture to release; its p95 counts the "
          "last picture shown on after the input ended)")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtmp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser("publish", help="send the stamped clip to URL in real time")
    pub.add_argument("url")
    pub.add_argument("--seconds", type=float, default=20.0)
    pub.add_argument("--size", default="360x640")
    pub.add_argument("--first-index", type=int, default=0)
    pub.add_argument("--log", type=Path)
    rd = commands.add_parser("read", help="read URL back and save what came (PREFIX.json, PREFIX.npy)")
    rd.add_argument("url")
    rd.add_argument("--out", type=Path, required=True)
    rd.add_argument("--seconds", type=float, default=60.0)
    rd.add_argument("--open-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: the log and the reading are kept
        signal.signal(number, lambda *_: stop.set())
    if args.command == "publish":
        width, _, height = args.size.partition("x")
        publish(args.url, args.seconds, (int(width), int(height)), args.first_index, args.log, stop)
    else:
        read(args.url, args.seconds, stop, args.open_timeout).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

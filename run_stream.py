#!/usr/bin/env python3
"""lipstream command line: re-lip-sync a file, or benchmark the pipeline.

    python run_stream.py file  --video V --audio A --out out.mp4 --config tiny
    python run_stream.py bench --video V --audio A --config tiny --json bench.json
    python run_stream.py serve --config tiny --avatar PORTRAIT.png   (then open http://127.0.0.1:8080/)
    python run_stream.py rtmp  --in rtmp://HOST/APP/KEY --out rtmp://HOST/APP/KEY2 --config tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2


class UserError(Exception):
    """Anything the user can fix: printed as one line, exit status 2."""


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_stream.py", description="Real-time, streaming lip-sync (LatentSync architecture).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def mqtt_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--mqtt", metavar="URL",
                             help="also take commands and audio over MQTT: mqtt://HOST[:PORT] or "
                                  "mqtts://HOST[:PORT] (TLS); see the README's 'MQTT'")
        command.add_argument("--mqtt-user", help="MQTT user name")
        command.add_argument("--mqtt-password", help="MQTT password (default: $LIPSTREAM_MQTT_PASSWORD)")
        command.add_argument("--mqtt-ca", metavar="FILE",
                             help="mqtts: CA certificates (PEM) that sign the broker's (default: the system's)")
        command.add_argument("--mqtt-prefix", default="lipstream", help="MQTT topic prefix (default: lipstream)")

    def access_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--token",
                             help="access token required on every API route, the WebSocket and MQTT commands "
                                  "(default: $LIPSTREAM_TOKEN; none: whoever reaches the address may use it)")
        command.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                             help="a Host name the server answers to besides loopback and its address "
                                  "(repeatable; '*' for any); see the README's 'Security'")

    def job_options(command: argparse.ArgumentParser, video_required: bool = True) -> None:
        command.add_argument("--video", required=video_required,
                             help="input video: a file or any FFmpeg URL; its face gets the new mouth")
        command.add_argument("--audio",
                             help="driving speech (any container, rate or channels); default: the video's "
                                  "own audio track. The output lasts as long as this audio: the video is "
                                  "looped forward-backward when shorter, cut when longer")
        command.add_argument("--config", default="tiny",
                             help="a config name under configs/ (tiny, latentsync-1.5, latentsync-1.6) or a "
                                  "path to a YAML file (default: tiny)")
        command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
        command.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                             help="model dtype; auto = bf16/fp16 on CUDA, fp32 on CPU")
        command.add_argument("--vae", choices=["kl", "tiny"], default="kl",
                             help="kl: the config's VAE (SD's, as upstream); tiny: TAESD, faster (official "
                                  "configs only)")
        command.add_argument("--deep-cache", type=int, metavar="N",
                             help="reuse the U-Net's deep features between denoising steps: only every Nth "
                                  "step runs it whole (DeepCache; upstream uses 3 with 20 steps; default: the "
                                  "config's, 1 = off)")
        command.add_argument("--checkpoints", metavar="DIR",
                             help="official weights in LatentSync's layout: DIR/latentsync_unet.pt, "
                                  "DIR/whisper/tiny.pt, DIR/vae/ (default: the hub cache, see `download`)")
        command.add_argument("--threads", type=int, metavar="N",
                             help="torch threads per call (default: 1 for live work on a CPU, whose stages and sessions "
                                  "already run in threads of their own; torch's default for a file job)")
        command.add_argument("--bypass", action="store_true",
                             help="skip the model and paste the aligned face back unchanged (a geometry check)")

    file_command = commands.add_parser(
        "file", help="re-lip-sync a video file to an audio file",
        description="Re-lip-sync VIDEO to AUDIO and write an H.264/AAC mp4 at 25 fps. Frames without "
                    "a face pass through unchanged and are counted in the summary.")
    job_options(file_command)
    file_command.add_argument("--out", required=True, help="output mp4 path")
    file_command.add_argument("--quiet", action="store_true", help="no progress bar")

    bench = commands.add_parser(
        "bench", help="measure throughput and time per stage",
        description="Run the file pipeline and report frames per second and milliseconds per frame for "
                    "each stage, as a table and optionally as JSON.")
    job_options(bench, video_required=False)  # required unless --webrtc, checked in main()
    bench.add_argument("--json", help="write the figures to this JSON file")
    bench.add_argument("--live", action="store_true",
                       help="play the clip in real time through a live session: adds latency (p50/p95/max), "
                            "time to first frame, A/V offset, dropped frames and the seam ratio")
    bench.add_argument("--stride", type=int, default=4,
                       help="live: frames a 16-frame window advances by (16 = independent windows)")
    bench.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    bench.add_argument("--seconds", type=float, help="only the first SECONDS of the audio")
    bench.add_argument("--no-vad", action="store_true", help="live: run the model through silence too")
    bench.add_argument("--webrtc", action="store_true",
                       help="glass to glass: an aiortc peer sends a stamped clip to `serve` (started here, "
                            "on loopback) and times what comes back: latency, time to first frame, A/V "
                            "offset, fraction of frames the model changed (bench/glass_to_glass.py). "
                            "--video defaults to a talking-head clip from the shared media, --audio to "
                            "speech_16k.wav, --seconds to 60; --stride/--no-vad go to the session, "
                            "--device/--precision/--vae/--checkpoints to the server")
    bench.add_argument("--size", default="374x398",
                       help="webrtc: WIDTHxHEIGHT of the default clip (default: 374x398)")
    bench.add_argument("--url", help="webrtc: probe this running server (http://HOST:PORT) instead")

    bench.add_argument("--sessions", metavar="N[,N...]",
                       help="many sessions on one model: N avatar sessions fed in real time, each N run unbatched "
                            "and then with the model worker batching across sessions: generated fps, latency "
                            "per session, model fraction, batch sizes (bench/sessions.py); --seconds (default 20), "
                            "--stride, --steps, --max-batch")
    bench.add_argument("--max-batch", type=int, default=8,
                       help="sessions: most windows the model worker runs in one U-Net call (default: 8)")
    bench.add_argument("--rtmp", action="store_true",
                       help="the RTMP leg: a stamped clip published live into nginx (started here), relayed by "
                            "`rtmp` to another stream, read back: latency, A/V offset, frames (bench/rtmp.py); "
                            "--seconds (default 20), --size (default 360x640)")

    rtmp = commands.add_parser(
        "rtmp", help="live dubbing: lip-sync an RTMP (SRT, HLS, file) stream and push it to an RTMP server",
        description="Pull (or, with --listen, accept) a live stream, lip-sync it to its own audio or to "
                    "--audio, and push it to an RTMP server or write a file, until the input ends or "
                    "Ctrl-C. Inputs that drop are reopened with backoff while the output carries on. "
                    "See the README's 'RTMP'.")
    rtmp.add_argument("--in", dest="source", required=True, metavar="URL",
                      help="rtmp://, rtmps://, srt://, http(s):// (HLS) or a file (played in real time)")
    rtmp.add_argument("--threads", type=int, metavar="N",
                      help="torch threads per call (default: 1 for live work on a CPU, whose stages and sessions "
                                  "already run in threads of their own; torch's default for a file job)")
    rtmp.add_argument("--listen", action="store_true",
                      help="accept one publisher (OBS) at --in rtmp://HOST:PORT/APP/KEY instead of pulling")
    rtmp.add_argument("--out", required=True, metavar="URL",
                      help="rtmp:// or rtmps://HOST[:PORT]/APP/KEY to push to, or a file (.flv .mp4 .mkv .mov .ts)")
    rtmp.add_argument("--audio", metavar="SOURCE",
                      help="replace the input's audio: a file or URL (silence after it ends), or 'api': "
                           "program audio, PCM over --serve's WebSocket /sessions/NAME/audio")
    rtmp.add_argument("--api-rate", type=int, default=24_000, help="--audio api: PCM rate in Hz (default 24000)")
    rtmp.add_argument("--api-channels", type=int, default=1, help="--audio api: 1 or 2 (default 1)")
    rtmp.add_argument("--bitrate", type=int, default=2500, help="video kbit/s, constrained (default 2500)")
    rtmp.add_argument("--preset", default="veryfast", help="x264 preset (default veryfast; ultrafast on weak CPUs)")
    rtmp.add_argument("--timeout", type=float, default=10.0,
                      help="seconds an input may take to open, and to send nothing before it counts as lost "
                           "(default 10)")
    rtmp.add_argument("--retries", type=int, default=0,
                      help="more attempts, with backoff, before an input or output that never opened is "
                           "given up (default 0); once up, they are reopened forever")
    rtmp.add_argument("--name", default="rtmp", help="the session's name (default rtmp)")
    rtmp.add_argument("--stride", type=int, default=4, help="frames a 16-frame window advances by (default 4)")
    rtmp.add_argument("--no-vad", action="store_true", help="run the model through silence too")
    rtmp.add_argument("--serve", type=int, metavar="PORT",
                      help="also serve the page and API: WebRTC viewers watch the session (mode viewer)")
    rtmp.add_argument("--serve-host", default="127.0.0.1", help="--serve address (default 127.0.0.1)")
    access_options(rtmp)
    mqtt_options(rtmp)  # with --serve: the session's commands and --audio api over MQTT too
    rtmp.add_argument("--ice-host", action="append", default=[], metavar="IP", help="as for `serve`")
    rtmp.add_argument("--json", help="write the summary to this JSON file")
    rtmp.add_argument("--config", default="tiny", help="a config name or YAML path (default: tiny)")
    rtmp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    rtmp.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    rtmp.add_argument("--vae", choices=["kl", "tiny"], default="kl", help="as for `file` (default: kl)")
    rtmp.add_argument("--deep-cache", type=int, metavar="N", help="as for `file`")
    rtmp.add_argument("--checkpoints", metavar="DIR", help="official weights (see `file --help`)")

    download = commands.add_parser(
        "download", help="fetch a config's official weights into the hub cache",
        description="Fetch the U-Net, Whisper tiny and the SD VAE that CONFIG names, through "
                    "huggingface_hub (progress bars; interrupted downloads resume). Where the hub cannot "
                    "be reached it says at once which files are missing and where to put them.")
    download.add_argument("config", help="a config name (latentsync-1.5, latentsync-1.6) or YAML path")
    download.add_argument("--cache-dir", help="hub cache folder (default: huggingface_hub's, HF_HOME)")
    download.add_argument("--vae", choices=["kl", "tiny"], default="kl",
                          help="which VAE to fetch: kl = sd-vae-ft-mse (default), tiny = TAESD")

    serve = commands.add_parser(
        "serve", help="serve the page and WebRTC sessions: camera or avatar, driven by the microphone",
        description="Serve a page (GET /) and WebRTC signalling (POST /offer). Each browser session "
                    "gets its face (or an avatar) lip-synced to its microphone. ICE options: see the "
                    "README's 'Serving over WebRTC'.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="HTTP port (default: 8080)")
    serve.add_argument("--config", default="tiny", help="a config name or YAML path (default: tiny)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    serve.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    serve.add_argument("--threads", type=int, metavar="N",
                       help="torch threads per call (default: 1 for live work on a CPU, whose stages and sessions "
                                  "already run in threads of their own; torch's default for a file job)")
    serve.add_argument("--vae", choices=["kl", "tiny"], default="kl", help="as for `file` (default: kl)")
    serve.add_argument("--deep-cache", type=int, metavar="N", help="as for `file`")
    serve.add_argument("--batch", type=int, metavar="N",
                       help="share the model among sessions through one worker that batches their windows, up to N "
                            "per U-Net call (0: each session calls the model itself; default: 8 on a GPU, 0 on a CPU)")
    serve.add_argument("--cuda-graphs", action="store_true",
                       help="the model worker replays the U-Net from CUDA graphs, captured once per batch shape "
                            "(a GPU and --batch; each shape's first window is late by its capture, about a second)")
    serve.add_argument("--checkpoints", metavar="DIR", help="official weights (see `file --help`)")
    serve.add_argument("--max-sessions", type=int, default=4,
                       help="live sessions at once; past it /offer answers 503 (default: 4)")
    serve.add_argument("--avatar", metavar="PATH",
                       help="the default avatar: a portrait (png/jpeg/webp) or a clip (mp4/webm/mov) "
                            "with a face; without it, avatar mode needs an upload from the page")
    serve.add_argument("--avatar-cache", metavar="DIR",
                       help="keep prepared avatars (faces found and encoded once) here, by content: "
                            "default $LIPSTREAM_CACHE/avatars, else ~/.cache/lipstream/avatars")
    serve.add_argument("--max-upload-mb", type=float, default=20.0,
                       help="largest avatar upload (default: 20)")
    serve.add_argument("--max-viewers", type=int, default=8,
                       help="WebRTC viewers (watch mode) per session (default: 8)")
    serve.add_argument("--idle-seconds", type=float, default=300.0,
                       help="close a program session nobody feeds or watches for this long (default: 300)")
    serve.add_argument("--ice-host", action="append", default=[], metavar="IP",
                       help="offer ICE host candidates on this address only (repeatable; default: every "
                            "non-loopback address; 127.0.0.1 for loopback-only)")
    serve.add_argument("--stun", action="append", default=[], metavar="URL",
                       help="STUN server, stun:HOST[:PORT] (repeatable; default: none)")
    serve.add_argument("--turn", action="append", default=[], metavar="URL",
                       help="TURN server, turn:HOST[:PORT][?transport=udp|tcp] or turns:... (repeatable)")
    serve.add_argument("--turn-user", help="TURN username")
    serve.add_argument("--turn-password", help="TURN password")
    serve.add_argument("--udp-ports", metavar="A-B",
                       help="bind the media sockets inside this UDP port range (default: any port)")
    mqtt_options(serve)
    access_options(serve)
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection has to send a whole request's headers (default: 10)")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="open HTTP connections, WebSockets included; past it 503 (default: 256)")
    serve.add_argument("--max-uploads", type=int, default=2,
                       help="avatar uploads checked at once; past it 503 (default: 2)")
    serve.add_argument("--max-avatar-mb", type=float, default=1024.0,
                       help="memory for uploaded avatars in all; the least recently used go (default: 1024)")
    serve.add_argument("--log-json", action="store_true", help="log one JSON object a line (to stderr)")
    return parser


def model_config(args: argparse.Namespace) -> dict:
    """--config with --vae and --deep-cache applied; raises ConfigError."""
    from stream.config import load_config, with_deep_cache, with_vae

    return with_deep_cache(with_vae(load_config(args.config), args.vae), getattr(args, "deep_cache", None))


def _torch_threads(args: argparse.Namespace, lipsync, live: bool) -> None:
    """Live work on a CPU runs one torch thread per call: a session's audio and model stages (and
    other sessions) already run at once, and two torch calls each splitting across all cores
    oversubscribe them (measured: the glass-to-glass bench's latency falls by a third, README)."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    elif live and lipsync.device.type == "cpu":
        torch.set_num_threads(1)


def _share_model(args: argparse.Namespace, lipsync) -> None:
    """--batch: a model worker for a server's sessions (stream/model_worker.py). On by default on a
    GPU, where one window at a time leaves most of the card idle; off on a CPU, where a batch costs
    what its windows cost one by one (README, 'Many sessions on one model')."""
    batch = args.batch if args.batch is not None else (8 if lipsync.device.type == "cuda" else 0)
    if batch < 0:
        raise UserError("--batch must be 0 (off) or more")
    if args.cuda_graphs and not (batch and lipsync.device.type == "cuda"):
        raise UserError("--cuda-graphs needs a CUDA device and the model worker (--batch N)")
    if batch:
        lipsync.share_model(max_batch=batch, cuda_graphs=args.cuda_graphs)


def _mqtt_settings(args: argparse.Namespace):
    """The MQTT bridge's settings from --mqtt and its options, or None; raises ValueError."""
    from transport.mqtt import MqttSettings

    password = args.mqtt_password or os.environ.get("LIPSTREAM_MQTT_PASSWORD")
    if args.mqtt:
        return MqttSettings.from_url(args.mqtt, username=args.mqtt_user, password=password,
                                     ca=args.mqtt_ca, prefix=args.mqtt_prefix)
    if args.mqtt_user or args.mqtt_password or args.mqtt_ca:
        raise UserError("--mqtt-user, --mqtt-password and --mqtt-ca need --mqtt URL")
    return None


def _access_settings(args: argparse.Namespace) -> dict:
    """The token (--token, else $LIPSTREAM_TOKEN) and allowed hosts, as ServeSettings fields."""
    from transport.access import TOKEN_ENV

    token = args.token or os.environ.get(TOKEN_ENV) or None
    return {"token": token, "allowed_hosts": tuple(args.allowed_host)}


def _serve(args: argparse.Namespace) -> None:
    from transport.process_memory import limit_malloc_arenas

    limit_malloc_arenas()  # first: the models' loading already makes threads (transport/process_memory.py)
    from models.weights import WeightsUnavailable
    from stream.avatar_prep import default_cache_dir
    from stream.config import ConfigError
    from stream.pipeline import LipSync
    from transport.server import BadInput, ServeSettings, serve
    from transport.webrtc import IceSettings, parse_port_range

    try:
        ice = IceSettings(hosts=tuple(args.ice_host), stun=tuple(args.stun), turn=tuple(args.turn),
                          turn_username=args.turn_user, turn_password=args.turn_password,
                          udp_ports=parse_port_range(args.udp_ports) if args.udp_ports else None)
        if args.max_sessions < 1:
            raise UserError("--max-sessions must be at least 1")
        avatar_cache = Path(args.avatar_cache).expanduser() if args.avatar_cache else default_cache_dir()
        mqtt = _mqtt_settings(args)
        if args.max_viewers < 1 or args.idle_seconds <= 0:
            raise UserError("--max-viewers must be at least 1 and --idle-seconds positive")
        settings = ServeSettings(args.host, args.port, args.max_sessions, args.max_upload_mb,
                                 args.avatar, ice, max_viewers=args.max_viewers, avatar_cache=str(avatar_cache),
                                 idle_seconds=args.idle_seconds, mqtt=mqtt, **_access_settings(args),
                                 header_timeout=args.header_timeout, max_connections=args.max_connections,
                                 max_uploads=args.max_uploads, max_avatar_mb=args.max_avatar_mb)
        lipsync = LipSync.from_config(model_config(args), args.device,
                                      args.precision, checkpoints=args.checkpoints)
        _torch_threads(args, lipsync, live=True)
        _share_model(args, lipsync)
    except (ValueError, ConfigError, WeightsUnavailable) as exc:
        raise UserError(str(exc).replace("\n", " ")) from None
    try:
        serve(lipsync, settings, log_json=args.log_json)
    except BadInput as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # the port is taken, the address is not ours...
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None


def _rtmp(args: argparse.Namespace) -> dict:
    import asyncio
    import logging
    import signal

    from stream.session_options import AudioFormat, OptionError, SessionOptions
    from transport.ingest import InputError, check_input
    from transport.publish import OutputError, OutputSettings, check_output

    try:  # what the user typed first, before the models take seconds to load
        if args.bitrate <= 0 or args.timeout <= 0 or args.retries < 0:
            raise UserError("--bitrate and --timeout must be positive, --retries at least 0")
        source, out = check_input(args.source, listen=args.listen), check_output(args.out)
        audio = args.audio if args.audio in (None, "api") else check_input(args.audio)
        if audio == "api" and args.serve is None:
            raise UserError("--audio api takes its PCM over the WebSocket of --serve: add --serve PORT")
        if args.mqtt and args.serve is None:
            raise UserError("--mqtt runs with the server of --serve: add --serve PORT")
    except (InputError, OutputError) as exc:
        raise UserError(str(exc)) from None

    from models.weights import WeightsUnavailable
    from stream.config import ConfigError
    from stream.pipeline import LipSync
    from stream.runner import run_async
    from transport.rtmp import RelayFailed, RelaySettings, serve_and_relay

    try:
        settings = RelaySettings(
            source, out, listen=args.listen, audio=audio,
            api_format=AudioFormat(args.api_rate, args.api_channels),
            options=SessionOptions(stride=args.stride, vad=not args.no_vad),
            output=OutputSettings(bitrate_kbps=args.bitrate, preset=args.preset, retries=args.retries),
            open_timeout=args.timeout, read_timeout=args.timeout, retries=args.retries, name=args.name)
        serve = None
        if args.serve is not None:
            from transport.server import ServeSettings
            from transport.webrtc import IceSettings

            serve = ServeSettings(args.serve_host, args.serve, max_sessions=1, ice=IceSettings(hosts=tuple(args.ice_host)),
                                  mqtt=_mqtt_settings(args), **_access_settings(args))
        lipsync = LipSync.from_config(model_config(args), args.device, args.precision,
                                      checkpoints=args.checkpoints)
        _torch_threads(args, lipsync, live=True)
    except (OptionError, ConfigError, WeightsUnavailable, ValueError) as exc:
        raise UserError(str(exc).replace("\n", " ")) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def on_ready(relay) -> None:  # Ctrl-C ends the stream cleanly: a file output gets its index
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, relay.stop)

    try:
        return run_async(serve_and_relay(lipsync, settings, serve, on_ready=on_ready))
    except RelayFailed as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # --serve's port is taken...
        raise UserError(f"cannot serve on {args.serve_host}:{args.serve}: {exc.strerror or exc}") from None


def _download(args: argparse.Namespace) -> None:
    from stream.config import ConfigError
    from models.weights import WeightsUnavailable, from_hub

    try:
        config = model_config(args)
        if config.get("weights", {}).get("source") != "hub":
            raise UserError(f"config {config['name']!r} uses seeded weights: nothing to download")
        files = from_hub(config, args.cache_dir)
    except (ConfigError, WeightsUnavailable) as exc:
        raise UserError(str(exc)) from None
    for name, path in vars(files).items():
        print(f"{name}: {path}")


def _run_file(args: argparse.Namespace, out: str, progress: bool) -> dict:
    from stream.config import ConfigError
    from transport.files import (FEATURE_RATE, OUTPUT_AUDIO_RATE, MediaError, Mp4Sink, fit_audio,
                                 output_frame_count, ping_pong, probe, read_audio, read_video)
    from models.weights import WeightsUnavailable

    try:
        config = model_config(args)
        video = probe(args.video)
        if not video.has_video:
            raise UserError(f"{args.video}: no video stream (to drive a still portrait, use an image avatar)")
        audio_path = args.audio or args.video
        if not args.audio and not video.has_audio:
            raise UserError(f"{args.video} has no audio track: pass the driving speech with --audio")
        speech_16k, speech_48k = read_audio(audio_path)
        fps = int(config["fps"])
        n_frames = output_frame_count(speech_16k, fps)
        speech_48k = fit_audio(speech_48k, n_frames / fps, OUTPUT_AUDIO_RATE)
        speech_16k = fit_audio(speech_16k, n_frames / fps, FEATURE_RATE)

        from stream.pipeline import LipSync
        from stream.runner import run_async
        from tqdm import tqdm

        try:
            lipsync = LipSync.from_config(config, args.device, args.precision, bypass=args.bypass,
                                          checkpoints=args.checkpoints)
            _torch_threads(args, lipsync, live=False)
        except ValueError as exc:  # weights that do not fit the config, an unknown precision...
            raise UserError(str(exc).replace("\n", " ")) from None
        bar = tqdm(total=n_frames, unit="frame", disable=not progress, file=sys.stderr)
        sink = Mp4Sink(out, video.width, video.height, fps, speech_48k, progress=bar)
        frames = ping_pong(read_video(args.video, fps), n_frames, fps)
        try:
            summary = run_async(lipsync.run_file(frames, speech_16k, n_frames, sink))
        finally:
            bar.close()
    except (ConfigError, MediaError, WeightsUnavailable) as exc:
        raise UserError(str(exc)) from None
    if summary.frames and summary.frames_without_face == summary.frames:
        print(f"warning: no face found in {args.video}; the output is the input re-timed to the audio",
              file=sys.stderr)
    return summary.as_dict()


def _bench_live(args: argparse.Namespace) -> dict:
    import numpy as np

    from stream.config import ConfigError
    from stream.live import LiveSession
    from stream.session_options import OptionError, SessionOptions
    from stream.mouth_mask import mouth_mask
    from stream.pipeline import LipSync
    from stream.runner import run_async
    from stream.seams import seam_ratio
    from transport.files import (OUTPUT_AUDIO_RATE, MediaError, fit_audio, output_frame_count, ping_pong,
                                 probe, read_audio, read_video)
    from transport.paced_file import play_live

    try:
        config = model_config(args)
        if args.steps:
            config["sampler"]["steps"] = args.steps
        if not probe(args.video).has_video:
            raise UserError(f"{args.video}: no video stream")
        speech_16k, speech_48k = read_audio(args.audio or args.video)
        options = SessionOptions(stride=args.stride, vad=not args.no_vad)
    except (ConfigError, MediaError, OptionError) as exc:
        raise UserError(str(exc)) from None
    fps = int(config["fps"])
    if args.seconds:
        speech_16k = speech_16k[: int(args.seconds * 16000)]
    n_frames = output_frame_count(speech_16k, fps)
    speech_48k = fit_audio(speech_48k, n_frames / fps, OUTPUT_AUDIO_RATE)
    lipsync = LipSync.from_config(config, args.device, args.precision, bypass=args.bypass,
                                  checkpoints=args.checkpoints)
    _torch_threads(args, lipsync, live=True)

    async def run() -> tuple[dict, LiveSession, np.ndarray]:
        session = LiveSession(lipsync, options=options, record=True)
        await session.start()
        audio_out = []
        frames = ping_pong(read_video(args.video, fps), n_frames, fps)
        feeder = asyncio.create_task(play_live(session, frames, speech_48k, OUTPUT_AUDIO_RATE, fps))
        while (out := await session.output()) is not None:
            audio_out.append((out.frame.pts, out.audio))
        await feeder
        stats = session.stats()
        await session.close()
        # Each frame's audio where its frame sits on the timeline (a frame skipped to ease the
        # playout delay back leaves silence, not a shift of everything after it).
        timeline = np.zeros(round(n_frames / fps * OUTPUT_AUDIO_RATE) + OUTPUT_AUDIO_RATE, np.float32)
        for pts, audio in audio_out:
            start = round(pts * OUTPUT_AUDIO_RATE)
            timeline[start : start + audio.shape[1]] = audio[0][: len(timeline) - start]
        return stats, session, timeline

    import asyncio

    stats, session, audio_out = run_async(run())
    generation = session.generation
    region = mouth_mask(config["resolution"]) < 0.5
    seams = seam_ratio(generation.recorded, generation.boundaries, region)
    # The output audio against the input, by cross-correlation: how far the audio that left with
    # the frames is from where it was in the source.
    reference = speech_48k[0, : len(audio_out)]
    lag = _best_lag(reference, audio_out[: len(reference)], max_lag=OUTPUT_AUDIO_RATE // 5)
    return {**stats, "frames": stats["frames_out"], "stride": args.stride,
            "steps": config["sampler"]["steps"], "frames_in": n_frames,
            "seam_ratio": round(seams, 3) if seams else None,
            "av_offset_ms": round(1000 * lag / OUTPUT_AUDIO_RATE, 2),
            "frames_without_face": session.faces.frames_without_face,
            "seconds": round(n_frames / fps, 2)}


def _bench_sessions(args: argparse.Namespace) -> dict:
    from bench.sessions import measure
    from stream.config import ConfigError
    from stream.pipeline import LipSync

    try:
        counts = [int(n) for n in args.sessions.split(",")]
        if not counts or min(counts) < 1 or args.max_batch < 1:
            raise ValueError
        config = model_config(args)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except ValueError:
        raise UserError(f"--sessions takes counts like 1,2,4 and --max-batch a count; got {args.sessions!r}, "
                        f"{args.max_batch}") from None
    if args.steps:
        config["sampler"]["steps"] = args.steps
    lipsync = LipSync.from_config(config, args.device, args.precision, checkpoints=args.checkpoints)
    _torch_threads(args, lipsync, live=True)
    return measure(lipsync, counts, args.seconds or 20.0, args.max_batch, args.stride)


def _bench_webrtc(args: argparse.Namespace) -> dict:
    """bench --webrtc: the glass-to-glass probe, bench/glass_to_glass.py (importable from a checkout)."""
    from bench.glass_to_glass import ProbeError, Settings, measure, parse_size

    forwarded = [f"--{name}={value}" for name, value, default in (
        ("device", args.device, "auto"), ("precision", args.precision, "auto"), ("vae", args.vae, "kl"),
        ("checkpoints", args.checkpoints, None), ("threads", args.threads, None)) if value != default]
    # Session options only where they differ from the session's defaults (stride 4, VAD on).
    options = {**({"stride": args.stride} if args.stride != 4 else {}), **({"vad": False} if args.no_vad else {})}
    try:
        return measure(Settings(args.video, args.audio, args.config, args.seconds or 60.0,
                                parse_size(args.size), args.url, options, tuple(forwarded)))
    except ProbeError as exc:
        raise UserError(str(exc)) from None


def _best_lag(reference, signal, max_lag: int) -> int:
    """The shift (samples) of ``signal`` against ``reference`` that correlates best."""
    import numpy as np

    n = min(len(reference), len(signal))
    spectrum = np.fft.rfft(reference[:n], 2 * n) * np.conj(np.fft.rfft(signal[:n], 2 * n))
    correlation = np.fft.irfft(spectrum)
    lags = np.concatenate([np.arange(0, max_lag + 1), np.arange(-max_lag, 0)])
    values = np.concatenate([correlation[: max_lag + 1], correlation[-max_lag:]])
    return int(-lags[int(np.argmax(values))])


def _print_table(result: dict) -> None:
    print(f"config {result['config']} on {result['device']}: {result['frames']} frames "
          f"({result['frames_without_face']} without a face) in {result['seconds']:.1f} s "
          f"= {result['fps']:.2f} fps")
    print(f"  {'stage':<10}{'ms/frame':>10}")
    for stage, ms in result["stages_ms_per_frame"].items():
        print(f"  {stage:<10}{ms:>10.1f}")


def _print_live_table(result: dict) -> None:
    latency = result["latency_ms"]
    print(f"live {result['config']} on {result['device']}, stride {result['stride']}, "
          f"{result['steps']} steps: {result['frames']}/{result['frames_in']} frames at {result['fps']:.2f} fps")
    print(f"  added latency ms  p50 {latency['p50']:.0f}  p95 {latency['p95']:.0f}  max {latency['max']:.0f}"
          f"   first frame {result['ttff_ms']:.0f} ms   A/V offset {result['av_offset_ms']:.1f} ms")
    for kind, key in (("generated", "latency_generated_ms"), ("passed through", "latency_passed_ms")):
        part = result[key]
        print(f"    {kind:<15}p50 {part['p50']:.0f}  p95 {part['p95']:.0f}  max {part['max']:.0f}")
    print(f"  frames: {result['frames_traced']} of {result['frames']} in the latency record, "
          f"{result['frames_generated']} generated")
    print(f"  dropped {result['dropped_frames']} (late {result['late_frames']}, ticks {result['dropped_ticks']})"
          f"   silent {result['silent_frames']}   clock slips {result['clock_slips']}"
          f"   seam ratio {result['seam_ratio']}")
    print(f"  {'stage':<10}{'ms/frame':>10}{'done at ms (p50)':>18}")
    for stage, ms in result["stages_ms_per_frame"].items():
        done = result["stage_done_ms_p50"].get(stage, "")
        print(f"  {stage:<10}{ms:>10.1f}{done:>18}")


def main(argv: list[str] | None = None) -> int:
    parser = _arguments()
    args = parser.parse_args(argv)
    if args.command == "bench" and not (args.webrtc or args.rtmp or args.sessions) and not args.video:
        parser.error("the following arguments are required: --video")
    try:
        if args.command == "file":
            result = _run_file(args, args.out, progress=not args.quiet)
            print(f"wrote {args.out}")
            _print_table(result)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "download":
            _download(args)
        elif args.command == "rtmp":
            result = _rtmp(args)
            from transport.rtmp import format_summary

            print(format_summary(result))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        elif args.command == "bench" and args.rtmp:
            from bench.rtmp import BenchError, measure_cli, print_table

            try:
                result = measure_cli(args)
            except BenchError as exc:
                raise UserError(str(exc)) from None
            print_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        elif args.command == "bench" and args.webrtc:
            from bench.glass_to_glass import print_table

            result = _bench_webrtc(args)
            print_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        elif args.command == "bench" and args.sessions:
            from bench.sessions import print_table

            result = _bench_sessions(args)
            print_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        elif args.command == "bench" and args.live:
            result = _bench_live(args)
            _print_live_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        elif args.command == "bench":
            with tempfile.TemporaryDirectory() as scratch:
                result = _run_file(args, str(Path(scratch) / "bench.mp4"), progress=False)
            _print_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""lipstream command line: re-lip-sync a file, or benchmark the pipeline.

    python run_stream.py file  --video V --audio A --out out.mp4 --config tiny
    python run_stream.py bench --video V --audio A --config tiny --json bench.json
"""

from __future__ import annotations

import argparse
import json
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

    def job_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--video", required=True,
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
        command.add_argument("--checkpoints", metavar="DIR",
                             help="official weights in LatentSync's layout: DIR/latentsync_unet.pt, "
                                  "DIR/whisper/tiny.pt, DIR/vae/ (default: the hub cache, see `download`)")
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
    job_options(bench)
    bench.add_argument("--json", help="write the figures to this JSON file")

    download = commands.add_parser(
        "download", help="fetch a config's official weights into the hub cache",
        description="Fetch the U-Net, Whisper tiny and the SD VAE that CONFIG names, through "
                    "huggingface_hub (progress bars; interrupted downloads resume). Where the hub cannot "
                    "be reached it says at once which files are missing and where to put them.")
    download.add_argument("config", help="a config name (latentsync-1.5, latentsync-1.6) or YAML path")
    download.add_argument("--cache-dir", help="hub cache folder (default: huggingface_hub's, HF_HOME)")
    return parser


def _download(args: argparse.Namespace) -> None:
    from stream.config import ConfigError, load_config
    from models.weights import WeightsUnavailable, from_hub

    try:
        config = load_config(args.config)
        if config.get("weights", {}).get("source") != "hub":
            raise UserError(f"config {config['name']!r} uses seeded weights: nothing to download")
        files = from_hub(config, args.cache_dir)
    except (ConfigError, WeightsUnavailable) as exc:
        raise UserError(str(exc)) from None
    for name, path in vars(files).items():
        print(f"{name}: {path}")


def _run_file(args: argparse.Namespace, out: str, progress: bool) -> dict:
    from stream.config import ConfigError, load_config
    from transport.files import (FEATURE_RATE, OUTPUT_AUDIO_RATE, MediaError, Mp4Sink, fit_audio,
                                 output_frame_count, ping_pong, probe, read_audio, read_video)
    from models.weights import WeightsUnavailable

    try:
        config = load_config(args.config)
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


def _print_table(result: dict) -> None:
    print(f"config {result['config']} on {result['device']}: {result['frames']} frames "
          f"({result['frames_without_face']} without a face) in {result['seconds']:.1f} s "
          f"= {result['fps']:.2f} fps")
    print(f"  {'stage':<10}{'ms/frame':>10}")
    for stage, ms in result["stages_ms_per_frame"].items():
        print(f"  {stage:<10}{ms:>10.1f}")


def main(argv: list[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    try:
        if args.command == "file":
            result = _run_file(args, args.out, progress=not args.quiet)
            print(f"wrote {args.out}")
            _print_table(result)
        elif args.command == "download":
            _download(args)
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

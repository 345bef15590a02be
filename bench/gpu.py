"""GPU bench: what each GPU path buys, what every part costs, and how many 25-fps streams one card
sustains at p95 <= 400 ms.

    bench/gpu.sh                                   # on a machine with a GPU: all of it, one command
    python -m bench.gpu [--out bench/results] [--compile] [--seconds 4]
    python -m bench.gpu --configs tiny --quick     # the same code on a CPU, small, to check it runs

Real-size models (LatentSync 1.5 at 256 px and 1.6 at 512 px share one U-Net) with random weights:
speed does not depend on the values. Sections, each written to bench/results/DEVICE.json as soon as
it is measured (a run cut short keeps what it had):

1. ``paths``: one U-Net call at a batch of 4 windows with guidance (8 videos of 16 frames), each path
   against the state before it: fp32 -> bf16 (fp16 where bf16 is missing) -> plain attention
   replaced by SDPA -> channels_last. The VAE: SD's vs TAESD, encode and decode.
2. ``costs``: ms per U-Net call by batch, eager and from CUDA graphs, and ms per frame of VAE
   encode / decode, per resolution.
3. ``predicted``: streams per card for every combination of steps 1/2/4, guidance on/off, stride
   4/8/16 and VAE, from the costs: the GPU seconds one stream needs per second at the best batch,
   and the latency floor (a window waits for stride frames, then runs); a combination whose
   floor exceeds the 400 ms budget sustains none.
4. ``streams``: the real model worker (stream/model_worker.py) fed by N simulated 25-fps streams,
   each a thread that submits its window's encode, denoise and decode as the window's last frame
   is captured, N rising until p95 latency (capture to decoded, every frame) passes 400 ms or the
   card falls behind; max_batch 1 (unbatched) against 8, eager against CUDA graphs, with and
   without DeepCache (``--streams``). It leaves out face tracking, audio
   features and compositing, which run on the CPU's cores beside the card.
5. ``deep_cache``: one 4-step denoise of 1 and of 4 windows, the whole U-Net every step against
   DeepCache reuse of the deep features between every 2nd, 3rd, 4th step
   (``sampler.deep_cache_interval``), each eager and replayed from CUDA graphs
   (``models/cuda_graphs.py``), with how far the graphs' result is from the eager one.
6. ``compiled`` (``--compile``, last because compiling takes minutes): the eager U-Net against
   torch.compile, then "reduce-overhead" (CUDA graphs), for one fixed batch shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

from models.cuda_graphs import GraphedUNet
from models.lipsync import LipSyncModel
from models.sampler import DDIMSampler
from models.unet import UNet3DConditionModel
from models.vae import FaceVAE
from stream.config import load_config
from stream.model_worker import ModelWorker
from stream.mouth_mask import mouth_mask

FPS = 25
WINDOW = 16
BUDGET = 0.4  # s: p95 latency, capture to decoded, a stream is allowed
SD_VAE = {"kind": "kl", "scaling_factor": 0.18215, "config": {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}}
TAESD = {"kind": "tiny", "scaling_factor": 1.0}
RESULTS = Path(__file__).resolve().parent / "results"
# The target (4 steps) without guidance, as upstream's own default: eager unbatched, eager
# batched, then each GPU path on top; then with guidance; stride 4 last.
STREAM_RUNS = ",".join(["4:1:8:taesd:1", "4:1:8:taesd:8", "4:1:8:taesd:8:1:graphs", "4:1:8:taesd:8:3:graphs",
                        "4:1.5:8:taesd:8:3:graphs", "4:1:4:taesd:8:3:graphs"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs, after ``warmup``."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def build(config: dict, vae: dict, device: torch.device, dtype: torch.dtype,
          unet: torch.nn.Module | None = None, steps: int = 4, guidance: float = 1.5) -> LipSyncModel:
    """The config's model on ``device`` with random weights (made there: no CPU init of 1 B parameters)."""
    with torch.device(device):
        unet = unet if unet is not None else UNet3DConditionModel.from_config(config["unet"])
        autoencoder = FaceVAE.from_config(vae)
    sampler = DDIMSampler({**config["sampler"], "steps": steps, "guidance_scale": guidance})
    mask = torch.from_numpy(mouth_mask(config["resolution"]))
    return LipSyncModel(unet, autoencoder, sampler, mask, seed=int(config.get("seed", 0))).to(device, dtype).eval()


def inputs(model: LipSyncModel, windows: int, device: torch.device, carried: int = WINDOW - 4):
    latent = model.resolution // 8
    dtype = model.dtype
    conditions = torch.randn((windows, WINDOW, 9, latent, latent), device=device, dtype=dtype)
    audio = torch.randn((windows, WINDOW, 50, 384), device=device, dtype=dtype)
    known = torch.randn((windows, WINDOW, 4, latent, latent), device=device, dtype=dtype)
    return conditions, audio, known, [carried] * windows


def unet_inputs(model: LipSyncModel, videos: int, device: torch.device):
    """(sample, timestep, audio) for one U-Net call on ``videos`` 16-frame videos (guidance doubles
    the videos of a denoise step)."""
    latent = model.resolution // 8
    sample = torch.randn((videos, 13, WINDOW, latent, latent), device=device, dtype=model.dtype)
    audio = torch.randn((videos, WINDOW, 50, 384), device=device, dtype=model.dtype)
    return sample, torch.tensor(999), audio  # the timestep on the CPU, as the sampler passes it


def unet_call(model: LipSyncModel, videos: int, device: torch.device):
    sample, t, audio = unet_inputs(model, videos, device)
    return lambda: model.unet(sample, t, audio)


def set_attention(module: torch.nn.Module, sdpa: bool) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.set_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


class Report:
    """The JSON written after every section, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = dict(header)

    def add(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))
        print(json.dumps({key: value}), flush=True)


def measure_paths(config: dict, device: torch.device, half: torch.dtype, repeats: int) -> dict:
    steps = []
    model = build(config, SD_VAE, device, torch.float32)
    set_attention(model.unet, sdpa=False)
    call = unet_call(model, 8, device)
    steps.append(("fp32, plain attention", timed(call, device, repeats)))
    model = model.to(half)
    call = unet_call(model, 8, device)
    steps.append((f"{str(half).removeprefix('torch.')}, plain attention", timed(call, device, repeats)))
    set_attention(model.unet, sdpa=True)
    steps.append(("+ SDPA", timed(call, device, repeats)))
    model.unet.to(memory_format=torch.channels_last)
    steps.append(("+ channels_last weights", timed(call, device, repeats)))
    result = {"batch_videos": 8, "unet_ms": [{"path": name, "ms": round(1000 * s, 2)} for name, s in steps]}
    vae = {}
    for name, vae_config in (("sd", SD_VAE), ("taesd", TAESD)):
        coder = build(config, vae_config, device, half, unet=model.unet)
        faces = torch.rand((16, 3, coder.resolution, coder.resolution), device=device, dtype=half) * 2 - 1
        latents = torch.randn((16, 4, coder.resolution // 8, coder.resolution // 8), device=device, dtype=half)
        vae[name] = {"encode_ms_per_frame": round(1000 * timed(lambda: coder.encode_condition(faces), device,
                                                                repeats) / 16, 3),
                     "decode_ms_per_frame": round(1000 * timed(lambda: coder.decode(latents, faces), device,
                                                                repeats) / 16, 3)}
    result["vae_16_frames"] = vae
    return result


def measure_compiled(config: dict, device: torch.device, dtype: torch.dtype, unet, repeats: int,
                     videos: int = 8) -> list[dict]:
    """The eager U-Net (a batch of ``videos``) against torch.compile, then with CUDA graphs
    ("reduce-overhead"), each compiled for that one shape; the compile time is reported too."""
    model = build(config, TAESD, device, dtype, unet=unet)
    call = unet_call(model, videos, device)
    rows = [{"path": "eager", "ms": round(1000 * timed(call, device, repeats), 2)}]
    for mode in ("default", "reduce-overhead"):
        model.unet = torch.compile(unet, mode=mode, dynamic=False)
        call = unet_call(model, videos, device)
        started = time.perf_counter()
        call()
        synchronize(device)
        rows.append({"path": f"torch.compile {mode}", "compile_s": round(time.perf_counter() - started, 1),
                     "ms": round(1000 * timed(call, device, repeats), 2)})
    return rows


def measure_deep_cache(config: dict, device: torch.device, dtype: torch.dtype, unet, repeats: int) -> list[dict]:
    """One 4-step denoise (no guidance) of 1 and of 4 windows: the whole U-Net every step against
    DeepCache reuse between every 2nd, 3rd and 4th step, eager and (on a GPU) from CUDA graphs; how
    far each result is from the whole eager U-Net's (random weights: a bound on the arithmetic, not
    a judgement of quality), and how far the graphs' result is from the same path run eagerly."""
    model = build(config, TAESD, device, dtype, unet=unet, steps=4, guidance=1.0)
    graphed = GraphedUNet(unet) if device.type == "cuda" else None
    rows = []
    for windows in (1, 4):
        conditions, audio, known, carried = inputs(model, windows, device)
        reference = None
        for interval in (1, 2, 3, 4):
            model.deep_cache_interval = interval
            eager = model.denoise_windows(conditions, audio, known, carried).float()[:, WINDOW - 4:]
            reference = eager if reference is None else reference
            row = {"windows": windows, "interval": interval,
                   "eager_ms": round(1000 * timed(lambda: model.denoise_windows(conditions, audio, known, carried),
                                                  device, repeats), 2),
                   "mean_abs_change": round(float((eager - reference).abs().mean()), 4),
                   "mean_abs": round(float(reference.abs().mean()), 4)}
            if graphed is not None:
                run = lambda: model.denoise_windows(conditions, audio, known, carried, unet=graphed)  # noqa: E731
                row["graphs_ms"] = round(1000 * timed(run, device, repeats), 2)
                row["graphs_vs_eager_max_abs"] = round(float((run().float()[:, WINDOW - 4:] - eager).abs().max()), 4)
            rows.append(row)
    model.deep_cache_interval = 1
    return rows


def measure_costs(configs: dict, device: torch.device, dtype: torch.dtype, unet, batches: list[int],
                  repeats: int) -> dict:
    costs = {}
    for name, config in configs.items():
        model = build(config, SD_VAE, device, dtype, unet=unet)
        entry = {"resolution": config["resolution"], "unet_ms_by_videos": {}}
        for videos in batches:
            if config["resolution"] >= 512 and videos > 16:
                continue  # 32 videos of 64x64 latents: minutes on a 2-core CPU, and enough is known
            entry["unet_ms_by_videos"][str(videos)] = round(1000 * timed(unet_call(model, videos, device), device,
                                                                         repeats), 2)
        if device.type == "cuda":  # the same calls replayed from CUDA graphs, up to the worker's batches
            graphed, entry["unet_graphs_ms_by_videos"] = GraphedUNet(unet), {}
            for videos in (v for v in batches if v <= 16):
                sample, t, audio = unet_inputs(model, videos, device)
                entry["unet_graphs_ms_by_videos"][str(videos)] = round(
                    1000 * timed(lambda: graphed(sample, t, audio), device, repeats), 2)
        for vae_name, vae_config in (("sd", SD_VAE), ("taesd", TAESD)):
            coder = build(config, vae_config, device, dtype, unet=unet)
            frames = 32 if config["resolution"] <= 256 else 16
            faces = torch.rand((frames, 3, coder.resolution, coder.resolution), device=device, dtype=dtype) * 2 - 1
            latents = torch.randn((frames, 4, coder.resolution // 8, coder.resolution // 8), device=device,
                                  dtype=dtype)
            entry[vae_name] = {
                "encode_ms_per_frame": round(1000 * timed(lambda: coder.encode_condition(faces), device,
                                                          repeats) / frames, 3),
                "decode_ms_per_frame": round(1000 * timed(lambda: coder.decode(latents, faces), device,
                                                          repeats) / frames, 3)}
        costs[name] = entry
    return costs


def predict(costs: dict, max_batch: int = 8) -> list[dict]:
    """Streams per card for each combination, from the measured costs (see the module docstring)."""
    rows = []
    for name, entry in costs.items():
        paths = {"eager": entry["unet_ms_by_videos"], "graphs": entry.get("unet_graphs_ms_by_videos")}
        for path, steps, guidance, stride, vae in itertools.product(paths, (1, 2, 4), (True, False), (4, 8, 16),
                                                                  ("sd", "taesd")):
            if not paths[path]:
                continue
            unet_ms = {int(v): ms for v, ms in paths[path].items()}
            per_video = 2 if guidance else 1
            best = None
            for windows in (1, 2, 4, 8, 16):
                if windows > max_batch or windows * per_video not in unet_ms:
                    continue
                call_s = unet_ms[windows * per_video] / 1000
                # GPU seconds per stream-second: its windows' share of batched calls, then its frames' VAE work.
                gpu_s = (FPS / stride) * steps * call_s / windows + FPS / 1000 * (
                    entry[vae]["encode_ms_per_frame"] + entry[vae]["decode_ms_per_frame"])
                # The last window of a batch waits for the others' steps too: floor = the window filling + the batch.
                floor = (stride - 1) / FPS + steps * call_s + stride / 1000 * (
                    entry[vae]["encode_ms_per_frame"] + entry[vae]["decode_ms_per_frame"]) * windows
                streams = int(1 / gpu_s) if floor <= BUDGET else 0
                if best is None or streams > best["streams"]:
                    best = {"windows_per_call": windows, "streams": streams, "latency_floor_ms": round(1000 * floor)}
            rows.append({"config": name, "unet": path, "steps": steps, "guidance": guidance, "stride": stride,
                         "vae": vae, **best})
    return rows


def _stream(worker: ModelWorker, model: LipSyncModel, stride: int, phase: float, stop: float,
            latencies: list, missed: list, device: torch.device) -> None:
    """One simulated stream: a window's work is submitted when its last new frame is captured."""
    client = worker.client()
    resolution, latent = model.resolution, model.resolution // 8
    dtype = model.dtype
    faces = torch.rand((stride, 3, resolution, resolution), device=device, dtype=dtype) * 2 - 1
    condition = torch.randn((WINDOW, 9, latent, latent), device=device, dtype=dtype)
    audio = torch.randn((WINDOW, 50, 384), device=device, dtype=dtype)
    known = torch.randn((WINDOW - stride, 4, latent, latent), device=device, dtype=dtype)
    start = time.monotonic() + phase
    window = 0
    while True:
        captures = [start + (window * stride + i) / FPS for i in range(stride)]
        ready = captures[-1]
        if ready > stop:
            return
        if time.monotonic() > stop + BUDGET:  # so far behind that the rest is moot: count it as missed
            while start + ((window + 1) * stride - 1) / FPS <= stop:
                missed.append(stride)
                window += 1
            return
        time.sleep(max(0.0, ready - time.monotonic()))
        client.deadline = captures[0] + BUDGET
        client.encode_condition(faces)
        clean = client.denoise(condition, audio, known)
        client.decode(clean[-stride:], faces)
        done = time.monotonic()
        latencies.extend(done - c for c in captures)
        window += 1


def run_streams(model: LipSyncModel, device: torch.device, streams: int, stride: int, max_batch: int,
                seconds: float, unet: GraphedUNet | None = None) -> dict:
    worker = ModelWorker(model, max_batch=max_batch, unet=unet)
    latencies: list[float] = []
    missed: list[int] = []
    warmup = 1.0
    stop = time.monotonic() + warmup + seconds
    rng = random.Random(streams * 131 + stride)
    threads = [threading.Thread(target=_stream, args=(worker, model, stride, rng.uniform(0, stride / FPS), stop,
                                                      latencies, missed, device), daemon=True)
               for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    worker.close()
    # Every frame of every window that finished; a card that falls behind finishes fewer (a thread
    # gives up once the stream is over by more than the budget), and those count as missed.
    frames = len(latencies)
    ms = 1000 * np.asarray(latencies[frames // 5 :] or [float("inf")])  # the first fifth is warm-up
    return {"streams": streams, "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "frames": frames, "frames_missed": sum(missed),
            "batch_sizes": worker.stats()["denoise_batch_sizes"]}


def capacity(model: LipSyncModel, device: torch.device, stride: int, max_batch: int, seconds: float,
             counts: list[int], unet: GraphedUNet | None = None) -> dict:
    """Rising N until p95 passes the budget or the card falls behind: the largest N that held."""
    runs, held = [], 0
    if unet is not None:  # every batch shape the worker can form, captured before the clock runs
        started = time.perf_counter()
        for windows in range(1, max_batch + 1):
            model.denoise_windows(*inputs(model, windows, device, carried=WINDOW - stride), unet=unet)
        synchronize(device)
        captured = {"graphs": unet.captured, "capture_s": round(time.perf_counter() - started, 1)}
    # Untimed first: a model's first calls at new shapes pay for kernel selection, and a stream that
    # starts behind stays behind (measured on an H200: p95 512 ms cold against 344 ms warm).
    run_streams(model, device, min(2, max(counts)), stride, max_batch, 1.0, unet)
    for n in counts:
        run = run_streams(model, device, n, stride, max_batch, seconds, unet)
        runs.append(run)
        if run["p95_ms"] > 1000 * BUDGET or run["frames_missed"]:
            break
        held = n
    return {"stride": stride, "max_batch": max_batch, "streams_at_p95_budget": held, "runs": runs,
            **({"captured": captured} if unet is not None else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="latentsync-1.5,latentsync-1.6")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS), help="folder for DEVICE.json")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes to compile)")
    parser.add_argument("--compile-videos", type=int, default=8, help="the batch (videos) compiled for")
    parser.add_argument("--seconds", type=float, default=4.0, help="each stream run's measured seconds")
    parser.add_argument("--quick", action="store_true", help="few repeats and small batches: a check that it runs")
    parser.add_argument("--streams", default=STREAM_RUNS,
                        help="stream runs, each STEPS:GUIDANCE:STRIDE:VAE:MAX_BATCH[:DEEP_CACHE_INTERVAL[:graphs]] "
                             "(VAE sd or taesd; graphs: the worker replays the U-Net from CUDA graphs)")
    parser.add_argument("--skip", default="", help="sections to leave out, e.g. paths,costs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    half = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    dtype = half if device.type == "cuda" else torch.float32
    configs = {name: load_config(name) for name in args.configs.split(",")}
    first = next(iter(configs.values()))
    repeats = 2 if args.quick else 10
    batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32]
    skip = set(filter(None, args.skip.split(",")))
    name = device_name(device)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    report = Report(Path(args.out) / f"{safe}.json",
                    {"device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
                     "configs": list(configs), "weights": "random (speed does not depend on them)"})
    if "paths" not in skip:
        report.add("paths", measure_paths(first, device, half, repeats))
    with torch.device(device):
        unet = UNet3DConditionModel.from_config(first["unet"]).to(dtype).eval()
    set_attention(unet, sdpa=True)
    if "deep_cache" not in skip:
        report.add("deep_cache", measure_deep_cache(first, device, dtype, unet, repeats))
    if "costs" not in skip:
        report.add("costs", measure_costs(configs, device, dtype, unet, batches, repeats))
        report.add("predicted", predict(report.data["costs"]))
    if "streams" not in skip:
        counts = [1, 2] if args.quick else [1, 2, 4, 6, 8, 10, 12, 16, 20, 24]
        streams = []
        for combo in args.streams.split(","):
            fields = combo.split(":")
            steps, guidance, stride, vae_name, max_batch = fields[:5]
            steps, guidance, stride, max_batch = int(steps), float(guidance), int(stride), int(max_batch)
            interval = int(fields[5]) if len(fields) > 5 else 1
            graphs = len(fields) > 6 and fields[6] == "graphs"
            vae = {"sd": SD_VAE, "taesd": TAESD}[vae_name]
            model = build(first, vae, device, dtype, unet=unet, steps=steps, guidance=guidance)
            model.deep_cache_interval = interval
            combo_row = {"config": first["name"], "steps": steps, "guidance": guidance, "vae": vae["kind"],
                         "deep_cache_interval": interval, "unet": "graphs" if graphs else "eager"}
            try:
                combo_row.update(capacity(model, device, stride, max_batch, args.seconds, counts,
                                          GraphedUNet(unet) if graphs else None))
            except Exception as exc:  # one path failing on this card leaves the other runs standing
                combo_row.update(stride=stride, max_batch=max_batch, error=repr(exc))
            streams.append(combo_row)
            report.add("streams", streams)
    if args.compile:
        report.add("compiled", {"videos": args.compile_videos,
                                "unet_ms": measure_compiled(first, device, dtype, unet, repeats, args.compile_videos)})
    print(f"wrote {report.path}")
    return 0


if __name__ == "__main__":
    with torch.inference_mode():  # no autograd state: the model's own methods say so, a bare U-Net call does not
        raise SystemExit(main())

"""The U-Net replayed from CUDA graphs.

One denoising step of one 16-frame window at 256 px launches thousands of small kernels; on an H100
the eager U-Net took 51.0 ms for one window where the same kernels replayed from a graph took 29.9 ms
(bench/results): a lone window is bound by launching, not by the card. From a few windows on the
card is the limit and graphs change nothing. ``GraphedUNet`` captures the
U-Net's forward once per input shape (and DeepCache role) and afterwards only copies the inputs into
the graph's own buffers and replays it.

A capture costs a few warm-up calls and under a second; it happens on a shape's first call, so a
server's first windows of each batch size are late once. Graphs share one memory pool: they replay
one after another on one stream, so one graph's scratch memory is free whenever another runs.

Only one thread may call a ``GraphedUNet`` at a time (the model worker's): a replay writes into
buffers that every caller of that shape shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.unet import DeepCache

WARMUP_CALLS = 2  # before a capture, on a side stream: lets cuBLAS/cuDNN choose kernels and workspaces


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor  # the static inputs a replay reads ...
    timestep: torch.Tensor
    audio: torch.Tensor
    output: torch.Tensor  # ... and the static output it writes
    features: torch.Tensor | None = None  # a "keep" graph's deep features, read by its "reuse" graph


class GraphedUNet:
    """Called like the U-Net: ``(sample, timestep, audio, deep_cache=None) -> noise``, same result
    within float tolerance (the kernels are the same; only how they are launched differs)."""

    def __init__(self, unet: nn.Module):
        if unet.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the U-Net on a CUDA device, not {unet.device}")
        self.unet = unet
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor,
                 deep_cache: DeepCache | None = None) -> torch.Tensor:
        shape = (tuple(sample.shape), tuple(audio.shape), sample.dtype)
        if deep_cache is None:
            graph = self._graph(shape, "whole")
        elif deep_cache.reuse and deep_cache.features is not None:
            graph = self._graph(shape, "reuse")
            if deep_cache.features is not graph.features:  # kept by an eager call: bring it in
                graph.features.copy_(deep_cache.features)
        else:
            graph = self._graph(shape, "keep")
        graph.sample.copy_(sample)
        graph.timestep.fill_(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        graph.audio.copy_(audio)
        graph.graph.replay()
        if deep_cache is not None and graph.features is not None:
            deep_cache.features = graph.features  # the next "reuse" replay reads it in place
        return graph.output.clone()  # the next replay overwrites the static output

    def _graph(self, shape: tuple, role: str) -> _Graph:
        graph = self._graphs.get((shape, role))
        if graph is None:
            graph = self._graphs[(shape, role)] = self._capture(shape, role)
        return graph

    def _capture(self, shape: tuple, role: str) -> _Graph:
        # Normal tensors, not inference tensors, whatever mode the capturing thread is in: a replay
        # writes into them in place, perhaps from a thread outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            return self._capture_graph(shape, role)

    def _capture_graph(self, shape: tuple, role: str) -> _Graph:
        sample_shape, audio_shape, dtype = shape
        device = self.unet.device
        # Inputs with real values (a capture runs the model): noise-like, never all zeros.
        generator = torch.Generator(device).manual_seed(0)
        sample = torch.randn(sample_shape, device=device, dtype=dtype, generator=generator)
        audio = torch.randn(audio_shape, device=device, dtype=dtype, generator=generator)
        timestep = torch.tensor(500, device=device)
        kept = self._graph(shape, "keep").features if role == "reuse" else None

        def cache() -> DeepCache | None:
            if role == "whole":
                return None
            deep_cache = DeepCache()
            deep_cache.features, deep_cache.reuse = kept, role == "reuse"
            return deep_cache

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.unet(sample, timestep, audio, deep_cache=cache())
        torch.cuda.current_stream(device).wait_stream(side)

        graph, deep_cache = torch.cuda.CUDAGraph(), cache()
        # thread_local: sessions' threads may use the card (audio features) while this one captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self.unet(sample, timestep, audio, deep_cache=deep_cache)
        features = deep_cache.features if role == "keep" else kept
        return _Graph(graph, sample, timestep, audio, output, features)

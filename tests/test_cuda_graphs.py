"""The U-Net replayed from CUDA graphs (models/cuda_graphs.py) gives what the eager U-Net gives:
whole, and as DeepCache's keep and reuse steps; at several batch shapes in one instance; captured
on one thread and replayed on the model worker's. Needs a CUDA device: skipped without one (the
graphs are a GPU path; bench/gpu.sh runs this file first on a GPU machine)."""

from __future__ import annotations

import threading

import pytest
import torch

from models.cuda_graphs import GraphedUNet
from models.factory import build_models
from models.sampler import DDIMSampler
from stream.config import load_config
from stream.model_worker import ModelWorker
from stream.mouth_mask import mouth_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

# The same kernels, launched from a graph instead of one by one, in true fp32 (TF32 off: its
# 10-bit products let two batch shapes' convolution algorithms differ by 2e-2 through the U-Net).
# Outputs are of order 1.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def true_fp32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def model():
    config = load_config("tiny")  # built as the pipeline builds it, without its CPU stages
    mask = torch.from_numpy(mouth_mask(config["resolution"]))
    return build_models(config, mask, torch.device("cuda"), torch.float32).generator


def windows(model, count: int, carried: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    latent = model.resolution // 8
    conditions = torch.randn((count, 16, 9, latent, latent), generator=generator).cuda()
    audio = torch.randn((count, 16, 50, 384), generator=generator).cuda()
    known = torch.randn((count, 16, 4, latent, latent), generator=generator).cuda()
    return conditions, audio, known, carried


def test_graphed_calls_equal_eager_calls_at_several_shapes(model):
    graphed = GraphedUNet(model.unet)
    latent = model.resolution // 8
    for batch, seed in ((1, 1), (3, 2), (1, 3)):  # the last replays the first shape's graph on new inputs
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn((batch, 13, 16, latent, latent), generator=generator).cuda()
        audio = torch.randn((batch, 16, 50, 384), generator=generator).cuda()
        for t in (torch.tensor(999), torch.tensor(1), 500):
            eager = model.unet(sample, t, audio)
            torch.testing.assert_close(graphed(sample, t, audio), eager, **TOLERANCE)
            assert eager.abs().mean() > 0.1
    assert graphed.captured == 2


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_denoising_through_graphs_equals_eager_with_and_without_deep_cache(model, interval):
    graphed = GraphedUNet(model.unet)
    model.deep_cache_interval = interval
    sampler = model.sampler
    # The tiny config runs 1 step, which reuses nothing: 4 steps here.
    model.sampler = DDIMSampler({**load_config("tiny")["sampler"], "steps": 4})
    try:
        for count, carried, seed in ((2, [12, 0], 5), (2, [8, 4], 6)):
            batch = windows(model, count, carried, seed)
            eager = model.denoise_windows(*batch)
            torch.testing.assert_close(model.denoise_windows(*batch, unet=graphed), eager, **TOLERANCE)
    finally:
        model.deep_cache_interval, model.sampler = 1, sampler
    assert graphed.captured == (1 if interval == 1 else 2)


def test_the_worker_replays_graphs_captured_on_another_thread(model):
    """Captured here (the bench does so, in inference mode), replayed on the worker's thread."""
    graphed = GraphedUNet(model.unet)
    batch = windows(model, 1, [12], 9)
    with torch.inference_mode():
        model.denoise_windows(*batch, unet=graphed)
    worker = ModelWorker(model, max_batch=2, unet=graphed)
    results: list = [None, None]
    others = windows(model, 1, [4], 10)
    args = [(batch[0][0], batch[1][0], batch[2][0, :12]), (others[0][0], others[1][0], others[2][0, :4])]

    def run(i):
        results[i] = worker.client().denoise(*args[i])

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        worker.close()
    for (condition, audio, known), result in zip(args, results):
        assert isinstance(result, torch.Tensor), result
        torch.testing.assert_close(result, model.denoise(condition, audio, known), **TOLERANCE)

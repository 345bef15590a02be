"""The few-step sampler against diffusers' DDIM, and the device/dtype choice."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from conftest import FIXTURES
from models.precision import select_device, select_dtype
from models.sampler import DDIMSampler
from models.unet import UNet3DConditionModel
from stream.config import load_config

# configs/scheduler_config.json of bytedance/LatentSync, as scripts/inference.py loads it.
UPSTREAM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                      "steps_offset": 1}


@pytest.fixture(scope="module")
def tiny_unet():
    import json

    config = json.loads((FIXTURES / "tiny_unet_config.json").read_text())["model_config"]
    unet = UNet3DConditionModel.from_config(config)
    state = {k: v.float() for k, v in load_file(FIXTURES / "tiny_unet_state.safetensors").items()}
    unet.load_state_dict(state)
    io = {k: v.float() for k, v in load_file(FIXTURES / "tiny_unet_io.safetensors").items()}
    return unet.eval(), io


def test_twenty_upstream_steps_match_diffusers_step_for_step(tiny_unet):
    unet, io = tiny_unet
    condition, audio = io["sample"][:, 4:], io["encoder_hidden_states"]
    noise = torch.randn((1, 4, 16, 16, 16), generator=torch.Generator().manual_seed(3))

    sampler = DDIMSampler({**UPSTREAM_SCHEDULER, "steps": 20, "guidance_scale": 1.5,
                           "timestep_spacing": "leading"})
    assert sampler.timesteps.tolist() == list(range(951, 0, -50))
    ours = []
    latents = noise.clone()
    with torch.no_grad():
        for t in sampler.timesteps:
            eps = sampler.predict_noise(unet, latents, condition, audio, t)
            latents = sampler.scheduler.step(eps, t, latents, eta=0.0).prev_sample
            ours.append(latents)
        final = sampler.sample(unet, noise, condition, audio)

    reference = DDIMScheduler.from_config(UPSTREAM_SCHEDULER)
    reference.set_timesteps(20)
    latents = noise.clone()
    with torch.no_grad():
        for step, t in enumerate(reference.timesteps):
            inputs = torch.cat([torch.cat([latents, condition], 1)] * 2)
            both = unet(inputs, t, torch.cat([torch.zeros_like(audio), audio]))
            eps = both[:1] + 1.5 * (both[1:] - both[:1])
            latents = reference.step(eps, t, latents, eta=0.0).prev_sample
            torch.testing.assert_close(ours[step], latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, latents, rtol=1e-4, atol=1e-4)
    assert latents.abs().mean() > 0.1  # not a trivially zero trajectory


def test_default_few_step_config_starts_near_pure_noise():
    for name in ("tiny", "latentsync-1.5", "latentsync-1.6"):
        sampler = DDIMSampler({**load_config(name)["sampler"], "steps": 4})
        assert sampler.timesteps[0] >= 990, name
    leading = DDIMSampler({**UPSTREAM_SCHEDULER, "steps": 4, "timestep_spacing": "leading"})
    assert leading.timesteps.tolist() == [751, 501, 251, 1]


def test_precision_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert select_dtype(cpu) == torch.float32
    assert select_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        select_dtype(cpu, "fp8")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_dtype(cuda) == torch.float16
    assert select_dtype(cuda, "fp32") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == cpu
    assert select_device("cuda:1") == torch.device("cuda:1")


def test_cpu_generator_runs_in_fp32():
    from models.factory import build_models

    config = load_config("tiny")
    models = build_models(config, torch.ones(1, 128, 128), cpu := torch.device("cpu"), select_dtype(cpu))
    assert models.generator.dtype == torch.float32

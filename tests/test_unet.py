"""The U-Net against LatentSync's own: every state-dict name of the full model, and the tiny model's outputs."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from models.unet import UNet3DConditionModel
from models.unet.motion_module import sinusoidal_table

ATOL = RTOL = 1e-4  # the fixture's suggestion; measured about 4e-6 on CPU
# sin/cos of fp32 arguments up to 23 (ulp 1.9e-6): vectorised exp and sin round differently from
# one CPU to another (9.4e-7 from the fixture's table on one AVX-512 machine). Swapping sin and cos, or
# shifting the positions by one, moves it by more than 0.1.
TABLE_ATOL = 1e-5
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def unet_config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())["unet"]


@pytest.fixture(scope="module")
def tiny_config(fixtures) -> dict:
    return json.loads((fixtures / "tiny_unet_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_unet(fixtures, tiny_config) -> UNet3DConditionModel:
    model = UNet3DConditionModel.from_config(tiny_config["model_config"]).eval()
    state = load_file(fixtures / "tiny_unet_state.safetensors")
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def io(fixtures) -> dict[str, torch.Tensor]:
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in load_file(fixtures / "tiny_unet_io.safetensors").items()}


@pytest.mark.parametrize("config_name", ["latentsync-1.5.yaml", "latentsync-1.6.yaml"])
def test_full_size_state_dict_is_upstreams(fixtures, config_name):
    manifest = json.loads((fixtures / "unet_1.5_manifest.json").read_text())
    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(unet_config(config_name))

    ours = [(name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            for name, tensor in model.state_dict().items()]
    theirs = [(entry["name"], entry["shape"], entry["dtype"]) for entry in manifest["state_dict"]]
    assert len(ours) == manifest["n_state_dict_entries"] == 1246
    assert ours == theirs  # names, shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters"] == 1_267_099_844
    buffers = dict(model.named_buffers())
    assert len(buffers) == 40 and all(name.endswith("pos_encoder.pe") for name in buffers)
    assert sum(b.numel() for b in buffers.values()) == manifest["total_buffer_elements"]


def test_tiny_yaml_is_the_fixture_architecture(tiny_config):
    model = UNet3DConditionModel.from_config(unet_config("tiny.yaml"))
    ours = [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]
    assert ours == tiny_config["state_dict_order"]
    assert sum(p.numel() for p in model.parameters()) == tiny_config["total_parameters"]


@pytest.mark.parametrize("flatten_audio", [False, True], ids=["audio(B,F,50,384)", "audio(B*F,50,384)"])
def test_tiny_outputs_match_reference(tiny_unet, io, flatten_audio):
    audio = io["encoder_hidden_states"]
    if flatten_audio:
        audio = audio.flatten(0, 1)
    with torch.no_grad():
        output = tiny_unet(io["sample"], io["timestep"], audio)
        null_audio = tiny_unet(io["sample"], io["timestep"], torch.zeros_like(audio))
        no_audio = tiny_unet(io["sample"], io["timestep"], None)

    assert output.shape == (1, 4, 16, 16, 16)
    torch.testing.assert_close(output, io["output"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(null_audio, io["output_null_audio"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(no_audio, io["output_no_audio"], atol=ATOL, rtol=RTOL)


def test_cfg_batch_matches_single_calls(tiny_unet, io):
    audio = io["encoder_hidden_states"]
    with torch.no_grad():
        both = tiny_unet(torch.cat([io["sample"]] * 2), io["timestep"], torch.cat([torch.zeros_like(audio), audio]))
    torch.testing.assert_close(both[:1], io["output_null_audio"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(both[1:], io["output"], atol=ATOL, rtol=RTOL)


def test_timestep_forms_agree(tiny_unet, io):
    sample, audio = io["sample"], io["encoder_hidden_states"]
    with torch.no_grad():
        outputs = [tiny_unet(sample, t, audio) for t in (951, 951.0, torch.tensor(951), torch.tensor([951]))]
    assert int(io["timestep"]) == 951
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])  # the same forward on the same tensors, in one process


def test_position_tables_are_upstreams(fixtures):
    state = load_file(fixtures / "tiny_unet_state.safetensors")
    tables = {name: tensor for name, tensor in state.items() if name.endswith("pos_encoder.pe")}
    assert len(tables) == 12  # 6 motion modules x 2 attentions (the fixture README's "10" is a miscount)
    for name, table in tables.items():
        torch.testing.assert_close(sinusoidal_table(table.shape[1], table.shape[2]), table,
                                   rtol=0, atol=TABLE_ATOL, msg=lambda m: f"{name}: {m}")


def test_audio_must_fit_the_window(tiny_unet, io):
    with pytest.raises(ValueError, match="does not fit 1 video"):
        tiny_unet(io["sample"], 951, io["encoder_hidden_states"][:, :8])


def test_window_longer_than_position_table_is_refused(tiny_unet):
    with pytest.raises(ValueError, match="25 frames is longer"), torch.no_grad():
        tiny_unet(torch.zeros(1, 13, 25, 4, 4), 951)


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["CrossAttnDownBlock3D", "AttnDownBlock2D"]}, "unknown down_block_types"),
    ({"up_block_types": ["UpBlock3D", "SimpleUpBlock"]}, "unknown up_block_types"),
    ({"mid_block_type": "UNetMidBlock2D"}, "unknown mid_block_type"),
    ({"motion_module_type": "Conv"}, "unknown motion_module_type"),
    ({"block_out_chanels": [32, 64]}, "unknown U-Net config keys"),
    ({"use_linear_projection": True}, "use_linear_projection=True is not supported"),
])
def test_config_errors_name_the_problem(tiny_config, change, message):
    with pytest.raises(ValueError, match=message):
        UNet3DConditionModel.from_config({**tiny_config["model_config"], **change})


def test_upstream_only_options_at_their_defaults_are_accepted(tiny_config):
    config = {**tiny_config["model_config"], "use_inflated_groupnorm": False, "class_embed_type": None,
              "_class_name": "UNet3DConditionModel"}
    assert UNet3DConditionModel.from_config(config).config["use_motion_module"] is True


def test_deep_cache_reuse_step_on_the_same_input_equals_the_full_step(tiny_unet, io):
    """A reuse step recomputes only the first level and feeds the kept deep features to the last up
    block: on the input the full step saw, the result is the full step's (wiring of the skips), and
    the levels below the first do not run."""
    from models.unet import DeepCache

    sample, t, audio = io["sample"], io["timestep"], io["encoder_hidden_states"]
    assert sample.abs().mean() > 0.1
    cache = DeepCache()
    deep_calls = []
    hook = tiny_unet.mid_block.register_forward_hook(lambda *_: deep_calls.append(1))
    try:
        with torch.no_grad():
            full = tiny_unet(sample, t, audio, deep_cache=cache)
            cache.reuse = True
            reused = tiny_unet(sample, t, audio, deep_cache=cache)
            shallow_changed = tiny_unet(sample * 0.5 + 0.3, t, audio, deep_cache=cache)
    finally:
        hook.remove()
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)
    assert deep_calls == [1]  # the whole step ran the mid block; the reuse steps did not
    assert (shallow_changed - full).abs().mean() > 1e-3  # the first level is computed afresh


def test_the_deep_cache_option_reaches_the_model():
    """``--deep-cache N`` (stream.config.with_deep_cache) sets the built model's interval."""
    from models.factory import build_models
    from stream.config import load_config, with_deep_cache
    from stream.mouth_mask import mouth_mask

    config = with_deep_cache(load_config("tiny"), 3)
    mask = torch.from_numpy(mouth_mask(config["resolution"]))
    assert build_models(config, mask, torch.device("cpu"), torch.float32).generator.deep_cache_interval == 3
    assert with_deep_cache(config, None) is config

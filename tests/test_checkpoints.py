"""U-Net checkpoints: LatentSync's .pt format and safetensors load strictly and reproduce the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoints import CheckpointMismatchError, load_unet_checkpoint, save_unet_checkpoint
from models.unet import UNet3DConditionModel

ATOL = RTOL = 1e-4
# A rebuilt position table is sin/cos of fp32 arguments up to 23 (ulp 1.9e-6), and vectorised exp and
# sin round differently from one CPU to another (9.4e-7 from the stored table on one AVX-512 machine).
TABLE_ATOL = 1e-5


@pytest.fixture(scope="module")
def model_config(fixtures) -> dict:
    return json.loads((fixtures / "tiny_unet_config.json").read_text())["model_config"]


@pytest.fixture(scope="module")
def reference_state(fixtures) -> dict[str, torch.Tensor]:
    """The fixture weights as stored: float16 parameters, float32 position tables."""
    return load_file(fixtures / "tiny_unet_state.safetensors")


@pytest.fixture(scope="module")
def io(fixtures) -> dict[str, torch.Tensor]:
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in load_file(fixtures / "tiny_unet_io.safetensors").items()}


def write(state: dict[str, torch.Tensor], path) -> None:
    """Writes ``state`` as LatentSync does (.pt) or as safetensors, by suffix."""
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)


def output_of(model: UNet3DConditionModel, io: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(io["sample"], io["timestep"], io["encoder_hidden_states"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_fp16_checkpoint_loads_upcast_and_reproduces_reference(tmp_path, model_config, reference_state, io, suffix):
    path = tmp_path / f"latentsync_unet{suffix}"
    write(reference_state, path)
    model = UNet3DConditionModel.from_config(model_config)

    report = load_unet_checkpoint(model, path)

    assert report.complete and not report.rebuilt
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.float32}
    torch.testing.assert_close(output_of(model, io), io["output"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_checkpoint_round_trips(tmp_path, model_config, reference_state, suffix):
    source = UNet3DConditionModel.from_config(model_config)
    source.load_state_dict({name: tensor.float() for name, tensor in reference_state.items()})
    save_unet_checkpoint(source, tmp_path / f"unet{suffix}")

    copy = UNet3DConditionModel.from_config(model_config)
    load_unet_checkpoint(copy, tmp_path / f"unet{suffix}")
    for (name, ours), theirs in zip(copy.state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7, msg=name)  # saving and loading copies


def test_position_tables_may_be_absent(tmp_path, model_config, reference_state, io):
    tables = {name: tensor for name, tensor in reference_state.items() if name.endswith("pos_encoder.pe")}
    write({name: t for name, t in reference_state.items() if name not in tables}, tmp_path / "no_pe.pt")
    model = UNet3DConditionModel.from_config(model_config)
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.fill_(float("nan"))  # so that only a rebuilt table can pass

    report = load_unet_checkpoint(model, tmp_path / "no_pe.pt")

    assert report.complete and sorted(report.rebuilt) == sorted(tables) and len(tables) == 12
    for name, table in tables.items():  # NaN, where a table was not rebuilt, fails assert_close too
        torch.testing.assert_close(model.get_buffer(name), table, rtol=0, atol=TABLE_ATOL,
                                   msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(output_of(model, io), io["output"], atol=ATOL, rtol=RTOL)


def test_meta_model_takes_the_checkpoint_tensors(tmp_path, model_config, reference_state, io):
    write(reference_state, tmp_path / "unet.safetensors")
    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(model_config)

    load_unet_checkpoint(model, tmp_path / "unet.safetensors")

    assert not any(tensor.is_meta for tensor in model.state_dict().values())
    assert model.dtype == torch.float32
    torch.testing.assert_close(output_of(model, io), io["output"], atol=ATOL, rtol=RTOL)


def test_casts_to_a_half_precision_model(tmp_path, model_config, reference_state):
    write(reference_state, tmp_path / "unet.pt")
    model = UNet3DConditionModel.from_config(model_config).half()
    load_unet_checkpoint(model, tmp_path / "unet.pt")
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.float16}
    assert torch.equal(model.conv_in.weight, reference_state["conv_in.weight"])


def broken_state(reference_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One missing key, one extra key and one wrong shape."""
    state = dict(reference_state)
    del state["mid_block.resnets.1.conv2.bias"]
    state["up_blocks.9.extra.weight"] = torch.zeros(3)
    state["conv_in.weight"] = torch.zeros(32, 9, 3, 3, dtype=torch.float16)
    return state


def test_mismatch_is_one_readable_error(tmp_path, model_config, reference_state):
    write(broken_state(reference_state), tmp_path / "broken.pt")
    model = UNet3DConditionModel.from_config(model_config)
    before = model.conv_out.weight.clone()

    with pytest.raises(CheckpointMismatchError) as raised:
        load_unet_checkpoint(model, tmp_path / "broken.pt")

    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert "broken.pt" in message
    assert "1 tensor missing from the checkpoint:\n    mid_block.resnets.1.conv2.bias" in message
    assert "1 tensor not in the model:\n    up_blocks.9.extra.weight" in message
    assert "conv_in.weight: checkpoint [32, 9, 3, 3] vs model [32, 13, 3, 3]" in message
    assert torch.equal(model.conv_out.weight, before)  # nothing was loaded


def test_long_lists_are_shortened(tmp_path, model_config, reference_state):
    write({name: t for name, t in reference_state.items() if not name.startswith("up_blocks.")},
          tmp_path / "partial.safetensors")
    model = UNet3DConditionModel.from_config(model_config)
    missing = sum(name.startswith("up_blocks.") and not name.endswith(".pe") for name in model.state_dict())

    with pytest.raises(CheckpointMismatchError, match=rf"{missing} tensors missing") as raised:
        load_unet_checkpoint(model, tmp_path / "partial.safetensors")
    assert f"... and {missing - 8} more" in str(raised.value)
    assert len(str(raised.value).splitlines()) < 15


def test_non_strict_loads_what_fits_and_reports(tmp_path, model_config, reference_state):
    write(broken_state(reference_state), tmp_path / "broken.pt")
    model = UNet3DConditionModel.from_config(model_config)
    conv_in_before = model.conv_in.weight.clone()

    report = load_unet_checkpoint(model, tmp_path / "broken.pt", strict=False)

    assert not report.complete
    assert report.missing == ("mid_block.resnets.1.conv2.bias",)
    assert report.unexpected == ("up_blocks.9.extra.weight",)
    assert report.mismatched == (("conv_in.weight", (32, 9, 3, 3), (32, 13, 3, 3)),)
    assert "conv_in.weight" in report.describe()
    assert torch.equal(model.conv_in.weight, conv_in_before)
    assert torch.equal(model.conv_out.weight, reference_state["conv_out.weight"].float())


def test_unreadable_file_is_a_value_error(tmp_path, model_config):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_unet_checkpoint(UNet3DConditionModel.from_config(model_config), tmp_path / "junk.pt")

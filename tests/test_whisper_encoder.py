"""The Whisper encoder against the LatentSync fixtures, OpenAI's checkpoint format and openai-whisper."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.whisper_encoder import WhisperDims, WhisperEncoder, load_openai_checkpoint, seeded_encoder
from stream.audio_features import log_mel

FEATURE_ATOL = 1e-4  # measured: 3.8e-6 from the whisper_io mel, 9.7e-6 from the waveform


@pytest.fixture(scope="module")
def encoder(whisper_summary):
    return seeded_encoder(WhisperDims.from_dict(whisper_summary["whisper_dims"]), seed=0)


@pytest.fixture(scope="module")
def padded_mel(whisper_io):
    """The whisper_io mel as LatentSync feeds it: one (1, 80, 3000) zero-padded segment."""
    return F.pad(torch.from_numpy(whisper_io["log_mel"]), (0, 2800))[None]


@pytest.fixture(scope="module")
def layers(encoder, padded_mel):
    with torch.inference_mode():
        return encoder(padded_mel)


def test_seeded_encoder_reproduces_fixture_weights(encoder, whisper_summary, whisper_io, layers):
    """By value, through upstream's stored features: layer 0 pins the conv stem and the position
    table, each later layer one more block. The fixture's ``encoder_state_dict_sha256`` is not used:
    torch.randn's Box-Muller is vectorised and rounds with the CPU's vector width
    (ATEN_CPU_CAPABILITY=default moves 66 of 67 tensors by up to 1.2e-7 and misses the hash), so
    it holds on some machines only."""
    names_shapes = [[name, list(p.shape)] for name, p in encoder.named_parameters()]
    assert names_shapes == whisper_summary["encoder_parameter_order"]
    reference = torch.from_numpy(whisper_io["whisper_feature"]).transpose(0, 1)  # (5, 100, 384)
    for layer, (ours, theirs) in enumerate(zip(layers[0, :, :100], reference)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=FEATURE_ATOL,
                                   msg=lambda m: f"layer {layer}: {m}")


def test_seeded_encoder_leaves_global_rng_alone(whisper_summary):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    seeded_encoder(WhisperDims.from_dict(whisper_summary["whisper_dims"]))
    assert torch.equal(torch.rand(4), expected)


def test_forward_returns_five_pre_ln_post_layers(layers):
    assert layers.shape == (1, 5, 1500, 384)


def test_features_match_fixture(encoder, whisper_io):
    reference = whisper_io["whisper_feature"]
    for mel in (whisper_io["log_mel"], log_mel(whisper_io["waveform"])):
        features = encoder.encode_features(torch.from_numpy(mel)).numpy()
        assert features.shape == (100, 5, 384)
        error = np.abs(features - reference).max()
        relative = error / np.abs(reference).max()
        assert error <= FEATURE_ATOL, f"max |Δ| {error:.2e} (relative {relative:.2e})"


def test_encode_features_walks_30s_segments_like_upstream():
    # Small state so four passes stay cheap; the segment length (3000 mel frames) is the real one.
    encoder = seeded_encoder(
        WhisperDims(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2))
    mel = torch.randn(80, 3000 + 401, generator=torch.Generator().manual_seed(0))
    features = encoder.encode_features(mel)
    assert features.shape == (1700, 3, 64)  # 1500 + int(401 / 2)
    with torch.inference_mode():
        first = encoder(mel[None, :, :3000])[0].transpose(0, 1)
        last = encoder(F.pad(mel[:, 3000:], (0, 2599))[None])[0, :, :200].transpose(0, 1)
    # the same forward on the same padded segments, in one process: bit-identical
    assert torch.equal(features[:1500], first)
    assert torch.equal(features[1500:], last)
    assert encoder.encode_features(mel[:, :7]).shape == (3, 3, 64)
    assert encoder.encode_features(mel[:, :0]).shape == (0, 3, 64)


def openai_checkpoint(encoder: WhisperEncoder, whisper_summary: dict, dtype=torch.float32) -> dict:
    """What OpenAI's tiny.pt holds: full dims plus encoder and decoder weights."""
    state = {"encoder." + k: v.to(dtype) for k, v in encoder.state_dict().items()}
    state["decoder.token_embedding.weight"] = torch.zeros(16, 384, dtype=dtype)
    state["decoder.positional_embedding"] = torch.zeros(448, 384, dtype=dtype)
    return {"dims": dict(whisper_summary["whisper_dims"]), "model_state_dict": state}


def test_openai_checkpoint_loads_and_reproduces_features(encoder, whisper_summary, padded_mel, layers, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(openai_checkpoint(encoder, whisper_summary), path)
    loaded = load_openai_checkpoint(path)
    assert loaded.dims == encoder.dims
    # Saving and loading copies the fp32 values, so the copy is exact on any machine, and so is
    # the same forward run on it in this process.
    assert list(loaded.state_dict()) == list(encoder.state_dict())
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, encoder.state_dict()[name], rtol=0, atol=1e-7, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(padded_mel), layers, rtol=0, atol=1e-6)


def test_float16_checkpoint_is_upcast(encoder, whisper_summary, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(openai_checkpoint(encoder, whisper_summary, torch.float16), path)
    loaded = load_openai_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.conv1.weight, encoder.conv1.weight.half().float())


def test_bad_checkpoints_fail_clearly(encoder, whisper_summary, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_openai_checkpoint(garbage)

    bare = tmp_path / "bare.pt"
    torch.save(encoder.state_dict(), bare)
    with pytest.raises(ValueError, match="not an OpenAI Whisper checkpoint"):
        load_openai_checkpoint(bare)

    wrong_dims = openai_checkpoint(encoder, whisper_summary)
    wrong_dims["dims"]["n_audio_state"] = 512
    torch.save(wrong_dims, tmp_path / "wrong_dims.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_openai_checkpoint(tmp_path / "wrong_dims.pt")

    missing = openai_checkpoint(encoder, whisper_summary)
    del missing["model_state_dict"]["encoder.blocks.3.mlp.2.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="blocks.3.mlp.2.bias"):
        load_openai_checkpoint(tmp_path / "missing.pt")


def test_matches_openai_whisper(encoder, whisper_io, padded_mel, layers):
    whisper = pytest.importorskip("whisper")
    dims = encoder.dims
    theirs = whisper.model.AudioEncoder(
        dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
    )
    assert list(theirs.state_dict()) == list(encoder.state_dict())
    theirs.load_state_dict(encoder.state_dict())

    captured = []
    theirs.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    for block in theirs.blocks:
        block.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.inference_mode():
        theirs(padded_mel)
    # Both use SDPA the same way: measured bit-identical with openai-whisper 20250625.
    torch.testing.assert_close(layers, torch.stack(captured, dim=1), rtol=0, atol=1e-5)

    their_mel = whisper.log_mel_spectrogram(torch.from_numpy(whisper_io["waveform"])).numpy()
    np.testing.assert_allclose(log_mel(whisper_io["waveform"]), their_mel, rtol=0, atol=1e-4)

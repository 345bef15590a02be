"""Whisper's encoder out of a CTranslate2 ``model.bin`` (faster-whisper's format), as our ``WhisperEncoder``.

Why: the only trained Whisper weights reachable offline ship in CTranslate2's format, and CTranslate2
returns only the encoder's last layer, while LatentSync needs every layer. Tests and the bench use
this to measure the streaming features with trained attention; the product still loads OpenAI's
``tiny.pt`` (``load_openai_checkpoint``).

The file is CTranslate2's own serialisation (``ModelSpec._serialize`` in its python package; read
back by ``models::Model::load`` in ``src/models/model.cc``), little-endian throughout:

    u32 binary version (6 today)   str spec name ("WhisperSpec")   u32 spec revision
    u32 n_variables, then per variable:
        str name   u8 rank   u32 dims[rank]   u8 dtype id   u32 n_bytes   bytes
    u32 n_aliases, then per alias: str alias   str variable name

where ``str`` is a u16 length that counts a trailing NUL, then the bytes with that NUL. Only the
``encoder/`` variables are read; every one of them must be used, so a spec change fails loudly.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from models.whisper_encoder import WhisperDims, WhisperEncoder, _built_without_rng

#: CTranslate2's ``DataType`` enum (include/ctranslate2/types.h), in order.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_VERSIONS = range(4, 7)  # with a dtype id per variable (4+) and aliases (3+); 6 is current


class _Reader:
    """A cursor over the bytes, failing with the offset when the file ends early."""

    def __init__(self, data: bytes, source: str):
        self.data, self.offset, self.source = memoryview(data), 0, source

    def take(self, n: int) -> memoryview:
        if self.offset + n > len(self.data):
            raise ValueError(f"{self.source}: truncated at byte {self.offset} (wanted {n} more)")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (length,) = self.unpack("H")
        return bytes(self.take(length))[:-1].decode("utf-8")


def read_variables(data: bytes, source: str = "model.bin") -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) from a CTranslate2 model.bin's bytes; arrays keep their
    stored dtype (float16 for faster-whisper's models) and share memory with ``data``."""
    reader = _Reader(data, source)
    (version,) = reader.unpack("I")
    if version not in _VERSIONS:
        raise ValueError(f"{source}: CTranslate2 binary version {version}, this reader knows "
                         f"{_VERSIONS.start}..{_VERSIONS.stop - 1}")
    spec = reader.string()
    reader.unpack("I")  # spec revision: the variable names below are what we check
    (count,) = reader.unpack("I")
    variables = {}
    for _ in range(count):
        name = reader.string()
        (rank,) = reader.unpack("B")
        shape = reader.unpack("I" * rank)
        dtype_id, n_bytes = reader.unpack("BI")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{source}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = np.dtype(_DTYPES[dtype_id])
        if n_bytes != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"{source}: variable {name!r} holds {n_bytes} bytes, not {shape} {dtype}")
        variables[name] = np.frombuffer(reader.take(n_bytes), dtype).reshape(shape)
    (n_aliases,) = reader.unpack("I")
    for _ in range(n_aliases):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    if reader.offset != len(reader.data):
        raise ValueError(f"{source}: {len(reader.data) - reader.offset} bytes left after the aliases")
    return spec, variables


def encoder_state_dict(variables: dict[str, np.ndarray]) -> tuple[WhisperDims, dict[str, torch.Tensor]]:
    """Rename CTranslate2's ``encoder/...`` variables to OpenAI's ``AudioEncoder`` names, float32.

    CTranslate2 fuses each block's query/key/value into one (3·C, C) ``linear_0`` and stores a bias
    for all three; Whisper's key has none, so that third must be zero (checked, not assumed).
    """
    encoder = {name[len("encoder/"):]: value for name, value in variables.items() if name.startswith("encoder/")}
    layers = sorted({int(m.group(1)) for name in encoder if (m := re.match(r"layer_(\d+)/", name))})
    if not encoder or layers != list(range(len(layers))):
        raise ValueError(f"not a Whisper encoder: layers {layers}, names {sorted(encoder)[:5]}...")
    n_state, n_mels = encoder["conv1/weight"].shape[:2]
    dims = WhisperDims(n_mels=int(n_mels), n_audio_ctx=int(encoder["position_encodings/encodings"].shape[0]),
                       n_audio_state=int(n_state), n_audio_head=int(encoder["num_heads"]),
                       n_audio_layer=len(layers))
    used = {"num_heads"}

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return torch.from_numpy(encoder[name].astype(np.float32))

    state = {"conv1.weight": take("conv1/weight"), "conv1.bias": take("conv1/bias"),
             "conv2.weight": take("conv2/weight"), "conv2.bias": take("conv2/bias"),
             "positional_embedding": take("position_encodings/encodings")}
    for i in layers:
        ours, theirs = f"blocks.{i}.", f"layer_{i}/"
        query, key, value = take(theirs + "self_attention/linear_0/weight").chunk(3)
        query_bias, key_bias, value_bias = take(theirs + "self_attention/linear_0/bias").chunk(3)
        if key_bias.abs().max() > 0:
            raise ValueError(f"layer {i}: a non-zero key bias, which Whisper's attention does not have")
        state |= {ours + "attn.query.weight": query, ours + "attn.query.bias": query_bias,
                  ours + "attn.key.weight": key, ours + "attn.value.weight": value,
                  ours + "attn.value.bias": value_bias}
        for our_name, their_name in [("attn.out", "self_attention/linear_1"), ("mlp.0", "ffn/linear_0"),
                                     ("mlp.2", "ffn/linear_1")]:
            state[ours + our_name + ".weight"] = take(theirs + their_name + "/weight")
            state[ours + our_name + ".bias"] = take(theirs + their_name + "/bias")
        for our_name, their_name in [("attn_ln", "self_attention/layer_norm"), ("mlp_ln", "ffn/layer_norm")]:
            state[ours + our_name + ".weight"] = take(theirs + their_name + "/gamma")
            state[ours + our_name + ".bias"] = take(theirs + their_name + "/beta")
    state["ln_post.weight"], state["ln_post.bias"] = take("layer_norm/gamma"), take("layer_norm/beta")
    unused = sorted(set(encoder) - used)
    if unused:
        raise ValueError(f"encoder variables this converter does not map: {unused}")
    return dims, state


def load_ctranslate2_encoder(model_bin: bytes | str | Path) -> WhisperEncoder:
    """A float32 ``WhisperEncoder`` from a CTranslate2 Whisper model.bin (its bytes or its path).

    float16 weights upcast exactly, so the encoder holds the very values CTranslate2 computes with.
    """
    source = "model.bin" if isinstance(model_bin, (bytes, bytearray)) else str(model_bin)
    data = model_bin if isinstance(model_bin, (bytes, bytearray)) else Path(model_bin).read_bytes()
    spec, variables = read_variables(data, source)
    if spec != "WhisperSpec":
        raise ValueError(f"{source}: a CTranslate2 {spec}, not a WhisperSpec")
    dims, state = encoder_state_dict(variables)
    encoder = _built_without_rng(dims)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()

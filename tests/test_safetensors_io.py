"""safetensors through the `safetensors` package: lazy per-tensor reads (each tensor read once,
when it is placed), bf16, and one error type naming the file (and the tensor) for any malformed
header."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.models.unet import UNet2DConditionModel
from tests.helpers import randomize_fan_in
from tests.test_weights_diffusers import UNET, numpy_sd


def _raw(path, header, data: bytes = b"") -> str:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
MALFORMED = {
    # name: (header, data bytes, what the message says)
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, b"", "corrupt safetensors header"),
    "list": ([GOOD], b"", "a JSON list, not an object"),
    "string_entry": ({"w": "F32"}, b"", "tensor 'w': header entry is a JSON str"),
    "negative_shape": ({"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}, bytes(16),
                       "tensor 'w': shape [-2, 2] is not a list of non-negative integers"),
    "negative_offset": ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}}, bytes(16),
                        "tensor 'w': data_offsets [-16, 0]"),
    "offsets_not_a_pair": ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": 16}}, bytes(16),
                           "tensor 'w': data_offsets 16"),
    "unknown_dtype": ({"w": {"dtype": "F7", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16),
                      "tensor 'w': unsupported dtype 'F7'"),
    "size_mismatch": ({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16),
                      "tensor 'w': byte range [0, 16) does not match (3, 2) F32"),
    "truncated_data": (GOOD, bytes(10), "tensor 'w': (2, 2) needs bytes [0, 16) but the file holds only 10"),
    "truncated_header": (b'{"w": {"dtype"', b"", "corrupt safetensors header"),
    "not_utf8": (b"\xff\xfe{}", b"", "corrupt safetensors header"),
    "bad_metadata": ({"__metadata__": {"format": 1}, **GOOD}, bytes(16), "__metadata__ must map strings"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_header_is_one_error_naming_the_file(name, tmp_path):
    header, data, says = MALFORMED[name]
    path = _raw(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(stio.CheckpointFormatError) as e:
        stio.read_safetensors(path)
    assert str(e.value).startswith(path + ":") and says in str(e.value), str(e.value)


def test_short_and_oversized_headers(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(stio.CheckpointFormatError, match="too short for a safetensors header"):
        stio.open_safetensors(str(short))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(stio.CheckpointFormatError, match="header claims 1000000000000 bytes"):
        stio.open_safetensors(str(huge))
    with pytest.raises(FileNotFoundError):
        stio.open_safetensors(str(tmp_path / "absent.safetensors"))


def test_bf16_and_metadata_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
               "b": rng.standard_normal((4,)).astype(np.float16), "c": np.arange(6, dtype=np.int64)}
    path = str(tmp_path / "t.safetensors")
    stio.write_safetensors(path, tensors, metadata={"note": "x"})
    back = stio.read_safetensors(path)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k].view(np.uint8), v.view(np.uint8)), k
    assert stio.read_metadata(path) == {"format": "pt", "note": "x"}
    assert not os.path.exists(path + ".tmp")


def test_a_model_reads_each_tensor_once_when_placing_it(tmp_path, monkeypatch):
    """Opening reads no tensor; the strict checks use shapes only; each tensor is read once, to
    be placed (so a large checkpoint is never held whole in host memory next to its device
    copy). bf16 weights load as their exact values."""
    import diffusers

    ref = diffusers.UNet2DConditionModel(**UNET)
    randomize_fan_in(ref, 1)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in numpy_sd(ref).items()}
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    stio.write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), sd)
    reads = []
    real = stio._OpenFile.read

    def counting(self, key, *a):
        reads.append(key)
        return real(self, key, *a)

    monkeypatch.setattr(stio._OpenFile, "read", counting)
    lazy = stio.open_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert reads == [] and lazy["conv_in.weight"].shape == (8, 9, 3, 3)
    assert lazy["conv_in.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    model = UNet2DConditionModel.from_pretrained(str(tmp_path))
    assert sorted(reads) == sorted(sd)
    got = model.torch_state_dict()
    for k, v in sd.items():
        assert got[k].dtype == np.float32 and np.array_equal(got[k], v.astype(np.float32)), k

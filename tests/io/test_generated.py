"""Generated tensors (enc.io.generated): numpy's bytes equal torch.eye / torch.zeros in every dtype, and the
writer's byte path writes them as the torch path does."""

from __future__ import annotations

import pytest
import torch

from enc.io.dtypes import DType
from enc.io.generated import GeneratedTensor, generated_raw, identity, zeros
from enc.io.safetensors_out import write_safetensors_file

NAMES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dt_kind", ["enc", "torch"])
def test_bytes_equal_torchs(name, dt_kind):
    dt = DType(name) if dt_kind == "enc" else getattr(torch, name)
    for n in (1, 3, 7):
        r = generated_raw("identity", (n, n), dt)
        assert r is not None and r.byte_range() is None and r.source_bytes() is None
        assert r.materialize().tobytes() == _bytes(torch.eye(n, dtype=getattr(torch, name)))
        assert identity(n, dt, "x").load().equal(torch.eye(n, dtype=getattr(torch, name)))
    for shape in ((5,), (2, 3), (0, 4), ()):
        r = generated_raw("zeros", shape, dt)
        assert r.materialize().tobytes() == _bytes(torch.zeros(shape, dtype=getattr(torch, name)))
        assert r.materialize().shape == shape
        assert zeros(shape, dt, "x").load().equal(torch.zeros(shape, dtype=getattr(torch, name)))


def test_inconsistent_recipes_are_refused():
    assert generated_raw("ones", (3,), DType("float32")) is None
    assert generated_raw("identity", (3, 4), DType("float32")) is None
    assert generated_raw("identity", (3,), DType("float32")) is None
    with pytest.raises(ValueError):
        GeneratedTensor("", 0, 3, (3,), 4, kind="zeros")  # 3 elements of 4 bytes are 12 bytes, not 3


@pytest.mark.parametrize("fast", ["1", "0"])
def test_the_writer_writes_torchs_bytes(fast, tmp_path, monkeypatch):
    from enc.io.fastcopy import RawWriter

    monkeypatch.setenv("ENC_FASTCOPY", fast)
    before = RawWriter.stats["rearranged"]
    tensors = {"eye": identity(6, DType("bfloat16"), "identity"), "z": zeros((6,), DType("bfloat16"), "zeros"),
               "e": zeros((0, 6), DType("float32"), "empty")}
    write_safetensors_file(tmp_path / "a.safetensors", tensors, list(tensors))
    assert RawWriter.stats["rearranged"] - before == (3 if fast == "1" else 0)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "a.safetensors"))
    assert got["eye"].dtype == torch.bfloat16 and got["eye"].equal(torch.eye(6, dtype=torch.bfloat16))
    assert got["z"].equal(torch.zeros(6, dtype=torch.bfloat16)) and got["e"].shape == (0, 6)

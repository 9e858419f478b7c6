"""enc parity's reused weight buffers (enc.parity_weights) and the Mistral reference run on them.

The reference reads each source weight into reused staging buffers (a helper thread one ahead),
makes it float32 a block at a time, and may skip a zip CRC that a helper thread verified during the
same run. These tests hold the numbers equal to plain loads and the checks as strict as before.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import enc.parity_weights as pw
from enc.cli.main import run
from enc.errors import CorruptCheckpoint
from enc.io.lazy import LazyTensor
from tests.helpers.mistral_writer import tiny_hf, write_release


def _pth(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, LazyTensor]:
    from enc.converters.mistral import _pth_tensors

    path = tmp_path / "w.pth"
    torch.save(tensors, path)
    lazy = _pth_tensors(path)
    assert all(pw._plain(t) and t.raw.check is not None for t in lazy.values())  # the indexed, CRC-checked path
    return lazy


def _corrupt(path: Path, member_suffix: str) -> None:
    """Flip one byte inside a zip member's data (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    from enc.io.pth_index import _data_offset

    with open(path, "r+b") as f:
        off = _data_offset(f, info, path.stat().st_size) + info.file_size // 2
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))


def test_linear_in_blocks_matches_a_float32_copy(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 24, generator=g).bfloat16()
    h = torch.randn(5, 24, generator=g)
    lazy = _pth(tmp_path, {"w": w})
    want = h @ w.float().t()
    monkeypatch.setattr(pw, "F32_BLOCK", 24 * 8)  # 8 rows at a time: 5 blocks, the last one short
    fw = pw.Float32Weights()
    got = fw.linear(h, lazy["w"])
    assert got.shape == (5, 37) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert fw._f32.numel() == 24 * 8  # never a float32 copy of the whole weight
    assert torch.equal(fw.get(lazy["w"]), w.float())


def test_read_ahead_follows_the_schedule_and_falls_back_off_it(tmp_path):
    g = torch.Generator().manual_seed(1)
    ts = {f"t{i}": torch.randn(3 + i, 8, generator=g).bfloat16() for i in range(4)}
    lazy = _pth(tmp_path, ts)
    fw = pw.Float32Weights([lazy["t0"], lazy["t1"], lazy["t2"], lazy["t3"]])
    assert torch.equal(fw.get(lazy["t0"]), ts["t0"].float())
    assert torch.equal(fw.get(lazy["t1"]), ts["t1"].float())
    assert torch.equal(fw.get(lazy["t3"]), ts["t3"].float())  # off the schedule: read when asked
    assert fw._ahead is None
    assert torch.equal(fw.get(lazy["t2"]), ts["t2"].float())
    fw.close()


def test_a_bad_crc_is_raised_by_the_read_of_that_tensor(tmp_path):
    g = torch.Generator().manual_seed(2)
    ts = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, 64, generator=g)}
    lazy = _pth(tmp_path, ts)
    _corrupt(tmp_path / "w.pth", _member_of(tmp_path / "w.pth", "b"))
    # read-ahead thread: "a" is fine, "b" raises when it is asked for
    fw = pw.Float32Weights([lazy["a"], lazy["b"]])
    assert torch.equal(fw.get(lazy["a"]), ts["a"])
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        fw.get(lazy["b"])
    fw.close()
    # verified ahead on the helper thread: the same error, at the same read
    checks = pw.ChecksumsAhead([lazy["a"], lazy["b"]])
    checks._thread.join()
    assert checks.checked(lazy["a"]) is True
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        checks.checked(lazy["b"])
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        pw.Float32Weights(None, checks).get(lazy["b"])
    # in row chunks: raised after the last chunk, before anything computed from them is used
    seen = []
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        for r, _chunk in pw.Float32Weights().rows(lazy["b"], 10):
            seen.append(r)
    assert seen == list(range(0, 64, 10))


def test_rows_give_the_tensor_in_chunks(tmp_path):
    w = torch.arange(70 * 6, dtype=torch.float32).reshape(70, 6).bfloat16()
    lazy = _pth(tmp_path, {"w": w})
    parts = [(r, c.clone()) for r, c in pw.Float32Weights().rows(lazy["w"], 16)]  # each valid until the next
    assert [r for r, _ in parts] == [0, 16, 32, 48, 64]
    assert [c.shape[0] for _, c in parts] == [16, 16, 16, 16, 6]
    assert torch.equal(torch.cat([c for _, c in parts]), w)


def test_layer_arena_reuses_its_memory(tmp_path):
    from safetensors.torch import save_file

    from enc.io.safetensors_in import lazy_tensors

    g = torch.Generator().manual_seed(3)
    ts = {f"l{i}.{k}": torch.randn(16, 8, generator=g).bfloat16() for i in range(2) for k in "ab"}
    save_file(ts, str(tmp_path / "m.safetensors"))
    lazy = lazy_tensors(tmp_path / "m.safetensors")
    arena = pw.LayerArena()
    wrapped = {k: arena.wrap(t) for k, t in lazy.items()}
    arena.reset(arena.need(lazy[k] for k in ("l0.a", "l0.b")))
    a0, b0 = wrapped["l0.a"].load(), wrapped["l0.b"].load()
    assert torch.equal(a0, ts["l0.a"]) and torch.equal(b0, ts["l0.b"])
    ptr = a0.data_ptr()
    arena.reset(arena.need(lazy[k] for k in ("l1.a", "l1.b")))
    a1 = wrapped["l1.a"].load()
    assert a1.data_ptr() == ptr and torch.equal(a1, ts["l1.a"])  # the same memory, the next layer's bytes
    assert torch.equal(wrapped["l1.b"].load(), ts["l1.b"])


def _enc(args, capsys):
    rc = run(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mistral_parity_numbers_and_a_corrupt_source(tmp_path, capsys, dtype):
    model = tiny_hf(layers=3, seed=5)
    src = write_release(tmp_path / "mistral", model, dtype=dtype)
    out = tmp_path / "hf"
    rc, _, err = _enc(["convert", str(src), "-o", str(out), "--no-verify"], capsys)
    assert rc == 0, err
    rc, stdout, err = _enc(["parity", str(src), str(out), "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    assert [r["name"] for r in rep["rows"]] == ["embeddings", "layer.0", "layer.1", "layer.2", "final_norm", "logits"]
    # the reference, run on plain loads (no reused buffers), gives the very same numbers
    from enc.convert import open_converter
    from enc.converters.base import ConvertOptions
    from enc.parity import run_parity

    class Plain(pw.Float32Weights):
        def raw(self, t):
            return t.load()

        def rows(self, t, rows):
            w = t.load()
            for r in range(0, w.shape[0], rows):
                yield r, w[r:r + rows]

    import enc.parity_weights

    orig = enc.parity_weights.Float32Weights
    enc.parity_weights.Float32Weights = Plain
    try:
        with open_converter(src, None, ConvertOptions(overrides={})) as conv:
            plain = run_parity(conv, out).to_dict()
    finally:
        enc.parity_weights.Float32Weights = orig
    for a, b in zip(rep["rows"], plain["rows"], strict=True):
        assert a["name"] == b["name"] and a["passed"] and b["passed"]
        assert a["nmse"] == pytest.approx(b["nmse"], rel=1e-3, abs=1e-12)
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-3, abs=1e-9)
    # a flipped byte in a layer weight of the source: exit 2 naming the file, as before
    _corrupt(src / "consolidated.00.pth", _member_of(src / "consolidated.00.pth", "layers.1.feed_forward.w2.weight"))
    rc, _, err = _enc(["parity", str(src), str(out), "--json"], capsys)
    assert rc == 2 and "CRC mismatch" in err and "consolidated.00.pth" in err


def _member_of(path: Path, key: str) -> str:
    from enc.io.pth_index import read_index

    return "data/" + read_index(path)[key].key


def test_mapped_layer_weights_are_the_file_bytes_and_a_short_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from enc.io.safetensors_in import lazy_tensors

    g = torch.Generator().manual_seed(4)
    ts = {"a": torch.randn(300, 7, generator=g).bfloat16(), "b": torch.randn(5, 3, generator=g)}
    path = tmp_path / "m.safetensors"
    save_file(ts, str(path))
    lazy = lazy_tensors(path)
    arena = pw.LayerArena(mapped=True)
    assert arena.need(lazy.values()) == 0  # nothing is copied into the arena
    got = {k: arena.wrap(t).load() for k, t in lazy.items()}
    assert torch.equal(got["a"], ts["a"]) and torch.equal(got["b"], ts["b"])
    assert got["b"].dtype == torch.float32 and got["a"].shape == (300, 7)
    last = max(lazy, key=lambda k: lazy[k].raw.offset)
    with open(path, "r+b") as f:  # the file shrinks after its header was read
        f.truncate(path.stat().st_size - 8)
    with pytest.raises(CorruptCheckpoint, match=f"truncated: tensor {last}"):
        pw.map_tensor(lazy[last])

"""Bombs and corrupt bytes: each case exits 2 with one line naming the file, publishes nothing and
leaves no temp dirs (issue 15, item 5)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from enc.cli.main import run
from enc.io.megatron_pickle import zip_member_offset

V = 32000  # the Mistral tokenizer fixture's vocabulary


def _temp_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("enc-")}


def fails(capsys, args: list[str], *needles: str, out: Path | None = None) -> str:
    before = _temp_dirs()
    capsys.readouterr()
    rc = run(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("enc: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not re.search(r"\b[A-Z]\w+(Error|Exception|File|Zip\w*):", lines[0]), lines[0]  # a sentence, not a class
    assert len(lines[0]) < 400, lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert _temp_dirs() <= before
    return lines[0]


def _rezip(path: Path, edit) -> None:
    """Rewrite a torch zip file member by member; ``edit(name, data) -> (data, compress_type)``."""
    with zipfile.ZipFile(path) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in items:
            data, ctype = edit(name, data)
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=ctype)
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- Mistral .pth / safetensors


@pytest.fixture(scope="module")
def dense():
    from tests.helpers.mistral_writer import tiny_hf

    return tiny_hf()


@pytest.fixture
def pth(tmp_path, dense):
    from tests.helpers.mistral_writer import write_release

    return write_release(tmp_path / "src", dense)


@pytest.fixture
def st_release(tmp_path, dense):
    from tests.helpers.mistral_writer import write_release

    return write_release(tmp_path / "src", dense, fmt="safetensors")


def test_deflated_data_pkl_padded_with_zeros_is_refused(tmp_path, pth, capsys):
    """A few KB that inflate to a huge data.pkl: refused before anything is inflated."""
    f = pth / "consolidated.00.pth"
    _rezip(f, lambda n, d: (d + b"\0" * (8 << 20), zipfile.ZIP_DEFLATED) if n.endswith("data.pkl")
           else (d, zipfile.ZIP_STORED))
    with zipfile.ZipFile(f) as zf:
        pkl = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        assert pkl.compress_size * 100 < pkl.file_size  # 8 MB of zeros stored in a few KB
    out = tmp_path / "out"
    fails(capsys, ["convert", str(pth), "-o", str(out)], "consolidated.00.pth", "data.pkl is compressed", out=out)


def test_expanded_stride0_tensor_is_refused(tmp_path, pth, capsys):
    """torch.ones(1).expand(V, D): a few bytes stored, V*D elements claimed."""
    f = pth / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    sd["tok_embeddings.weight"] = torch.ones(1).expand(*sd["tok_embeddings.weight"].shape)
    torch.save(sd, f)
    out = tmp_path / "out"
    fails(capsys, ["convert", str(pth), "-o", str(out)], "consolidated.00.pth", "stride", out=out)


def test_flipped_bit_in_pth_fails_the_zip_crc(tmp_path, pth, capsys):
    f = pth / "consolidated.00.pth"
    with zipfile.ZipFile(f) as zf:
        big = max(zf.infolist(), key=lambda i: i.file_size)
        with open(f, "rb") as fh:
            off = zip_member_offset(fh, big)
    b = bytearray(f.read_bytes())
    b[off + big.file_size // 2] ^= 0x10
    f.write_bytes(bytes(b))
    with zipfile.ZipFile(f) as zf:
        assert zf.testzip() == big.filename  # what the issue saw
    out = tmp_path / "out"
    fails(capsys, ["convert", str(pth), "-o", str(out)], "consolidated.00.pth", "CRC", out=out)


def _rewrite_st_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header = edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _negative(h: dict) -> dict:
    k = _first_tensor(h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b - 64, e - 64]  # inside the JSON header
    return h


def _overlap(h: dict) -> dict:
    names = [k for k in h if k != "__metadata__" and h[k]["shape"] == [64]]  # the norms: same size
    a, b = names[:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return h


@pytest.mark.parametrize("edit,needle", [
    (_negative, "lie outside the data section"),
    (_overlap, "share bytes"),
    (lambda h: list(h.items()), "header is a JSON list"),
    (lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "data_offsets"} if k != "__metadata__" else v)
                for k, v in h.items()}, "data_offsets None"),
    (lambda h: {k: ({**v, "data_offsets": [str(x) for x in v["data_offsets"]]} if k != "__metadata__" else v)
                for k, v in h.items()}, "is not a pair of integers"),
    (lambda h: {k: ({**v, "shape": [str(x) for x in v["shape"]]} if k != "__metadata__" else v)
                for k, v in h.items()}, "not a list of non-negative integers"),
    (lambda h: {**h, _first_tensor(h): "F32"}, "header entry is not an object"),
])
def test_safetensors_header_is_validated(tmp_path, st_release, capsys, edit, needle):
    _rewrite_st_header(st_release / "consolidated.safetensors", edit)
    out = tmp_path / "out"
    fails(capsys, ["convert", str(st_release), "-o", str(out)], "consolidated.safetensors", needle, out=out)


def test_safetensors_header_length_past_the_end(tmp_path, st_release, capsys):
    f = st_release / "consolidated.safetensors"
    raw = f.read_bytes()
    f.write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    fails(capsys, ["convert", str(st_release), "-o", str(tmp_path / "out")], "consolidated.safetensors",
          "header length")


# ----------------------------------------------------------------------------- ALBERT


@pytest.fixture(scope="module")
def albert_release(tmp_path_factory, albert_spm):
    from tests.helpers.albert_release import hf_albert, write_release

    return write_release(tmp_path_factory.mktemp("alb") / "albert", hf_albert(120, 16, 32, 2, 1, 1, 4, 48), albert_spm)


@pytest.fixture
def albert(albert_release, tmp_path):
    return Path(shutil.copytree(albert_release, tmp_path / "albert"))


@pytest.mark.parametrize("key,value", [("embedding_size", "16"), ("max_position_embeddings", 64.5),
                                       ("type_vocab_size", True), ("hidden_size", "32")])
def test_albert_config_wrong_types(tmp_path, albert, capsys, key, value):
    cfg = json.loads((albert / "albert_config.json").read_text())
    cfg[key] = value
    (albert / "albert_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    fails(capsys, ["convert", str(albert), "-o", str(out)], "albert_config.json", key, "positive integer", out=out)


def test_albert_empty_sentencepiece_model(tmp_path, albert, capsys):
    (albert / "30k-clean.model").write_bytes(b"")
    out = tmp_path / "out"
    fails(capsys, ["convert", str(albert), "-o", str(out)], "30k-clean.model", "sentencepiece", out=out)


def test_garbage_tarball_is_one_line(tmp_path, capsys):
    f = tmp_path / "albert_base.tar.gz"
    f.write_bytes(os.urandom(3000))
    fails(capsys, ["convert", str(f), "-o", str(tmp_path / "out"), "--from", "albert_tf"], "albert_base.tar.gz",
          "not a tar archive")


# ----------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def hf_dir(albert_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert run(["convert", str(albert_release), "-o", str(out), "--no-verify"]) == 0
    return out


@pytest.fixture
def model(hf_dir, tmp_path):
    return Path(shutil.copytree(hf_dir, tmp_path / "model"))


def test_int32_word_embeddings_are_refused(model, capsys):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(model / "model.safetensors"))
    k = "albert.embeddings.word_embeddings.weight"
    sd[k] = (sd[k] * 100).to(torch.int32)
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, ["fill-mask", "--model", str(model), "the [MASK] ."], k, "int32", "floating point")


def test_weight_map_leaving_the_directory_is_refused(model, tmp_path, capsys):
    secret = tmp_path / "elsewhere.safetensors"
    shutil.copy(model / "model.safetensors", secret)
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (model / "model.safetensors").unlink()
    for target in ("../elsewhere.safetensors", str(secret)):
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: target for k in keys}}))
        fails(capsys, ["fill-mask", "--model", str(model), "the [MASK] ."], "model.safetensors.index.json", "refusing")


def test_config_heads_not_dividing_hidden(model, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (model / "config.json").write_text(json.dumps(cfg))
    fails(capsys, ["fill-mask", "--model", str(model), "the [MASK] ."], "config.json", "not a multiple of num_attention_heads")


def test_config_string_where_a_number_belongs(model, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["hidden_size"] = "32"
    (model / "config.json").write_text(json.dumps(cfg))
    fails(capsys, ["fill-mask", "--model", str(model), "the [MASK] ."], "config.json", "hidden_size must be int")


# ----------------------------------------------------------------------------- tokenizer files


def test_empty_and_non_utf8_merges(tmp_path):
    from enc.errors import ConfigError
    from enc.tokenization import read_bpe_merges

    p = tmp_path / "merges.txt"
    p.write_text("#version: 0.2\n")
    with pytest.raises(ConfigError, match="holds no merges") as e:
        read_bpe_merges(p)
    assert str(p) in str(e.value)
    p.write_bytes(b"#version: 0.2\n\xff\xfe a\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_bpe_merges(p)


# ----------------------------------------------------------------------------- Megatron


@pytest.fixture(scope="module")
def mstate():
    from tests.helpers.megatron_writer import hf_state, tiny_bert

    return hf_state(tiny_bert(seed=3, layers=2, max_pos=32))


@pytest.fixture
def mdir(tmp_path, mstate):
    from tests.helpers.megatron_writer import Spec, write_dir

    return write_dir(tmp_path / "ckpt", Spec("bert", 32, 4, 2, 64, 32, 128), mstate)


def _mfile(root: Path) -> Path:
    return next(root.rglob("model_optim_rng.pt"))


def test_megatron_deflated_data_pkl(tmp_path, mdir, capsys):
    _rezip(_mfile(mdir), lambda n, d: (d + b"\0" * (4 << 20), zipfile.ZIP_DEFLATED) if n.endswith("data.pkl")
           else (d, zipfile.ZIP_STORED))
    out = tmp_path / "out"
    fails(capsys, ["convert", str(mdir), "-o", str(out)], "model_optim_rng.pt", "data.pkl is compressed", out=out)


def test_megatron_stride0_tensor(tmp_path, mstate, capsys):
    from tests.helpers.megatron_writer import Spec, write_dir

    def expand(name: str, st: dict) -> None:
        emb = st["model"]["language_model"]["embedding"]["word_embeddings"]
        emb["weight"] = torch.zeros(1).expand(*emb["weight"].shape)

    src = write_dir(tmp_path / "ckpt", Spec("bert", 32, 4, 2, 64, 32, 128), mstate, mutate=expand)
    out = tmp_path / "out"
    fails(capsys, ["convert", str(src), "-o", str(out)], "model_optim_rng.pt", "stride", out=out)


def test_megatron_tracker_that_is_a_directory(tmp_path, mdir, capsys):
    t = mdir / "latest_checkpointed_iteration.txt"
    t.unlink()
    t.mkdir()
    out = tmp_path / "out"
    fails(capsys, ["convert", str(mdir), "-o", str(out)], "latest_checkpointed_iteration.txt", "not a regular file",
          out=out)


@pytest.mark.parametrize("member", ["latest_checkpointed_iteration.txt", "model_optim_rng.pt"])
@pytest.mark.parametrize("where,value", [(0, b"XXXX"), (26, b"\xff\xff")])  # signature; name length
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_ngc_zip_with_a_damaged_local_header(tmp_path, mdir, capsys, member, where, value, compression):
    from tests.helpers.megatron_writer import pack_zip

    z = pack_zip(mdir, tmp_path / "megatron_bert_345m.zip", compression)
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith(member)))
    b = bytearray(z.read_bytes())
    b[info.header_offset + where:info.header_offset + where + len(value)] = value
    z.write_bytes(bytes(b))
    out = tmp_path / "out"
    fails(capsys, ["convert", str(z), "-o", str(out)], "megatron_bert_345m.zip", member, out=out)


def test_pth_member_marked_encrypted(tmp_path, pth, capsys):
    """One flipped flag bit marks a member encrypted: zipfile raises RuntimeError; enc says it in one line."""
    f = pth / "consolidated.00.pth"
    raw = bytearray(f.read_bytes())
    first = raw.find(b"PK\x01\x02")  # the first central directory entry: data.pkl
    raw[first + 8] |= 0x01  # its general purpose flag: "encrypted"
    f.write_bytes(bytes(raw))
    out = tmp_path / "out"
    fails(capsys, ["convert", str(pth), "-o", str(out)], "consolidated.00.pth", "encrypted", out=out)

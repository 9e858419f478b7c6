"""``enc convert --no-verify`` never imports torch for BertGeneration TF-Hub modules, keras-hub ALBERT presets
and ALBERT / MobileBERT TF releases whose embedding size equals the hidden size (an identity matrix and
zeros are written), and writes the torch path's bytes (``ENC_FASTCOPY=0``), file for file, with the same
sha256 in enc_provenance.json. The child process reports whether ``torch._C`` was ever imported."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from enc.cli.main import run
from tests.converters.test_megatron_torch_free import _convert_twice

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _n_tensors(out: Path) -> int:
    with open(out / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return len([k for k in json.loads(f.read(n)) if k != "__metadata__"])


# ----------------------------------------------------------------------------- BertGeneration TF-Hub


@pytest.mark.parametrize("part", [None, "encoder", "decoder"], ids=["both", "encoder", "decoder"])
@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_bertgeneration_no_verify_never_imports_torch(layout, part, tmp_path, monkeypatch, capsys):
    # real TensorFlow wrote these modules (tests/fixtures/bertgen/make_fixtures.py)
    argv = ["convert", str(FIX / "bertgen" / layout), "--num-heads", "4", "--no-verify",
            *(["--part", part] if part else [])]
    kernel, rearranged = _convert_twice(argv, tmp_path, monkeypatch, capsys)
    n = _n_tensors(tmp_path / "fast")
    assert kernel + rearranged == n  # every tensor on the byte path, the LM bias (zeros) included
    assert kernel and rearranged
    # 2 layers: 6 kernels each (4 self-attention + 2 feed-forward), plus 4 cross-attention in the decoder; +1 bias
    per_half = {"encoder": 12, "decoder": 12 + 8 + 1}
    assert rearranged == sum(per_half[h] for h in ([part] if part else per_half))


# ----------------------------------------------------------------------------- keras-hub ALBERT


@pytest.mark.parametrize("name", ["mlm_g1", "mlm_g2", "cls_g2", "backbone"])
def test_keras_hub_albert_no_verify_never_imports_torch(name, tmp_path, monkeypatch, capsys):
    # keras-hub itself wrote these presets (tests/fixtures/keras_hub/make_fixtures.py)
    kernel, rearranged = _convert_twice(["convert", str(FIX / "keras_hub" / name), "--no-verify"], tmp_path,
                                        monkeypatch, capsys)
    assert kernel + rearranged == _n_tensors(tmp_path / "fast")  # every tensor from the H5 file's own bytes
    assert rearranged >= 8  # kernels: transposes, and the 3-D attention kernels reshaped and transposed


def test_keras_hub_albert_without_name_attributes_never_imports_torch(tmp_path, monkeypatch, capsys):
    import h5py

    src = tmp_path / "old"
    shutil.copytree(FIX / "keras_hub" / "mlm_g2", src)
    for f in ("model.weights.h5", "task.weights.h5"):
        with h5py.File(src / f, "r+") as h:
            h.visititems(lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None)
    kernel, rearranged = _convert_twice(["convert", str(src), "--no-verify"], tmp_path, monkeypatch, capsys)
    assert kernel + rearranged == _n_tensors(tmp_path / "fast")


def _rewrite(path: Path, name: str, **kw) -> None:
    """Rewrite one dataset of an H5 file with h5py options (chunks, compression, fletcher32, ...)."""
    import h5py

    with h5py.File(path, "r+") as h:
        data, attrs = h[name][()], dict(h[name].attrs)
        del h[name]
        ds = h.create_dataset(name, data=data, **kw)
        ds.attrs.update(attrs)


STORAGES = {"chunked": dict(chunks=True), "gzip": dict(compression="gzip"), "fletcher32": dict(fletcher32=True),
            "shuffle": dict(shuffle=True, chunks=True), "compact": dict(compact=True),
            "big-endian": dict(dtype=">f4")}


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_h5_datasets_not_stored_plainly_are_read_by_h5py(storage, tmp_path, monkeypatch, capsys):
    """Only contiguous, unfiltered, little-endian datasets become byte recipes; any other storage is read
    by h5py (the torch path) and the file still equals the all-torch conversion's."""
    from enc.io.keras_h5 import list_vars

    src = tmp_path / "p"
    shutil.copytree(FIX / "keras_hub" / "backbone", src)
    name = "layers/transformer_encoder/_self_attention_layer/query_dense/vars/0"
    kw = dict(STORAGES[storage])
    if storage == "compact":
        import h5py

        kw = {"dcpl": h5py.h5p.create(h5py.h5p.DATASET_CREATE)}
        kw["dcpl"].set_layout(h5py.h5d.COMPACT)
    if storage == "big-endian":
        _rewrite(src / "model.weights.h5", name, **kw)
        assert run(["convert", str(src), "-o", str(tmp_path / "o"), "--no-verify"]) == 2  # enc reads no BE floats
        err = capsys.readouterr().err
        assert name in err and ">f4" in err and len(err.strip().splitlines()) == 1
        return
    _rewrite(src / "model.weights.h5", name, **kw)
    vars_ = list_vars(src / "model.weights.h5")
    assert vars_[name].raw is None
    others = [v for k, v in vars_.items() if k != name and v.shape]
    assert others and all(v.raw is not None for v in others)
    monkeypatch.setenv("ENC_FASTCOPY", "1")
    assert run(["convert", str(src), "-o", str(tmp_path / "fast"), "--no-verify"]) == 0
    monkeypatch.setenv("ENC_FASTCOPY", "0")
    assert run(["convert", str(src), "-o", str(tmp_path / "slow"), "--no-verify"]) == 0
    assert (tmp_path / "fast" / "model.safetensors").read_bytes() == (tmp_path / "slow" / "model.safetensors").read_bytes()


def test_h5_byte_recipe_points_at_the_datasets_bytes(tmp_path, monkeypatch):
    """Each recipe's range holds exactly what h5py reads; a user block (HDF5's base address moved) and a
    file cut short of a dataset keep the h5py path."""
    import h5py

    from enc.io.keras_h5 import list_vars

    path = FIX / "keras_hub" / "mlm_g2" / "model.weights.h5"
    data = path.read_bytes()
    with h5py.File(path, "r") as h:
        for name, v in list_vars(path).items():
            assert v.raw is not None, name
            want = np.ascontiguousarray(h[name][()]).tobytes()
            assert data[v.raw.offset:v.raw.offset + v.raw.nbytes] == want, name
            assert v.raw.check is None and v.raw.shape == v.shape

    ub = tmp_path / "ub.h5"
    with h5py.File(ub, "w", userblock_size=512) as h:
        h.create_dataset("layers/x/vars/0", data=np.arange(12, dtype=np.float32).reshape(3, 4))
    from enc.errors import FormatError
    from enc.io import keras_h5

    with pytest.raises(FormatError, match="HDF5 signature"):  # enc refuses such files first ...
        list_vars(ub)
    monkeypatch.setattr(keras_h5, "is_hdf5", lambda p: True)  # ... and would not trust their offsets either
    assert list_vars(ub)["layers/x/vars/0"].raw is None
    monkeypatch.undo()

    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as h:
        h.create_dataset("layers/x/vars/0", data=np.arange(12, dtype=np.float32).reshape(3, 4))
        h.create_dataset("layers/x/vars/1", shape=(0, 4), dtype=np.float32)
    got = list_vars(plain)
    r = got["layers/x/vars/0"].raw
    assert r is not None and r.nbytes == 48
    assert got["layers/x/vars/1"].raw is not None and got["layers/x/vars/1"].raw.nbytes == 0
    one = tmp_path / "one.h5"
    with h5py.File(one, "w") as h:
        h.create_dataset("layers/x/vars/0", data=np.arange(12, dtype=np.float32).reshape(3, 4))
    r = list_vars(one)["layers/x/vars/0"].raw
    cut = tmp_path / "cut.h5"
    whole = one.read_bytes()
    assert r.offset + r.nbytes == len(whole)  # the data is the file's tail: a cut file ends inside it
    cut.write_bytes(whole[:-4])
    from enc.errors import CorruptCheckpoint

    with pytest.raises(CorruptCheckpoint, match="truncated"):  # HDF5 compares its recorded end with the file's
        list_vars(cut)


# ----------------------------------------------------------------------------- E == H: generated tensors


def test_albert_tf_embedding_equals_hidden_never_imports_torch(tmp_path, monkeypatch, capsys):
    from tests.helpers.albert_release import hf_albert, train_spm, write_release

    src = write_release(tmp_path / "albert", hf_albert(120, 32, 32, 2, 1, 1, 2, 48), train_spm(tmp_path / "spm"))
    kernel, rearranged = _convert_twice(["convert", str(src), "--no-verify"], tmp_path, monkeypatch, capsys)
    assert kernel + rearranged == _n_tensors(tmp_path / "fast")
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "fast" / "model.safetensors"))
    np.testing.assert_array_equal(sd["albert.encoder.embedding_hidden_mapping_in.weight"], np.eye(32, dtype=np.float32))
    np.testing.assert_array_equal(sd["albert.encoder.embedding_hidden_mapping_in.bias"], np.zeros(32, np.float32))


def test_mobilebert_tf_embedding_equals_hidden_never_imports_torch(tmp_path, monkeypatch, capsys):
    from tests.helpers.mobilebert_release import hf_mobilebert, write_release

    over = dict(use_bottleneck=False, trigram_input=False, embedding_size=32, num_feedforward_networks=1,
                normalization_type="layer_norm", hidden_act="gelu_new", classifier_activation=True)
    src = write_release(tmp_path / "mobilebert", hf_mobilebert(**over))
    kernel, rearranged = _convert_twice(["convert", str(src), "--no-verify"], tmp_path, monkeypatch, capsys)
    assert kernel + rearranged == _n_tensors(tmp_path / "fast")
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "fast" / "model.safetensors"))
    np.testing.assert_array_equal(sd["mobilebert.embeddings.embedding_transformation.weight"],
                                  np.eye(32, dtype=np.float32))
    np.testing.assert_array_equal(sd["mobilebert.embeddings.embedding_transformation.bias"], np.zeros(32, np.float32))
    assert sd["cls.predictions.dense.weight"].shape == (0, 40)


def test_damaged_h5_converts_or_fails_as_the_h5py_path_does(tmp_path_factory, monkeypatch):
    """Flipped bytes anywhere in the file (metadata included: offsets, sizes, layouts): the byte path and the
    h5py path give the same exit code, the same one-line error, and the same bytes when both convert."""
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = (FIX / "keras_hub" / "backbone" / "model.weights.h5").read_bytes()

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(flips=st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), min_size=1, max_size=4))
    def check(flips):
        d = tmp_path_factory.mktemp("fz")
        shutil.copytree(FIX / "keras_hub" / "backbone", d / "p")
        data = bytearray(good)
        for off, x in flips:
            data[off] ^= x
        (d / "p" / "model.weights.h5").write_bytes(bytes(data))
        got = []
        for fast in ("1", "0"):
            monkeypatch.setenv("ENC_FASTCOPY", fast)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = run(["convert", str(d / "p"), "-o", str(d / f"o{fast}"), "--no-verify"])
            out = d / f"o{fast}" / "model.safetensors"
            # the error line (a success's line holds the time taken), or the file written
            got.append((rc, out.read_bytes() if rc == 0 else err.getvalue().replace(str(d / f"o{fast}"), "OUT")))
        assert got[0] == got[1]

    check()

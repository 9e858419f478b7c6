"""LUKE / mLUKE: the tiny original-format fixtures (tests/fixtures/luke, made by make_fixtures.py with
torch.save) converted by enc, checked against transformers: its LukeForMaskedLM word and entity logits
(the published conversion recipe, run by the fixture script in transformers 4.57), transformers 5
loading the output with no missing or unexpected keys and computing the same logits, the entity
vocabulary transformers' LukeTokenizer / MLukeTokenizer read, and their input ids / entity positions."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.cli.main import run

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "luke"
SRC = {"luke": FIX / "luke_tiny", "mluke": FIX / "mluke_tiny"}
EXPECTED = json.loads((FIX / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def arrays():
    return np.load(FIX / "expected.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for name, src in SRC.items():
        d = tmp_path_factory.mktemp(name) / "hf"
        assert run(["convert", str(src), "-o", str(d)]) == 0
        out[name] = d
    return out


def _case_tensors(case: dict):
    return (torch.tensor([case["input_ids"]]), torch.tensor([case["entity_ids"]]),
            torch.tensor([case["entity_position_ids"]]))


@pytest.mark.parametrize("name", ["luke", "mluke"])
def test_transformers_loads_output_and_reproduces_logits(converted, arrays, name):
    from transformers import LukeForMaskedLM

    model, info = LukeForMaskedLM.from_pretrained(converted[name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((converted[name] / "config.json").read_text())
    assert cfg["vocab_size"] == EXPECTED[name]["vocab_size"]
    assert cfg["entity_vocab_size"] == EXPECTED[name]["entity_vocab_size"]
    assert cfg["use_entity_aware_attention"] is True
    from enc.models import load_model

    ours = load_model(converted[name], head="mlm")
    for i, case in enumerate(EXPECTED[name]["cases"]):
        ids, eids, epos = _case_tensors(case)
        with torch.no_grad():
            hf = model(input_ids=ids, entity_ids=eids, entity_position_ids=epos)
            mine = ours(ids, None, None, eids, epos)
        want, want_e = arrays[f"{name}_{i}_logits"], arrays[f"{name}_{i}_entity_logits"]
        assert np.abs(hf.logits[0].numpy() - want).max() < 1e-4
        assert np.abs(hf.entity_logits[0].numpy() - want_e).max() < 1e-4
        assert torch.allclose(mine["logits"], hf.logits, atol=1e-4)
        assert torch.allclose(mine["entity_logits"], hf.entity_logits, atol=1e-4)


@pytest.mark.parametrize("name", ["luke", "mluke"])
def test_entity_vocab_matches_transformers_tokenizers(converted, name):
    from transformers import AutoTokenizer

    written = json.loads((converted[name] / "entity_vocab.json").read_text(encoding="utf-8"))
    assert written == EXPECTED[name]["entity_vocab"]
    tok = AutoTokenizer.from_pretrained(converted[name])
    assert type(tok).__name__ == ("MLukeTokenizer" if name == "mluke" else "LukeTokenizer")
    assert tok.entity_vocab == EXPECTED[name]["entity_vocab"]
    if name == "mluke":  # several languages' titles share one id
        assert written["en:Japan"] == written["ja:日本"] == 3 and written["[MASK2]"] == 10


@pytest.mark.parametrize("name", ["luke", "mluke"])
def test_enc_tokenizer_matches_transformers(converted, name):
    from enc.tokenization import load_tokenizer

    tok = load_tokenizer(converted[name])
    for case in EXPECTED[name]["cases"]:
        got = tok.encode_entities(case["text"], [tuple(s) for s in case["entity_spans"]], case["entities"])
        assert got["input_ids"] == case["input_ids"]
        assert got["entity_ids"] == case["entity_ids"]
        want = [[p for p in row if p != -1] for row in case["entity_position_ids"]]
        assert [[p for p in row if p != -1] for row in got["entity_position_ids"]] == want


def test_ent_rows_copy_at_and_hash(converted):
    from safetensors.torch import load_file

    for name in ("luke", "mluke"):
        sd = load_file(str(converted[name] / "model.safetensors"))
        w = sd["luke.embeddings.word_embeddings.weight"]
        at, hash_ = EXPECTED[name]["ent_init_ids"]
        assert torch.equal(w[-2], w[at]) and torch.equal(w[-1], w[hash_])
        assert torch.equal(sd["lm_head.decoder.weight"], w)
        e = sd["luke.entity_embeddings.entity_embeddings.weight"]
        ev = EXPECTED[name]["entity_vocab"]
        assert torch.equal(e[ev["[MASK2]"]], e[ev["[MASK]"]])
        q = sd["luke.encoder.layer.1.attention.self.query.weight"]
        assert torch.equal(sd["luke.encoder.layer.1.attention.self.e2e_query.weight"], q)


def test_parity_passes_and_reports_entities(converted, capsys):
    capsys.readouterr()
    assert run(["parity", str(SRC["mluke"]), str(converted["mluke"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in report["rows"]]
    assert names == ["embeddings", "entity_embeddings", "layer.0", "entity_layer.0", "layer.1", "entity_layer.1",
                     "mlm_logits", "entity_logits"]
    assert report["worst"]["nmse"] < 1e-10


def test_broken_conversion_fails_parity(converted, tmp_path, capsys):
    """Swap the entity projection for its negative: parity must fail at the entity embeddings."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(converted["luke"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["luke.entity_embeddings.entity_embedding_dense.weight"] = -sd["luke.entity_embeddings.entity_embedding_dense.weight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert run(["parity", str(SRC["luke"]), str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_failure"] == "entity_embeddings"


def test_lite_variant(tmp_path):
    from transformers import LukeForMaskedLM

    out = tmp_path / "lite"
    assert run(["convert", str(SRC["mluke"]), "-o", str(out), "--no-entity-embeddings"]) == 0  # parity ran: pass
    assert run(["parity", str(SRC["mluke"]), str(out), "--no-entity-embeddings"]) == 0
    assert json.loads((out / "entity_vocab.json").read_text()) == {"[MASK]": 0, "[UNK]": 1, "[PAD]": 2, "[MASK2]": 3}
    model, info = LukeForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.entity_vocab_size == 4
    full = EXPECTED["mluke"]["entity_vocab"]
    from safetensors.torch import load_file

    e = load_file(str(out / "model.safetensors"))["luke.entity_embeddings.entity_embeddings.weight"]
    src = torch.load(SRC["mluke"] / "checkpoints/epoch2/mp_rank_00_model_states.pt", weights_only=False)["module"]
    orig = src["entity_embeddings.entity_embeddings.weight"]
    assert torch.equal(e, orig[[full["[MASK]"], full["[UNK]"], full["[PAD]"], full["[MASK]"]]])


def test_fill_mask_words_and_entities(converted, arrays, capsys):
    case = EXPECTED["mluke"]["cases"][0]  # "Tokyo is the capital of <mask>." with span (24, 30)
    capsys.readouterr()
    rc = run(["fill-mask", case["text"], "--model", str(converted["mluke"]), "--entity-span", "24:30", "-k", "3",
              "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    pos = case["input_ids"].index(EXPECTED["mluke"]["vocab_size"] - 3)  # <mask>: before <ent>, <ent2>
    word = arrays["mluke_0_logits"][pos]
    assert res["masks"][0]["position"] == pos
    assert res["masks"][0]["predictions"][0]["token"] == int(np.argmax(word[:EXPECTED["mluke"]["vocab_size"]]))
    ent = arrays["mluke_0_entity_logits"][0]
    top = int(np.argmax(ent))
    assert res["entities"][0]["predictions"][0]["id"] == top
    titles = [k for k, v in EXPECTED["mluke"]["entity_vocab"].items() if v == top]
    assert res["entities"][0]["predictions"][0]["titles"] == titles
    assert abs(res["entities"][0]["predictions"][0]["score"] - float(torch.tensor(ent).softmax(-1)[top])) < 1e-5


def test_plain_fill_mask_runs_luke(converted, capsys):
    capsys.readouterr()
    assert run(["fill-mask", "Paris is the capital of <mask>.", "--model", str(converted["luke"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert len(res["masks"]) == 1 and len(res["masks"][0]["predictions"]) == 5


# ---------------------------------------------------------------------------------------- layouts


def test_deepspeed_layouts(tmp_path):
    """The run dir, checkpoints/, checkpoints/<tag> and the .pt file itself all convert to the same tensors."""
    from safetensors.torch import load_file

    ref = None
    for src in (SRC["mluke"], SRC["mluke"] / "checkpoints", SRC["mluke"] / "checkpoints" / "epoch2",
                SRC["mluke"] / "checkpoints" / "epoch2" / "mp_rank_00_model_states.pt"):
        out = tmp_path / f"o{len(str(src))}"
        assert run(["convert", str(src), "-o", str(out), "--no-verify"]) == 0, src
        sd = load_file(str(out / "model.safetensors"))
        if ref is None:
            ref = sd
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_release_tarball(tmp_path):
    import tarfile

    tgz = tmp_path / "luke_tiny_500k.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for f in ("pytorch_model.bin", "metadata.json", "entity_vocab.tsv"):
            tf.add(SRC["luke"] / f, arcname=f)
    out = tmp_path / "out"
    before = _temp_dirs()
    rc = run(["convert", str(tgz), "-o", str(out), "--no-verify", "--vocab", str(SRC["luke"] / "vocab.json"),
              "--merges", str(SRC["luke"] / "merges.txt")])
    assert rc == 0
    assert _temp_dirs() <= before  # the extracted release is removed
    assert json.loads((out / "config.json").read_text())["vocab_size"] == EXPECTED["luke"]["vocab_size"]


def test_no_tokenizer_warns_and_skips_ent_rows(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pytorch_model.bin", "metadata.json", "entity_vocab.tsv"):
        shutil.copy(SRC["luke"] / f, src / f)
    capsys.readouterr()
    assert run(["convert", str(src), "-o", str(tmp_path / "out"), "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "no word tokenizer" in err and "vocab.json and merges.txt" in err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == EXPECTED["luke"]["vocab_size"] - 2
    assert (tmp_path / "out" / "entity_vocab.json").is_file()


# ---------------------------------------------------------------------------------------- bad input


def _temp_dirs() -> set[str]:
    """enc-luke-* temp dirs (only this converter's: other engineers' enc runs share /tmp)."""
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("enc-luke-")}


def fails_cleanly(capsys, src: Path, out: Path, *extra: str, expect: str = "") -> str:
    before = _temp_dirs()
    siblings = set(out.parent.iterdir())
    capsys.readouterr()
    rc = run(["convert", str(src), "-o", str(out), *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("enc: error: "), err
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert set(out.parent.iterdir()) == siblings  # no half-written output beside it either
    assert _temp_dirs() <= before
    return lines[0]


def _copy(tmp_path: Path, name: str = "luke") -> Path:
    d = tmp_path / "src"
    shutil.copytree(SRC[name], d)
    return d


def test_missing_metadata(tmp_path, capsys):
    src = _copy(tmp_path)
    (src / "metadata.json").unlink()
    fails_cleanly(capsys, src, tmp_path / "out", "--from", "luke", expect="metadata.json")


def test_missing_entity_vocab(tmp_path, capsys):
    src = _copy(tmp_path, "mluke")
    (src / "entity_vocab.jsonl").unlink()
    fails_cleanly(capsys, src, tmp_path / "out", "--from", "luke", expect="entity_vocab")


def test_entity_vocab_size_mismatch(tmp_path, capsys):
    src = _copy(tmp_path)
    with open(src / "entity_vocab.tsv", "a") as f:
        f.write("Berlin\t10\n")
    fails_cleanly(capsys, src, tmp_path / "out", expect="13 entities but the checkpoint's entity embeddings have 12")


def test_wrong_word_vocab(tmp_path, capsys):
    src = _copy(tmp_path)
    vocab = json.loads((src / "vocab.json").read_text())
    vocab["extra"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab))
    fails_cleanly(capsys, src, tmp_path / "out", expect="wrong tokenizer")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/enc-luke-pwned",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    src = _copy(tmp_path)
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd["evil"] = _Payload()
    with open(src / "pytorch_model.bin", "wb") as f:
        torch.save(sd, f, pickle_module=pickle)
    line = fails_cleanly(capsys, src, tmp_path / "out", expect="not on enc's allow-list")
    assert "system" in line
    assert not Path("/tmp/enc-luke-pwned").exists()


def test_deepspeed_unknown_class_is_refused(tmp_path, capsys):
    src = _copy(tmp_path, "mluke")
    p = src / "checkpoints/epoch2/mp_rank_00_model_states.pt"
    state = torch.load(p, weights_only=False)  # our own fixture: trusted
    state["lr_scheduler"] = _Payload()
    torch.save(state, p)
    fails_cleanly(capsys, src, tmp_path / "out", expect="allow-list")


def test_read_with_rows_reads_in_place_and_checks_crc(tmp_path):
    """The big-table path (rows appended while reading) gives the same tensor, and still checks the CRC."""
    from enc.converters.luke.checkpoint import read_with_rows
    from enc.errors import CorruptCheckpoint
    from enc.io.megatron_pickle import ByteRange, load_lazy

    t = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    p = tmp_path / "t.pt"
    torch.save({"w": t, "v": t[:, 1]}, p)
    tree = load_lazy(ByteRange.whole_file(p))
    got = read_with_rows(tree["w"], "w", [2, 0])
    assert torch.equal(got, torch.cat([t, t[[2, 0]]]))
    assert torch.equal(read_with_rows(tree["v"], "v", [5]), torch.cat([t[:, 1], t[[5], 1]]))  # strided view
    raw = bytearray(p.read_bytes())
    i = raw.find(t.numpy().tobytes()[:24])
    raw[i + 100] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="CRC"):
        read_with_rows(load_lazy(ByteRange.whole_file(p))["w"], "w", [0])


def test_entity_vocab_with_id_gap(tmp_path, capsys):
    src = _copy(tmp_path, "mluke")
    lines = (src / "entity_vocab.jsonl").read_text(encoding="utf-8").splitlines()
    (src / "entity_vocab.jsonl").write_text("\n".join(lines[:5] + lines[6:]) + "\n", encoding="utf-8")
    fails_cleanly(capsys, src, tmp_path / "out", expect="entity ids are not 0..")


def test_entity_vocab_bad_jsonl_line(tmp_path, capsys):
    src = _copy(tmp_path, "mluke")
    with open(src / "entity_vocab.jsonl", "a") as f:
        f.write('{"id": 10, "entities": 3}\n')
    fails_cleanly(capsys, src, tmp_path / "out", expect="line 11")


def test_bert_based_luke_is_refused(tmp_path, capsys):
    src = _copy(tmp_path)
    meta = json.loads((src / "metadata.json").read_text())
    meta["model_config"]["bert_model_name"] = "bert-base-uncased"
    (src / "metadata.json").write_text(json.dumps(meta))
    fails_cleanly(capsys, src, tmp_path / "out", expect="BERT-based LUKE")


def test_plain_attention_variant(tmp_path, arrays):
    """entity_aware_attention=false: no w2e/e2w/e2e queries, and the same logits (the copies were exact)."""
    from transformers import LukeForMaskedLM

    out = tmp_path / "plain"
    assert run(["convert", str(SRC["luke"]), "-o", str(out), "--set", "entity_aware_attention=false"]) == 0
    model, info = LukeForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.use_entity_aware_attention is False
    case = EXPECTED["luke"]["cases"][1]
    ids, eids, epos = _case_tensors(case)
    with torch.no_grad():
        o = model(input_ids=ids, entity_ids=eids, entity_position_ids=epos)
    assert np.abs(o.entity_logits[0].numpy() - arrays["luke_1_entity_logits"]).max() < 1e-4


def test_parity_of_lite_output_without_the_flag_says_so(tmp_path, capsys):
    out = tmp_path / "lite"
    assert run(["convert", str(SRC["luke"]), "-o", str(out), "--no-entity-embeddings", "--no-verify"]) == 0
    capsys.readouterr()
    assert run(["parity", str(SRC["luke"]), str(out)]) == 2
    assert "pass --no-entity-embeddings" in capsys.readouterr().err
